"""Several upstreams behind one proxy: `[[routes]]` by path prefix (the prefix removed on the way up),
upstream.url for every other path; each row names the upstream it went to, per-route timeouts; and
the config errors that name their key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.config import ConfigError, RouteConfig, load, load_file

from .api_payloads import MESSAGE_BASIC, RESPONSES_BASIC
from .conftest import Ledger, start_ledger
from .payloads import OPENAI_BASIC
from .sdk_helpers import Tee, anthropic_client, openai_client
from .upstream import FakeUpstream, json_reply

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "chatledger.toml"
    path.write_text(text)
    return str(path)


async def hang(request: web.Request, body: bytes) -> web.StreamResponse:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeUpstream]]:
    upstreams = {name: FakeUpstream() for name in ("default", "openai", "anthropic")}
    upstreams["default"].add("basic", json_reply(OPENAI_BASIC))
    upstreams["openai"].add("basic", json_reply(RESPONSES_BASIC))
    upstreams["anthropic"].add("basic", json_reply(MESSAGE_BASIC))
    upstreams["anthropic"].add("hang", hang)
    for fake in upstreams.values():
        await fake.start()
    yield upstreams
    for fake in upstreams.values():
        await fake.stop()


@pytest.fixture
async def ledger(fakes: dict[str, FakeUpstream], database_url: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    text = f"""
[upstream]
url = "{fakes["default"].url}"
[database]
url = "{database_url}"

[[routes]]
prefix = "/openai/"
url = "{fakes["openai"].url}/"

[[routes]]
prefix = "/anthropic"
url = "{fakes["anthropic"].url}"
read_timeout = 0.5
"""
    config = load(write(tmp_path, text), environ={})
    config = config.replace("database", spool_dir=str(tmp_path / "spool"), writer="inline", flush_interval=0.05)
    proxy = await start_ledger(config)
    yield proxy
    await proxy.stop()


async def test_each_route_goes_to_its_upstream_with_the_prefix_removed(
    ledger: Ledger, fakes: dict[str, FakeUpstream]
) -> None:
    tee_openai, tee_anthropic = Tee(), Tee()
    async with openai_client(ledger.url + "/openai/v1", tee_openai, "basic") as client:
        await client.responses.create(model="o4-mini", input="hi")
    async with anthropic_client(ledger.url + "/anthropic", tee_anthropic, "basic") as client:
        await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    async with aiohttp.ClientSession() as session:
        async with session.post(ledger.url + "/v1/chat/completions", json={"model": "gpt-4o"}) as response:
            assert await response.read() == orjson.dumps(OPENAI_BASIC)
        # whole segments only: /openaix is not under /openai
        async with session.post(ledger.url + "/openaix/v1/chat/completions", json={}) as response:
            assert response.status == 200
        async with session.get(ledger.url + "/openai?limit=2") as response:
            assert await response.read() == orjson.dumps(RESPONSES_BASIC)
    assert tee_openai.body == orjson.dumps(RESPONSES_BASIC)
    assert tee_anthropic.body == orjson.dumps(MESSAGE_BASIC)
    assert [r.path_qs for r in fakes["openai"].requests] == ["/v1/responses", "/?limit=2"]
    assert [r.path_qs for r in fakes["anthropic"].requests] == ["/v1/messages"]
    assert [r.path_qs for r in fakes["default"].requests] == ["/v1/chat/completions", "/openaix/v1/chat/completions"]

    rows = await ledger.rows(count=4)
    assert [(r["path"], r["api"], r["upstream"], r["outcome"]) for r in rows] == [
        ("/openai/v1/responses", "responses", fakes["openai"].url, "ok"),
        ("/anthropic/v1/messages", "messages", fakes["anthropic"].url, "ok"),
        ("/v1/chat/completions", "chat", fakes["default"].url, "ok"),
        ("/openaix/v1/chat/completions", "chat", fakes["default"].url, "ok"),
    ]
    assert [r["model"] for r in rows[:3]] == [RESPONSES_BASIC["model"], MESSAGE_BASIC["model"], OPENAI_BASIC["model"]]

    async with (
        aiohttp.ClientSession() as session,
        session.get(ledger.url + "/_ledger/api/stats", params={"by": "upstream"}) as response,
    ):
        stats = await response.json()
    assert {row["key"]: row["requests"] for row in stats["rows"]} == {
        fakes["openai"].url: 1,
        fakes["anthropic"].url: 1,
        fakes["default"].url: 2,
    }


async def test_a_route_has_its_own_read_timeout(ledger: Ledger, fakes: dict[str, FakeUpstream]) -> None:
    began = time.monotonic()
    async with (
        aiohttp.ClientSession(headers={"X-Fake-Scenario": "hang"}) as session,
        session.post(ledger.url + "/anthropic/v1/messages", json={"model": "claude-sonnet-4-5"}) as response,
    ):
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - began < 3  # the route's 0.5 s, not upstream.read_timeout's 300 s
    row = await ledger.row()
    assert (row["api"], row["outcome"], row["upstream"]) == ("messages", "timeout", fakes["anthropic"].url)


# ---- config -------------------------------------------------------------------------------------


def test_routes_are_normalised(tmp_path: Path) -> None:
    text = """
[[routes]]
prefix = "/openrouter/"
url = "https://openrouter.ai/api/"
connect_timeout = 2.5
"""
    config = load(write(tmp_path, text), environ={})
    assert config.routes == (RouteConfig("/openrouter", "https://openrouter.ai/api", 2.5, None),)


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ('prefix = "/_ledger"\nurl = "http://a"', r"routes\[0\]\.prefix: '/_ledger' overlaps chatledger's own"),
        ('prefix = "/_ledger/api"\nurl = "http://a"', r"routes\[0\]\.prefix: .* overlaps chatledger's own"),
        ('prefix = "/"\nurl = "http://a"', r"routes\[0\]\.prefix: expected a path like /openai"),
        ('prefix = "openai"\nurl = "http://a"', r"routes\[0\]\.prefix: expected a path"),
        ('prefix = "/open ai"\nurl = "http://a"', r"routes\[0\]\.prefix: expected a path"),
        ('prefix = "/a/../b"\nurl = "http://a"', r"routes\[0\]\.prefix: expected a path"),
        ('prefix = "/a"\nurl = "ftp://a"', r"routes\[0\]\.url: expected an http\(s\) URL"),
        ('prefix = "/a"\nurl = "http://a/?k=1"', r"routes\[0\]\.url: must not have a query"),
        ('prefix = "/a"', r"routes\[0\]\.url: missing"),
        ('url = "http://a"', r"routes\[0\]\.prefix: missing"),
        ('prefix = "/a"\nurl = "http://a"\nread_timeout = 0', r"routes\[0\]\.read_timeout: expected a positive"),
        ('prefix = "/a"\nurl = "http://a"\nconnect_timeout = "x"', r"routes\[0\]\.connect_timeout: expected a number"),
        ('prefix = "/a"\nurl = "http://a"\nmodel = "x"', r"routes\[0\]\.model: unknown key"),
        ('prefix = 5\nurl = "http://a"', r"routes\[0\]\.prefix: expected a string"),
    ],
)
def test_bad_routes_name_their_key(tmp_path: Path, routes: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, f"[[routes]]\n{routes}\n"), environ={})


@pytest.mark.parametrize(
    ("first", "second"),
    [("/openai", "/openai"), ("/openai", "/openai/v1"), ("/openai/v1", "/openai/"), ("/a/b", "/a")],
)
def test_overlapping_routes_are_an_error_naming_both(tmp_path: Path, first: str, second: str) -> None:
    text = f'[[routes]]\nprefix = "{first}"\nurl = "http://a"\n[[routes]]\nprefix = "{second}"\nurl = "http://b"\n'
    with pytest.raises(ConfigError, match=r"^routes\[1\]\.prefix: .* overlaps routes\[0\]\.prefix"):
        load(write(tmp_path, text), environ={})


def test_prefixes_that_only_share_characters_do_not_overlap(tmp_path: Path) -> None:
    text = '[[routes]]\nprefix = "/open"\nurl = "http://a"\n[[routes]]\nprefix = "/openai"\nurl = "http://b"\n'
    assert [r.prefix for r in load(write(tmp_path, text), environ={}).routes] == ["/open", "/openai"]


def test_routes_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^routes: expected an array of tables"):
        load(write(tmp_path, "[routes]\nprefix = '/a'\n"), environ={})


def test_example_routes_block_is_a_valid_config(tmp_path: Path) -> None:
    """Uncommenting the example file's routes gives routes with every key of a route."""
    text = EXAMPLE.read_text()
    block = text[text.index("# [[routes]]") : text.index("# [pricing]")]
    uncommented = "\n".join(
        line[2:] for line in block.splitlines() if re.match(r"# (\[\[routes\]\]|[a-z_]+ = )", line)
    )
    routes = load_file(write(tmp_path, uncommented)).routes
    assert [(route.prefix, route.read_timeout) for route in routes] == [("/openai", None), ("/anthropic", 600.0)]
    keys = set(re.findall(r"^([a-z_]+) =", uncommented, re.M))
    assert keys == {field.name for field in dataclasses.fields(RouteConfig)}
