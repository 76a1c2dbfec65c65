"""The `chatledger` command: argument parsing and output formatting only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .config import Config, ConfigError, load

log = logging.getLogger("chatledger")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default: $CHATLEDGER_CONFIG)")
    parser.add_argument("--database", metavar="URL", help="database URL or SQLite file path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatledger", description="A response-logging reverse proxy for OpenAI-compatible chat APIs."
    )
    parser.add_argument("--version", action="version", version=f"chatledger {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    _common(serve)
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--upstream", metavar="URL", help="upstream base URL (default https://openrouter.ai)")
    serve.add_argument("--workers", type=int, help="worker processes sharing the port (default 1)")
    serve.set_defaults(handler=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="apply migrations up to the latest revision")
    _common(db_upgrade)
    db_upgrade.add_argument("revision", nargs="?", default="head")
    db_upgrade.set_defaults(handler=_db_upgrade)
    db_status = db_commands.add_parser("status", help="migration revision, row counts and spool backlog")
    _common(db_status)
    db_status.add_argument("--json", action="store_true", help="machine-readable output")
    db_status.set_defaults(handler=_db_status)
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
        import orjson

        sys.stdout.write(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_status(status))
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
        level=config.logging.level.upper() if config.logging.level.upper() in logging._nameToLevel else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Callable[[argparse.Namespace, Config], int] = args.handler
    try:
        return handler(args, config)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        print(f"chatledger: config error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"chatledger: {exc}", file=sys.stderr)
        return 1


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""
