"""The `chatledger` command line: argument parsing and dispatch (commands.py runs them)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..config import Config, ConfigError, load
from ..logs import configure as configure_logging
from . import commands as run
from .commands import CommandError, UsageError
from .escape import terminal_text


def _common(parser: argparse.ArgumentParser, *, json: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $CHATLEDGER_CONFIG)")
    parser.add_argument("--database", metavar="URL", help="database URL or SQLite file path")
    if json:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters")
    group.add_argument("-m", "--model", metavar="GLOB", help="model (reported or requested), e.g. 'gpt-4o*'")
    group.add_argument(
        "--since", metavar="TIME", help="ISO time (UTC unless it has an offset) or age: 30m, 1h, 7d"
    )
    group.add_argument("--until", metavar="TIME", help="same forms as --since; rows before this time")
    group.add_argument("-u", "--user", help="the request's `user` field")
    group.add_argument("-t", "--tag", action="append", metavar="K=V", help="X-Ledger-Tags pair (repeatable)")
    group.add_argument(
        "-k", "--key", metavar="LABEL|HASH", help="API key label, fingerprint or the key itself"
    )
    group.add_argument("--outcome", help="ok, upstream_error, client_disconnected, timeout, unreachable, ...")
    group.add_argument("--status", metavar="CODE", help="HTTP status returned by the upstream")
    group.add_argument("--stream", action=argparse.BooleanOptionalAction, help="streamed calls only (or not)")
    group.add_argument("--api", help="chat, responses, embeddings, completions or messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatledger", description="A response-logging reverse proxy for OpenAI-compatible chat APIs."
    )
    parser.add_argument("--version", action="version", version=f"chatledger {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    _common(serve, json=False)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL (default https://openrouter.ai)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default 1)")
    serve.set_defaults(handler=run.serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="apply migrations up to the latest revision")
    _common(db_upgrade, json=False)
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(handler=run.db_upgrade)
    db_status = db_commands.add_parser("status", help="migration revision, row counts and spool backlog")
    _common(db_status)
    db_status.set_defaults(handler=run.db_status)
    db_prune = db_commands.add_parser(
        "prune", help="delete the calls before a day (stats and rollups keep their totals)"
    )
    _common(db_prune)
    db_prune.add_argument(
        "--before",
        required=True,
        metavar="WHEN",
        help="ISO date or time, or an age like 90d; rows before that UTC day go",
    )
    db_prune.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    db_prune.set_defaults(handler=run.db_prune)
    db_rollup = db_commands.add_parser(
        "rollup", help="the usage rollup tables: --rebuild recomputes them from the rows"
    )
    _common(db_rollup)
    db_rollup.add_argument(
        "--rebuild", action="store_true", help="recompute the rollups from the rows, one UTC day at a time"
    )
    db_rollup.add_argument(
        "--since",
        metavar="TIME",
        help="from the UTC day holding this ISO time or age (30m, 1h, 7d); default: the first row's",
    )
    db_rollup.set_defaults(handler=run.db_rollup)

    logs = commands.add_parser(
        "logs", help="recent completions, newest first; `logs show ID` for one in full"
    )
    _common(logs)
    logs.add_argument(
        "action", nargs="*", metavar="show ID", help="show one completion (request or completion id)"
    )
    _filters(logs)
    logs.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20, 0 = all)")
    logs.set_defaults(handler=run.logs)

    stats = commands.add_parser("stats", help="requests, errors, tokens, cost and latency per group")
    _common(stats)
    stats.add_argument(
        "--by",
        default="model",
        metavar="DIMENSION",
        help="model, day, hour, user, key, tag, tag:NAME, provider, upstream or api (default model)",
    )
    stats.add_argument(
        "--exact",
        action="store_true",
        help="read the rows, not the hourly rollups: exact percentiles, slower over long ranges",
    )
    _filters(stats)
    stats.set_defaults(handler=run.stats)

    export = commands.add_parser("export", help="stream every matching completion as CSV or JSON Lines")
    _common(export, json=False)
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    _filters(export)
    export.add_argument("-n", "--limit", type=int, default=0, help="at most this many (default 0 = all)")
    export.set_defaults(handler=run.export)

    prices = commands.add_parser("prices", help="the price table (USD per million tokens)")
    price_commands = prices.add_subparsers(dest="prices_command", required=True, metavar="COMMAND")
    sync = price_commands.add_parser("sync", help="fetch prices from <upstream>/api/v1/models (OpenRouter)")
    _common(sync)
    sync.add_argument("--upstream", metavar="URL", help="upstream base URL (default: from the config)")
    sync.set_defaults(handler=run.prices_sync)
    listing = price_commands.add_parser("list", help="the prices in effect now")
    _common(listing)
    listing.add_argument("-m", "--model", metavar="GLOB", help="only models matching this glob")
    listing.add_argument(
        "--history", action="store_true", help="every price ever recorded, not only the latest"
    )
    listing.set_defaults(handler=run.prices_list)

    reprice = commands.add_parser(
        "reprice", help="recompute price-table costs of past rows (never upstream costs)"
    )
    _common(reprice)
    reprice.add_argument("--since", required=True, metavar="TIME", help="ISO time or age: 30m, 1h, 7d")
    reprice.add_argument("--until", metavar="TIME")
    reprice.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    reprice.add_argument(
        "--current",
        action="store_true",
        help="price every row at today's prices (after correcting a wrong price), not at the price in effect "
        "when it was logged",
    )
    reprice.set_defaults(handler=run.reprice)

    keys = commands.add_parser("keys", help="human labels for API key fingerprints")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    label = key_commands.add_parser(
        "label", help="label a key (give the key or its fingerprint; never stored)"
    )
    _common(label)
    label.add_argument("api_key", metavar="KEY|HASH")
    label.add_argument("label")
    label.set_defaults(handler=run.keys_label)
    key_list = key_commands.add_parser("list", help="labelled keys with their request counts")
    _common(key_list)
    key_list.set_defaults(handler=run.keys_list)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {
        ("database", "url"): getattr(args, "database", None),
        ("server", "host"): getattr(args, "host", None),
        ("server", "port"): getattr(args, "port", None),
        ("server", "workers"): getattr(args, "workers", None),
        ("upstream", "url"): getattr(args, "upstream", None),
    }
    return load(getattr(args, "config", None), overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"chatledger: config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging)  # libraries (Alembic, aiosqlite ...) at [logging] library_level
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        return handler(args, config)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `chatledger export | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except ConfigError as exc:
        print(f"chatledger: config error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"chatledger: {terminal_text(exc)}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"chatledger: {terminal_text(exc)}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
