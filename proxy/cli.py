"""The `chatledger` command: argument parsing and output formatting only.

Query commands import SQLAlchemy lazily, so `chatledger --version` and `--help` stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .config import Config, ConfigError, load

log = logging.getLogger("chatledger")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class UsageError(CommandError):
    """A bad argument value: printed as one line, exit status 2."""


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
    serve.set_defaults(handler=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="apply migrations up to the latest revision")
    _common(db_upgrade, json=False)
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(handler=_db_upgrade)
    db_status = db_commands.add_parser("status", help="migration revision, row counts and spool backlog")
    _common(db_status)
    db_status.set_defaults(handler=_db_status)

    logs = commands.add_parser(
        "logs", help="recent completions, newest first; `logs show ID` for one in full"
    )
    _common(logs)
    logs.add_argument(
        "action", nargs="*", metavar="show ID", help="show one completion (request or completion id)"
    )
    _filters(logs)
    logs.add_argument("-n", "--limit", type=int, default=20, help="how many (default 20, 0 = all)")
    logs.set_defaults(handler=_logs)

    stats = commands.add_parser("stats", help="requests, errors, tokens, cost and latency per group")
    _common(stats)
    stats.add_argument(
        "--by",
        default="model",
        metavar="DIMENSION",
        help="model, day, hour, user, key, tag, tag:NAME, provider or upstream (default model)",
    )
    _filters(stats)
    stats.set_defaults(handler=_stats)

    export = commands.add_parser("export", help="stream every matching completion as CSV or JSON Lines")
    _common(export, json=False)
    export.add_argument("--format", choices=("csv", "jsonl"), default="jsonl")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    _filters(export)
    export.add_argument("-n", "--limit", type=int, default=0, help="at most this many (default 0 = all)")
    export.set_defaults(handler=_export)

    prices = commands.add_parser("prices", help="the price table (USD per million tokens)")
    price_commands = prices.add_subparsers(dest="prices_command", required=True, metavar="COMMAND")
    sync = price_commands.add_parser("sync", help="fetch prices from <upstream>/api/v1/models (OpenRouter)")
    _common(sync)
    sync.add_argument("--upstream", metavar="URL", help="upstream base URL (default: from the config)")
    sync.set_defaults(handler=_prices_sync)
    listing = price_commands.add_parser("list", help="the prices in effect now")
    _common(listing)
    listing.add_argument("-m", "--model", metavar="GLOB", help="only models matching this glob")
    listing.add_argument(
        "--history", action="store_true", help="every price ever recorded, not only the latest"
    )
    listing.set_defaults(handler=_prices_list)

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
    reprice.set_defaults(handler=_reprice)

    keys = commands.add_parser("keys", help="human labels for API key fingerprints")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    label = key_commands.add_parser(
        "label", help="label a key (give the key or its fingerprint; never stored)"
    )
    _common(label)
    label.add_argument("api_key", metavar="KEY|HASH")
    label.add_argument("label")
    label.set_defaults(handler=_keys_label)
    key_list = key_commands.add_parser("list", help="labelled keys with their request counts")
    _common(key_list)
    key_list.set_defaults(handler=_keys_list)
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


def _serve(args: argparse.Namespace, config: Config) -> int:
    from .server import serve

    return serve(config)


def _db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from .config import redact_url
    from .migrate import upgrade_url

    asyncio.run(upgrade_url(config.database.url, args.revision))
    print(f"database {redact_url(config.database.url)} is at revision {args.revision}")
    return 0


def _db_status(args: argparse.Namespace, config: Config) -> int:
    from .status import database_status, format_status

    status = asyncio.run(database_status(config))
    if args.json:
        _print_json(status, indent=True)
    else:
        print(format_status(status))
    return 0


# ---- query commands ---------------------------------------------------------------------------


def _filter_values(args: argparse.Namespace) -> Any:
    from .queries import FilterError, parse_filters

    params = {
        name: getattr(args, name, None)
        for name in ("model", "since", "until", "user", "key", "outcome", "status")
    }
    params["tag"] = args.tag or []
    if args.stream is not None:
        params["stream"] = "true" if args.stream else "false"
    try:
        return parse_filters(params)
    except FilterError as exc:
        raise UsageError(f"--{exc.param}: {exc.message}") from None


def _run(config: Config, job: Callable[[Any], Any], *, write: bool = False) -> Any:
    """Open the ledger, run `job(engine)`, close. Reading never creates a database; writing migrates it."""
    from sqlalchemy.exc import SQLAlchemyError

    from .config import redact_url, sqlite_path
    from .db import create_engine

    path = sqlite_path(config.database.url)
    if path is not None and not path.exists() and not write:
        raise CommandError(f"no ledger at {path} (run `chatledger serve` or `chatledger db upgrade` first)")

    async def main() -> Any:
        engine = create_engine(config.database.url)
        try:
            if write and config.database.auto_migrate:
                from .migrate import upgrade

                await upgrade(engine)
            return await job(engine)
        except (OSError, SQLAlchemyError) as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise CommandError(f"database {redact_url(config.database.url)}: {detail}") from None
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _print_json(value: Any, *, indent: bool = False) -> None:
    from .queries import to_json

    sys.stdout.buffer.write(to_json(value, indent=indent) + b"\n")


def _logs(args: argparse.Namespace, config: Config) -> int:
    from .queries import fetch_completion

    if args.action:
        if len(args.action) != 2 or args.action[0] != "show":
            raise UsageError("usage: chatledger logs show <request_id or completion_id>")
        ident = args.action[1]

        async def one(engine: Any) -> Any:
            async with engine.connect() as conn:
                return await fetch_completion(conn, ident)

        rows = _run(config, one)
        if not rows:
            raise CommandError(f"no completion with request id or completion id {ident!r}")
        if args.json:
            for row in rows:
                _print_json(row)
        else:
            from .report import format_completion

            print("\n\n".join(format_completion(row) for row in rows))
        return 0
    if args.limit < 0:
        raise UsageError("--limit: expected 0 (all) or more")
    filters = _filter_values(args)
    _run(config, lambda engine: _print_logs(engine, filters, limit=args.limit, as_json=args.json))
    return 0


LOGS_PAGE_ROWS = 1000


async def _print_logs(engine: Any, filters: Any, *, limit: int, as_json: bool) -> None:
    """`logs`: the newest `limit` matches (0: all), printed as they stream in, so memory stays flat
    however large the ledger; the table gets its header and column widths per page of LOGS_PAGE_ROWS."""
    from .queries import iter_completions
    from .report import format_logs

    page: list[dict[str, Any]] = []
    printed = False
    async for row in iter_completions(engine, filters, limit=limit, newest_first=True, chunk=LOGS_PAGE_ROWS):
        if as_json:
            _print_json(row)
            continue
        page.append(row)
        if len(page) == LOGS_PAGE_ROWS:
            print(format_logs(page), flush=True)
            page, printed = [], True
    if not as_json and (page or not printed):
        print(format_logs(page))


def _stats(args: argparse.Namespace, config: Config) -> int:
    from .queries import FilterError
    from .stats import fetch_stats, parse_dimension

    try:
        by = parse_dimension(args.by)
    except FilterError as exc:
        raise UsageError(f"--by: {exc.message}") from None
    filters = _filter_values(args)

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await fetch_stats(conn, by, filters)

    stats = _run(config, job)
    if args.json:
        _print_json(
            {"by": stats.by, "rows": [r.as_dict() for r in stats.rows], "totals": stats.totals.as_dict()}
        )
    else:
        from .report import format_stats

        print(format_stats(stats))
    return 0


def _export(args: argparse.Namespace, config: Config) -> int:
    from .report import export_rows

    if args.limit < 0:
        raise UsageError("--limit: expected 0 (all) or more")
    filters = _filter_values(args)

    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        count = _run(config, lambda engine: export_rows(engine, filters, args.format, out, limit=args.limit))
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        print(f"exported {count:,} completion(s) to {args.output}", file=sys.stderr)
    return 0


def _prices_sync(args: argparse.Namespace, config: Config) -> int:
    from .pricing import fetch_openrouter_prices, store_prices

    url = config.upstream.url
    try:
        prices = asyncio.run(fetch_openrouter_prices(url, seconds=config.upstream.connect_timeout + 60))
    except Exception as exc:
        raise CommandError(f"could not fetch prices from {url}/api/v1/models: {exc}") from None

    async def job(engine: Any) -> tuple[int, int]:
        async with engine.begin() as conn:
            return await store_prices(conn, prices, "openrouter")

    new, changed = _run(config, job, write=True)
    result = {"models": len(prices), "new": new, "changed": changed, "unchanged": len(prices) - new - changed}
    if args.json:
        _print_json(result)
    else:
        print(
            f"{len(prices):,} priced model(s) from {url}: {new:,} new, {changed:,} changed, "
            f"{result['unchanged']:,} unchanged"
        )
    return 0


def _prices_list(args: argparse.Namespace, config: Config) -> int:
    from fnmatch import fnmatchcase

    from .pricing import current_prices

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await current_prices(conn, history=args.history)

    entries = [e for e in _run(config, job) if not args.model or fnmatchcase(e.model, args.model)]
    if args.json:
        for entry in entries:
            _print_json(entry)
    else:
        from .report import format_prices

        print(format_prices(entries))
    return 0


def _reprice(args: argparse.Namespace, config: Config) -> int:
    from datetime import UTC, datetime

    from .pricing import load_price_book, reprice, store_prices
    from .queries import FilterError, parse_time

    try:
        since = parse_time(args.since, "since")
        until = parse_time(args.until, "until") if args.until else None
    except FilterError as exc:
        raise UsageError(f"--{exc.param}: {exc.message}") from None

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await store_prices(conn, config.pricing.models, "config")  # as the proxy does at start
            book = await load_price_book(conn)
            await (transaction.rollback() if args.dry_run else transaction.commit())
        at = datetime.now(UTC) if args.current else None
        return await reprice(engine, book, since, until, dry_run=args.dry_run, prices_at=at)

    report = _run(config, job)
    if args.json:
        _print_json({**{name: getattr(report, name) for name in report.__slots__}, "dry_run": args.dry_run})
    else:
        verb = "would change" if args.dry_run else "changed"
        print(
            f"{report.rows_checked:,} row(s) priced from the price table or unpriced; {verb} "
            f"{report.rows_changed:,}"
        )
        print(f"total before: ${report.total_before:,.6f} ({report.unknown_before:,} unknown)")
        print(f"total after:  ${report.total_after:,.6f} ({report.unknown_after:,} unknown)")
    return 0


def _keys_label(args: argparse.Namespace, config: Config) -> int:
    from .queries import set_key_label

    label = args.label.strip()
    if not label:
        raise UsageError("label: must not be empty")

    async def job(engine: Any) -> str:
        async with engine.begin() as conn:
            return await set_key_label(conn, args.api_key, label)

    fingerprint = _run(config, job, write=True)
    if args.json:
        _print_json({"api_key_hash": fingerprint, "label": label})
    else:
        print(f"{fingerprint} is now labelled {label!r}")
    return 0


def _keys_list(args: argparse.Namespace, config: Config) -> int:
    from .queries import key_labels

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await key_labels(conn)

    rows = _run(config, job)
    if args.json:
        for row in rows:
            _print_json(row)
    else:
        from .report import format_keys

        print(format_keys(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"chatledger: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.logging.level.upper(),  # validated by config.load
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.logging.level.lower() != "debug":  # serve logs one startup line, not Alembic's chatter
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        return handler(args, config)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `chatledger export | head`
        sys.stderr.close()
        return 0
    except ConfigError as exc:
        print(f"chatledger: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 1
