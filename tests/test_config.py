"""Configuration: defaults, the example file, precedence (flags > environment > file > defaults), and
one-line errors that name the key, through `load()`, through `chatledger`'s main() and as a process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.cli import main
from proxy.cli.main import build_parser, config_from_args
from proxy.config import (
    ENVIRONMENT,
    Config,
    ConfigError,
    ModelPrice,
    PricingConfig,
    default_spool_dir,
    load,
    load_file,
    normalize_database_url,
    redact_url,
    sqlite_path,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
SECTIONS = ("server", "upstream", "database", "logging", "admin", "retention")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CHATLEDGER_* variable from the outer environment may leak into these tests."""
    for name in [*ENVIRONMENT, "CHATLEDGER_CONFIG"]:
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "chatledger.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and the example file ---------------------------------------------------------------------


def test_defaults() -> None:
    config = load(None, environ={})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.max_body_size == 32 * 1024 * 1024
    assert config.upstream.url == "https://openrouter.ai"
    assert config.database.url == "sqlite+aiosqlite:///chatledger.db"
    assert config.database.auto_migrate is True
    assert config.logging.all_paths is False
    assert config.admin.token == ""
    assert config.pricing.models == {}


def test_example_file_loads_to_exactly_the_defaults() -> None:
    assert load(str(EXAMPLE), environ={}) == load(None, environ={})
    assert load_file(EXAMPLE) == Config()


def _example_tables() -> dict[str, Any]:
    import tomllib

    return tomllib.loads(EXAMPLE.read_text())


def test_example_file_documents_every_field_with_a_comment() -> None:
    tables = _example_tables()
    assert set(tables) == set(SECTIONS)
    commented: set[str] = set()
    section = ""
    previous = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header.group(1)
        elif key := re.match(r"(\w+) = ", line):
            above = re.match(r"(\w+) = ", previous)  # a key right under a commented key shares its comment
            if previous.startswith("#") or (above and f"{section}.{above.group(1)}" in commented):
                commented.add(f"{section}.{key.group(1)}")
        previous = line
    for section in SECTIONS:
        fields = {f.name for f in dataclasses.fields(getattr(Config(), section))}
        assert set(tables[section]) == fields, section
        assert {f"{section}.{name}" for name in fields} <= commented, section
    text = EXAMPLE.read_text()
    for variable in [*ENVIRONMENT, "CHATLEDGER_CONFIG"]:
        assert variable in text, variable


def test_example_pricing_block_is_a_valid_config(tmp_path: Path) -> None:
    """Uncommenting the pricing example gives a config with every ModelPrice field set."""
    text = EXAMPLE.read_text()
    block = text[text.index("# [pricing]") :]
    uncommented = "\n".join(
        line[2:] for line in block.splitlines() if re.match(r"# (\[pricing|[a-z_]+ = )", line)
    )
    config = load_file(write(tmp_path, uncommented))
    [(model, price)] = config.pricing.models.items()
    assert isinstance(price, ModelPrice)
    assert {f.name for f in dataclasses.fields(ModelPrice)} <= set(
        re.findall(r"^([a-z_]+) =", uncommented, re.M)
    )
    assert all(getattr(price, f.name) is not None for f in dataclasses.fields(ModelPrice)), model
    assert dataclasses.replace(config, pricing=Config().pricing) == Config()
    for name in (f.name for f in dataclasses.fields(PricingConfig)):
        assert f"pricing.{name}" in block or re.search(rf"^# {name} = ", block, re.M), f"pricing.{name}"


# --- precedence ----------------------------------------------------------------------------------------

FILE = """
[server]
port = 1111
host = "127.0.0.2"
[upstream]
url = "http://file.example"
[database]
url = "sqlite+aiosqlite:///from-file.db"
"""


def test_file_over_defaults(tmp_path: Path) -> None:
    config = load(str(write(tmp_path, FILE)), environ={})
    assert config.server.port == 1111
    assert config.server.host == "127.0.0.2"
    assert config.upstream.url == "http://file.example"
    assert config.database.url == "sqlite+aiosqlite:///from-file.db"
    assert config.server.workers == 1  # untouched keys keep their default


def test_environment_over_file(tmp_path: Path) -> None:
    environ = {
        "CHATLEDGER_PORT": "2222",
        "CHATLEDGER_UPSTREAM_URL": "http://env.example/",
        "CHATLEDGER_DATABASE_URL": "postgresql://u:p@db/ledger",
    }
    config = load(str(write(tmp_path, FILE)), environ=environ)
    assert config.server.port == 2222
    assert config.upstream.url == "http://env.example"  # trailing slash normalised away
    assert config.database.url == "postgresql+asyncpg://u:p@db/ledger"
    assert config.server.host == "127.0.0.2"  # not set in the environment: the file's value


def test_flags_over_environment(tmp_path: Path) -> None:
    environ = {"CHATLEDGER_PORT": "2222", "CHATLEDGER_UPSTREAM_URL": "http://env.example"}
    flags = {("server", "port"): 3333, ("upstream", "url"): None, ("database", "url"): "flag.db"}
    config = load(str(write(tmp_path, FILE)), flags, environ=environ)
    assert config.server.port == 3333
    assert config.upstream.url == "http://env.example"  # a flag left unset does not override
    assert config.database.url == "sqlite+aiosqlite:///flag.db"


def test_config_file_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    assert load(None, environ={"CHATLEDGER_CONFIG": str(path)}).server.port == 1111
    other = write(tmp_path, "[server]\nport = 4444\n", "other.toml")
    # --config is a flag: it names the file even when CHATLEDGER_CONFIG names another
    assert load(str(other), environ={"CHATLEDGER_CONFIG": str(path)}).server.port == 4444


def test_empty_environment_variables_are_ignored(tmp_path: Path) -> None:
    config = load(str(write(tmp_path, FILE)), environ={"CHATLEDGER_PORT": "", "CHATLEDGER_CONFIG": ""})
    assert config.server.port == 1111


def test_precedence_through_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, FILE)
    parser = build_parser()

    def effective(*argv: str) -> Config:
        return config_from_args(parser.parse_args(["serve", *argv]))

    assert effective("--config", str(path)).server.port == 1111
    monkeypatch.setenv("CHATLEDGER_PORT", "2222")
    monkeypatch.setenv("CHATLEDGER_DATABASE_URL", str(tmp_path / "env.db"))
    config = effective("--config", str(path))
    assert (config.server.port, config.database.url) == (2222, f"sqlite+aiosqlite:///{tmp_path / 'env.db'}")
    config = effective(
        "--config",
        str(path),
        "--port",
        "3333",
        "--upstream",
        "http://flag.example",
        "--host",
        "0.0.0.0",
        "--database",
        str(tmp_path / "flag.db"),
    )
    assert config.server.port == 3333
    assert config.server.host == "0.0.0.0"
    assert config.upstream.url == "http://flag.example"
    assert config.database.url == f"sqlite+aiosqlite:///{tmp_path / 'flag.db'}"
    monkeypatch.setenv("CHATLEDGER_CONFIG", str(path))
    assert effective().upstream.url == "http://file.example"


def test_database_precedence_through_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`db status --json` reports the database it used: the effective database.url."""
    file_db, env_db, flag_db = (tmp_path / name for name in ("file.db", "env.db", "flag.db"))
    path = write(tmp_path, f'[database]\nurl = "{file_db}"\n')

    def used(*argv: str) -> str:
        assert main(["db", "status", "--json", "--config", str(path), *argv]) == 0
        return str(orjson.loads(capsys.readouterr().out)["database"])

    assert used() == f"sqlite+aiosqlite:///{file_db}"
    monkeypatch.setenv("CHATLEDGER_DATABASE_URL", str(env_db))
    assert used() == f"sqlite+aiosqlite:///{env_db}"
    assert used("--database", str(flag_db)) == f"sqlite+aiosqlite:///{flag_db}"


# --- errors name the key ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[server]\nport = "eighty"\n', "server.port"),
        ("[server]\nport = 8080.5\n", "server.port"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[server]\nport = true\n", "server.port"),
        ("[server]\nworkers = 0\n", "server.workers"),
        ('[server]\nhost = ""\n', "server.host"),
        ("[server]\nmax_body_size = 0\n", "server.max_body_size"),
        ("[server]\nshutdown_grace = -1\n", "server.shutdown_grace"),
        ("[server]\nprot = 80\n", "server.prot"),
        ("[upstream]\nurl = 'ftp://x'\n", "upstream.url"),
        ("[upstream]\nurl = 'http://x/?a=1'\n", "upstream.url"),
        ("[upstream]\nurl = 5\n", "upstream.url"),
        ("[upstream]\nread_timeout = 0\n", "upstream.read_timeout"),
        ("[upstream]\nread_timeout = nan\n", "upstream.read_timeout"),
        ("[upstream]\nconnect_timeout = inf\n", "upstream.connect_timeout"),
        ("[upstream]\nconnect_timeout = 'soon'\n", "upstream.connect_timeout"),
        ("[upstream]\nmax_connections = -1\n", "upstream.max_connections"),
        ("[database]\nurl = 'mysql://x/y'\n", "database.url"),
        ("[database]\nurl = ''\n", "database.url"),
        ("[database]\nauto_migrate = 'maybe'\n", "database.auto_migrate"),
        ("[database]\nqueue_max = 0\n", "database.queue_max"),
        ("[database]\nbatch_max = 0\n", "database.batch_max"),
        ("[database]\nwrite_timeout = -2\n", "database.write_timeout"),
        ("[logging]\nall_paths = 1\n", "logging.all_paths"),
        ("[logging]\nlevel = 'verbose'\n", "logging.level"),
        ("[admin]\ntoken = 123\n", "admin.token"),
        ("[proxy]\nport = 1\n", "proxy"),
        ("server = 1\n", "server"),
        ('[pricing.models."gpt-4o"]\nprompt = 1\n', 'pricing.models."gpt-4o".completion'),
        ('[pricing.models."gpt-4o"]\nprompt = -1\ncompletion = 1\n', 'pricing.models."gpt-4o".prompt'),
        ('[pricing.models."gpt-4o"]\nprompt = "x"\ncompletion = 1\n', 'pricing.models."gpt-4o".prompt'),
        (
            '[pricing.models."gpt-4o"]\nprompt = 1\ncompletion = 1\ninput = 2\n',
            'pricing.models."gpt-4o".input',
        ),
        ("[pricing]\ncurrency = 'EUR'\n", "pricing.currency"),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(str(write(tmp_path, text)), environ={})
    message = str(raised.value)
    assert message.startswith(key + ":") or message.startswith(key + " "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("CHATLEDGER_PORT", "http", "server.port"),
        ("CHATLEDGER_PORT", "-1", "server.port"),
        ("CHATLEDGER_UPSTREAM_URL", "openrouter.ai", "upstream.url"),
        ("CHATLEDGER_DATABASE_URL", "oracle://db", "database.url"),
    ],
)
def test_bad_environment_values_name_key_and_variable(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(None, environ={variable: value})
    message = str(raised.value)
    assert message.startswith(key)
    if variable == "CHATLEDGER_PORT" and value == "http":
        assert variable in message  # a type error says where the value came from


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file .*missing\.toml: not found$"):
        load(str(tmp_path / "missing.toml"), environ={})
    with pytest.raises(ConfigError, match=r"^config file .*bad\.toml: invalid TOML \(.*line 2.*\)$"):
        load(str(write(tmp_path, "[server]\nport = = 1\n", "bad.toml")), environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [("[server]\nport = 'x'\n", "server.port"), ("[upstream]\nurl = 'nope'\n", "upstream.url")],
)
def test_main_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str
) -> None:
    path = write(tmp_path, text)
    assert main(["db", "status", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"chatledger: config error: {key}:")


def test_main_reports_a_bad_environment_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CHATLEDGER_PORT", "eighty")
    assert main(["serve"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert (
        line
        == "chatledger: config error: server.port (from CHATLEDGER_PORT): expected an integer, got 'eighty'"
    )


def test_bad_config_exits_2_as_a_process(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\nauto_migrate = 'perhaps'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATLEDGER_")}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "chatledger: config error: database.auto_migrate: expected true or false, got 'perhaps'"
    ]
    assert not (tmp_path / "chatledger.db").exists()  # nothing was started


# --- small helpers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("ledger.db", "sqlite+aiosqlite:///ledger.db"),
        ("/var/lib/ledger.db", "sqlite+aiosqlite:////var/lib/ledger.db"),
        ("sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("postgres://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("  sqlite+aiosqlite:///y.db ", "sqlite+aiosqlite:///y.db"),
    ],
)
def test_database_urls_are_normalised(given: str, normalised: str) -> None:
    assert normalize_database_url(given) == normalised


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql+asyncpg://ledger:s3cret@db:5432/ledger") == (
        "postgresql+asyncpg://ledger:***@db:5432/ledger"
    )
    assert redact_url("sqlite+aiosqlite:///chatledger.db") == "sqlite+aiosqlite:///chatledger.db"
    assert redact_url("postgresql+asyncpg://ledger@db/ledger") == "postgresql+asyncpg://ledger@db/ledger"


def test_spool_dir_defaults(tmp_path: Path) -> None:
    sqlite_config = Config().replace("database", url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}").database
    assert default_spool_dir(sqlite_config) == tmp_path / "a.db.spool"
    assert sqlite_path(sqlite_config.url) == tmp_path / "a.db"
    postgres_config = Config().replace("database", url="postgresql+asyncpg://h/d").database
    assert default_spool_dir(postgres_config) == Path("chatledger-spool")
    assert sqlite_path("sqlite+aiosqlite:///:memory:") is None
    explicit = Config().replace("database", spool_dir=str(tmp_path / "s")).database
    assert default_spool_dir(explicit) == tmp_path / "s"
