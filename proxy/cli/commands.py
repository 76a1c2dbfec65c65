"""The `chatledger` commands: each opens what it needs, runs, and prints through output.py.

Query commands import SQLAlchemy lazily, so `chatledger --version` and `--help` stay instant.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from ..config import Config


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class UsageError(CommandError):
    """A bad argument value: printed as one line, exit status 2."""


def serve(args: argparse.Namespace, config: Config) -> int:
    from ..server import serve

    return serve(config)


def db_upgrade(args: argparse.Namespace, config: Config) -> int:
    from ..config import redact_url
    from ..store.migrate import upgrade_url

    asyncio.run(upgrade_url(config.database.url, args.revision))
    print(f"database {redact_url(config.database.url)} is at revision {args.revision}")
    return 0


def db_status(args: argparse.Namespace, config: Config) -> int:
    from .status import database_status, format_status

    status = asyncio.run(database_status(config))
    if args.json:
        _print_json(status, indent=True)
    else:
        print(format_status(status))
    return 0


def db_prune(args: argparse.Namespace, config: Config) -> int:
    from ..store.filters import FilterError, parse_time
    from ..store.retention import prune

    try:
        before = parse_time(args.before, "before")
    except FilterError as exc:
        raise UsageError(f"--{exc.param}: {exc.message}") from None
    report = _run(config, lambda engine: prune(engine, before, dry_run=args.dry_run))
    if args.json:
        _print_json(report.as_dict())
        return 0
    from .output import format_prune

    print(format_prune(report, sqlite=config.database.url.startswith("sqlite")))
    return 0


def db_rollup(args: argparse.Namespace, config: Config) -> int:
    from ..store.filters import FilterError, parse_time
    from ..store.rollup_rebuild import rebuild

    if not args.rebuild:
        raise UsageError("db rollup: nothing to do (--rebuild recomputes the rollups from the rows)")
    try:
        since = parse_time(args.since, "since") if args.since else None
    except FilterError as exc:
        raise UsageError(f"--{exc.param}: {exc.message}") from None

    report = _run(config, lambda engine: rebuild(engine, since), write=True)
    if args.json:
        _print_json({name: getattr(report, name) for name in report.__slots__})
    else:
        span = f" ({report.first_day} to {report.last_day})" if report.days else ""
        print(f"rebuilt {report.days:,} day(s){span} from {report.rows:,} row(s) in {report.seconds:.1f}s")
        if report.pruned_before:
            print(f"days before {report.pruned_before} (pruned) left as they were")
    return 0


# ---- query commands ---------------------------------------------------------------------------


def _filter_values(args: argparse.Namespace) -> Any:
    from ..store.filters import FilterError, parse_filters

    params = {
        name: getattr(args, name, None)
        for name in ("model", "since", "until", "user", "key", "outcome", "status", "api")
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

    from ..config import redact_url, sqlite_path
    from ..store.engine import create_engine

    path = sqlite_path(config.database.url)
    if path is not None and not path.exists() and not write:
        raise CommandError(f"no ledger at {path} (run `chatledger serve` or `chatledger db upgrade` first)")

    async def main() -> Any:
        engine = create_engine(config.database.url)
        try:
            if write and config.database.auto_migrate:
                from ..store.migrate import upgrade

                await upgrade(engine)
            return await job(engine)
        except BrokenPipeError:
            raise  # the reader of our output went away (`| head`): not a database problem
        except (OSError, SQLAlchemyError) as exc:
            detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise CommandError(f"database {redact_url(config.database.url)}: {detail}") from None
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _print_items(items: list[Any], as_json: bool, formatter: str) -> None:
    """JSON Lines, or the table output.py's `formatter` makes of them."""
    if as_json:
        for item in items:
            _print_json(item)
        return
    from . import output

    print(getattr(output, formatter)(items))


def _print_json(value: Any, *, indent: bool = False) -> None:
    from ..store.queries import to_json

    sys.stdout.buffer.write(to_json(value, indent=indent) + b"\n")


def logs(args: argparse.Namespace, config: Config) -> int:
    from ..store.queries import AmbiguousId, fetch_completion

    if args.action:
        if len(args.action) != 2 or args.action[0] != "show":
            raise UsageError("usage: chatledger logs show <request_id or completion_id>")
        ident = args.action[1]

        async def one(engine: Any) -> Any:
            async with engine.connect() as conn:
                return await fetch_completion(conn, ident)

        try:
            rows = _run(config, one)
        except AmbiguousId as exc:
            shown = ", ".join(exc.request_ids[:10]) + (", ..." if len(exc.request_ids) > 10 else "")
            raise UsageError(
                f"{ident!r} matches {len(exc.request_ids)} request ids ({shown}); give more characters"
            ) from None
        if not rows:
            raise CommandError(f"no completion with request id or completion id {ident!r}")
        if args.json:
            for row in rows:
                _print_json(row)
        else:
            from .output import format_completion

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
    from ..store.queries import iter_completions
    from .output import format_logs

    horizon = await _pruned_horizon(engine, filters)
    page: list[dict[str, Any]] = []
    printed = False
    count = 0
    async for row in iter_completions(engine, filters, limit=limit, newest_first=True, chunk=LOGS_PAGE_ROWS):
        count += 1
        if as_json:
            _print_json(row)
            continue
        page.append(row)
        if len(page) == LOGS_PAGE_ROWS:
            print(format_logs(page), flush=True)
            page, printed = [], True
    if not as_json and (page or not printed):
        print(format_logs(page))
    _note_pruned(horizon, limit, count)


async def _pruned_horizon(engine: Any, filters: Any) -> Any:
    """The prune horizon when the selection reaches before it, else None."""
    from ..store.retention import pruned_before, reaches_pruned

    async with engine.connect() as conn:
        horizon = await pruned_before(conn)
    return horizon if reaches_pruned(horizon, filters.since) else None


def _note_pruned(horizon: Any, limit: int, count: int) -> None:
    """One line on stderr when the listing ran into pruned days (it ended before its limit)."""
    if horizon is not None and (limit == 0 or count < limit):
        from ..store.retention import pruned_note

        sys.stdout.flush()
        print(f"chatledger: {pruned_note(horizon)}", file=sys.stderr)


def stats(args: argparse.Namespace, config: Config) -> int:
    from ..store.filters import FilterError
    from ..store.stats import fetch_stats, parse_dimension

    try:
        by = parse_dimension(args.by)
    except FilterError as exc:
        raise UsageError(f"--by: {exc.message}") from None
    filters = _filter_values(args)

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await fetch_stats(conn, by, filters, exact=args.exact)

    stats = _run(config, job)
    if args.json:
        _print_json(stats.as_dict())
    else:
        from .output import format_stats

        print(format_stats(stats))
    return 0


def export(args: argparse.Namespace, config: Config) -> int:
    from .output import export_rows

    if args.limit < 0:
        raise UsageError("--limit: expected 0 (all) or more")
    filters = _filter_values(args)

    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout  # noqa: SIM115

    async def job(engine: Any) -> tuple[int, Any]:
        horizon = await _pruned_horizon(engine, filters)
        return await export_rows(engine, filters, args.format, out, limit=args.limit), horizon

    try:
        count, horizon = _run(config, job)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        print(f"exported {count:,} completion(s) to {args.output}", file=sys.stderr)
    _note_pruned(horizon, args.limit, count)
    return 0


def prices_sync(args: argparse.Namespace, config: Config) -> int:
    from ..store.pricing.openrouter import fetch_openrouter_prices
    from ..store.pricing.table import store_prices

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
        print(
            f"a running `chatledger serve` applies them within {config.pricing.reload_interval:g} s "
            "(pricing.reload_interval)"
        )
    return 0


def prices_list(args: argparse.Namespace, config: Config) -> int:
    from fnmatch import fnmatchcase

    from ..store.pricing.table import current_prices

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await current_prices(conn, history=args.history)

    entries = [e for e in _run(config, job) if not args.model or fnmatchcase(e.model, args.model)]
    _print_items(entries, args.json, "format_prices")
    return 0


def reprice(args: argparse.Namespace, config: Config) -> int:
    from datetime import UTC, datetime

    from ..store.filters import FilterError, parse_time
    from ..store.pricing.reprice import reprice
    from ..store.pricing.table import load_price_book, store_prices

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


def keys_label(args: argparse.Namespace, config: Config) -> int:
    from ..store.key_labels import set_key_label

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


def keys_list(args: argparse.Namespace, config: Config) -> int:
    from ..store.key_labels import key_labels

    async def job(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await key_labels(conn)

    _print_items(_run(config, job), args.json, "format_keys")
    return 0
