"""Configuration from the environment (engine/environment.py): every field of ``EngineConfig`` and ``ApiConfig``
(nested sections included) has a variable, a valid value round-trips, a bad one is a ``ConfigurationError``
naming the variable, secrets also come from ``<VAR>_FILE``, README's table lists every variable, and the
command line reports a bad setting in one line with exit 2.

Canaries are module constants, so no frame of the tests holds one in a local: a traceback's locals can only
show what the engine's own frames hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import threading
import traceback
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from engine import EngineConfig, cli, environment, errors
from engine.api import ApiConfig
from engine.environment import Variable
from venues.base import Venue

ROOT = Path(__file__).resolve().parents[2]
CONFIGS: tuple[type, ...] = (EngineConfig, ApiConfig)
JWT_SECRET = "CANARY-jwt-secret-from-a-file-0123456789"
SHORT_SECRET = "CANARY-short-jwt"
DB_PASSWORD = "CANARYfileDbPassw0rd"
API_BASE = {"ENGINE_API_JWT_SECRET": "x" * 32}  # ApiConfig needs a way to check tokens
JWKS_BASE = {
    "ENGINE_API_JWKS_URL": "https://idp.example/jwks",
    "ENGINE_API_ISSUER": "https://idp.example/",
    "ENGINE_API_AUDIENCE": "credential-engine",
}
KMS_BASE = {"ENGINE_MASTER_KEYS_KMS": "QUJDRA=="}  # a KmsSettings exists once a ciphertext is given

# variables whose every text is a valid value: the engine checks them when it uses them (a DSN when it
# connects, the master keys and the KMS ciphertext when it opens, a host when it binds)
FREE_TEXT = {
    "DATABASE_URL", "ENGINE_DATA_DIR", "ENGINE_MASTER_KEYS", "ENGINE_MASTER_KEYS_FILE", "ENGINE_MASTER_KEYS_KMS",
    "ENGINE_MASTER_KEYS_KMS_FILE", "ENGINE_KMS_KEY_ID", "ENGINE_KMS_REGION", "ENGINE_LISTEN_DATABASE_URL",
    "ENGINE_API_ISSUER", "ENGINE_API_AUDIENCE", "ENGINE_API_OWNER_CLAIM", "ENGINE_API_HOST",
}  # fmt: skip
# (valid text, its value) where the field checks more than its type
VALID: dict[str, tuple[str, Any]] = {
    "ENGINE_EGRESS_GROUP": ("eu-nat-1", "eu-nat-1"),
    "ENGINE_MINT_IP_ALLOWLIST": ("203.0.113.7, 2001:DB8::1", ("203.0.113.7", "2001:db8::1")),
    "ENGINE_VENUE_URLS": ("binance=http://127.0.0.1:9001", {Venue.BINANCE: "http://127.0.0.1:9001"}),
    "ENGINE_WEBHOOK_RETRY_SCHEDULE": ("0, 5,60", (0.0, 5.0, 60.0)),
    "ENGINE_JOB_TIMEOUTS": ("verify=60, purge_jobs=900.5", {"verify": 60.0, "purge_jobs": 900.5}),
    "ENGINE_KMS_ENCRYPTION_CONTEXT": ("purpose=ce,env=prod", {"purpose": "ce", "env": "prod"}),
    "ENGINE_KMS_ENDPOINT_URL": ("http://127.0.0.1:4566", "http://127.0.0.1:4566"),
    "ENGINE_API_JWT_SECRET": (JWT_SECRET, JWT_SECRET),
    "ENGINE_API_JWKS_URL": ("https://idp.example/jwks", "https://idp.example/jwks"),
    "ENGINE_API_JWT_ALGORITHMS": ("RS256, ES256", ("RS256", "ES256")),
    "ENGINE_API_TRUSTED_PROXIES": ("10.0.0.0/8, 192.0.2.7", (ipaddress.ip_network("10.0.0.0/8"),
                                                             ipaddress.ip_network("192.0.2.7/32"))),
}  # fmt: skip
# bad texts where the field checks more than its type (the type's own bad texts are made below)
INVALID: dict[str, list[str]] = {
    "ENGINE_EGRESS_GROUP": ["two words", "x" * 65],
    "ENGINE_MINT_IP_ALLOWLIST": ["203.0.113.7,not-an-address", "10.0.0.0/8"],
    "ENGINE_VENUE_URLS": ["FTX=http://x", "BINANCE=ftp://x", "BINANCE"],
    "ENGINE_WEBHOOK_RETRY_SCHEDULE": ["5, 60", "0, soon", "0, -1"],
    "ENGINE_KMS_ENDPOINT_URL": ["kms.internal:443"],
    "ENGINE_KMS_ENCRYPTION_CONTEXT": ["no-equals-sign", "=x", ","],
    "ENGINE_API_JWT_SECRET": [SHORT_SECRET],
    "ENGINE_API_JWKS_URL": ["http://idp.example/jwks"],
    "ENGINE_API_JWT_ALGORITHMS": ["HS512", "none"],
    "ENGINE_API_TRUSTED_PROXIES": ["10.0.0.0/8, proxy.internal"],
}


def engine_frames(exc: BaseException) -> str:
    """The traceback as an error tracker that captures frame locals renders it, from the first frame of the
    engine on (the test's own frames hold the test's inputs in their locals)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    rendered = traceback.TracebackException(type(exc), exc, tb, capture_locals=True)
    return "".join(rendered.format())


def every_variable() -> list[tuple[type, Variable]]:
    return [(cls, v) for cls in CONFIGS for v in environment.variables(cls)]


def leaf_paths(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every field of ``cls``, a nested configuration dataclass's fields in its place (walked here, not by the
    code under test)."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            yield from leaf_paths(inner[0], (*path, item.name))  # type: ignore[arg-type]
        else:
            yield (*path, item.name)


def value_at(config: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def base_env(variable: Variable) -> dict[str, str]:
    """What else the configuration needs for ``variable``'s value to be the one that decides."""
    base: dict[str, str] = {}
    if variable.path[0] == "kms" and variable.path[1] not in ("ciphertext", "ciphertext_file"):
        base.update(KMS_BASE)
    if variable.name.startswith("ENGINE_API_") and variable.name != "ENGINE_API_JWT_SECRET":
        base.update(API_BASE)
    if variable.name in ("ENGINE_API_JWKS_URL", "ENGINE_API_JWT_ALGORITHMS"):
        base.update({k: v for k, v in JWKS_BASE.items() if k != variable.name})
    return base


def from_env(cls: type, env: Mapping[str, str]) -> Any:
    return cls.from_env(env)  # type: ignore[attr-defined]


def valid_sample(variable: Variable) -> tuple[str, Any]:
    """A text of the variable that is valid and not the default, and the value it stands for."""
    if variable.name in VALID:
        return VALID[variable.name]
    hint = variable.type
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if inner and typing.get_origin(hint) is not tuple and len(inner) == 1:
        hint = inner[0]
    bound = variable.bound
    if hint is bool:
        value = not variable.default
        if variable.inverted:
            return ("off" if value else "on"), value
        return ("Yes" if value else "OFF"), value
    if hint is int:
        number = int(max(bound.minimum, 0)) + 3
        return f" {number} ", number
    if hint is float:
        number = bound.minimum + 2.5
        return str(number), number
    if variable.choices:
        return variable.choices[-1].lower(), variable.choices[-1]
    if hint is Path:
        return "/srv/credential-engine/x", Path("/srv/credential-engine/x")
    if hint is str:
        return "some-text", "some-text"
    raise AssertionError(f"{variable.name}: no sample for {variable.type}; add one to VALID")


def invalid_samples(variable: Variable) -> list[str]:
    """Texts of the variable that must be refused."""
    if variable.name in INVALID:
        return INVALID[variable.name]
    hint = variable.type
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple or origin is Mapping:
        pass
    elif inner and len(inner) == 1:
        hint = inner[0]
    bound = variable.bound
    below = str(bound.minimum if bound.exclusive else bound.minimum - 1)
    if hint is bool:
        return ["maybe", "2", "y"]
    if hint is int:
        bad = ["1.5", "many", below]
        return bad + ([str(int(bound.maximum) + 1)] if bound.maximum < float("inf") else [])
    if hint is float:
        return ["soon", "nan", "inf", below]
    if variable.choices:
        return ["nope"]
    if typing.get_origin(hint) is Mapping:
        return ["no-equals-sign", "=5"] + (
            ["verify=0", "verify=soon"] if typing.get_args(hint)[1] is float else []
        )
    raise AssertionError(f"{variable.name}: no bad text for {variable.type}; add one to INVALID or FREE_TEXT")


def test_every_field_has_a_variable() -> None:
    """Every field of EngineConfig and ApiConfig, nested sections included, is set by exactly one variable,
    and no two fields share one."""
    for cls in CONFIGS:
        paths = {v.path for v in environment.variables(cls)}
        assert paths == set(leaf_paths(cls)), cls.__name__
    names = [v.name for _, v in every_variable()]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert all(re.fullmatch(r"(ENGINE|DATABASE)_[A-Z0-9_]+", n) for n in names)


def test_documented_names_keep_their_meaning() -> None:
    """The names that predate the rule stay as README documents them."""
    by_path = {(cls.__name__, v.path): v.name for cls, v in every_variable()}
    assert by_path["EngineConfig", ("database_url",)] == "DATABASE_URL"
    assert by_path["EngineConfig", ("policy", "reject_withdraw")] == "ENGINE_POLICY_ALLOW_WITHDRAW"
    assert by_path["EngineConfig", ("quotas", "verify_requests_per_hour")] == "ENGINE_QUOTA_VERIFY_PER_HOUR"
    assert by_path["EngineConfig", ("kms", "ciphertext")] == "ENGINE_MASTER_KEYS_KMS"
    assert by_path["ApiConfig", ("max_body_bytes",)] == "ENGINE_API_MAX_BODY"
    assert by_path["ApiConfig", ("rate_limits", "owner_rate")] == "ENGINE_API_RATE_LIMIT"
    assert EngineConfig.from_env({"ENGINE_POLICY_ALLOW_WITHDRAW": "1"}).policy.reject_withdraw is False
    assert EngineConfig.from_env({}).policy.reject_withdraw is True


@pytest.mark.parametrize(("cls", "variable"), every_variable(), ids=lambda x: getattr(x, "name", ""))
def test_a_valid_value_round_trips(cls: type, variable: Variable) -> None:
    """A valid text of each variable becomes that field's value (converted by its type)."""
    text, expected = valid_sample(variable)
    assert expected != variable.default or variable.name in VALID, variable.name
    config = from_env(cls, {**base_env(variable), variable.name: text})
    assert value_at(config, variable.path) == expected


@pytest.mark.parametrize(("cls", "variable"), every_variable(), ids=lambda x: getattr(x, "name", ""))
def test_an_invalid_value_names_the_variable(cls: type, variable: Variable) -> None:
    """Each bad text of each variable is a ConfigurationError whose field and message name the variable."""
    if variable.name in FREE_TEXT:
        assert variable.name not in INVALID
        return
    for text in invalid_samples(variable):
        with pytest.raises(errors.ConfigurationError) as caught:
            from_env(cls, {**base_env(variable), variable.name: text})
        assert caught.value.field == variable.name, (variable.name, text)
        assert variable.name in caught.value.message, (variable.name, text)


def test_one_boolean_parser() -> None:
    """1/0, true/false, yes/no, on/off in any case; anything else is refused, naming the variable."""
    for text in ("1", "true", "YES", " on "):
        assert environment.parse_bool(text, "ENGINE_X") is True
    for text in ("0", "False", "no", "OFF"):
        assert environment.parse_bool(text, "ENGINE_X") is False
    for text in ("", "2", "y", "enabled"):
        with pytest.raises(errors.ConfigurationError) as caught:
            environment.parse_bool(text, "ENGINE_X")
        assert caught.value.field == "ENGINE_X"


def test_expiry_warning_days_bad_value_is_a_configuration_error() -> None:
    """Regression: a bad ENGINE_POLICY_EXPIRY_WARNING_DAYS was a ValueError ("internal error" on the command
    line); a negative one was accepted."""
    for text in ("soon", "7.5", "-1"):
        with pytest.raises(errors.ConfigurationError) as caught:
            EngineConfig.from_env({"ENGINE_POLICY_EXPIRY_WARNING_DAYS": text})
        assert caught.value.field == "ENGINE_POLICY_EXPIRY_WARNING_DAYS"
    assert EngineConfig.from_env({"ENGINE_POLICY_EXPIRY_WARNING_DAYS": "0"}).policy.expiry_warning_days == 0
    with pytest.raises(errors.ConfigurationError):
        EngineConfig(policy=dataclasses.replace(EngineConfig().policy, expiry_warning_days=-1))


def test_a_value_the_dataclass_refuses_names_the_variable_it_came_from() -> None:
    """A rule across fields checked by __post_init__ names the variable; an override in code names the field."""
    with pytest.raises(errors.ConfigurationError) as caught:
        EngineConfig.from_env({"ENGINE_BACKOFF_MAX": "0.5"})  # below backoff_base (1)
    assert caught.value.field == "ENGINE_BACKOFF_MAX"
    with pytest.raises(errors.ConfigurationError) as caught:
        EngineConfig.from_env({}, backoff_max=0.5)
    assert caught.value.field == "backoff_max"


# ---- secrets from files -----------------------------------------------------------------------------------


def secret_sample(variable: Variable) -> tuple[str, str]:
    """(a valid value of the secret variable, the part of it that must never show: a DSN shows all but its
    password)."""
    if variable.name == "ENGINE_API_JWT_SECRET":
        return JWT_SECRET, JWT_SECRET[:16]
    return f"postgresql://app:{DB_PASSWORD}@db/engine", DB_PASSWORD


def secret_variables() -> list[tuple[type, Variable]]:
    return [(cls, v) for cls, v in every_variable() if v.secret]


def test_every_secret_has_a_file_form() -> None:
    """Every secret field can be given as a file: its <VAR>_FILE, or (the master keys) a field of its own
    with that name (ENGINE_MASTER_KEYS_FILE, the key file provider with its permission checks)."""
    names = {v.name for _, v in every_variable()}
    secrets = {v.name for _, v in secret_variables()}
    assert {
        "DATABASE_URL",
        "ENGINE_LISTEN_DATABASE_URL",
        "ENGINE_MASTER_KEYS",
        "ENGINE_API_JWT_SECRET",
    } <= secrets
    for _, variable in secret_variables():
        file_variable = variable.name + environment.FILE_SUFFIX
        assert variable.file_variable == file_variable or file_variable in names, variable.name


@pytest.mark.parametrize(
    ("cls", "variable"),
    [(c, v) for c, v in secret_variables() if v.file_variable],
    ids=lambda x: getattr(x, "name", ""),
)
def test_a_secret_from_its_file(cls: type, variable: Variable, tmp_path: Path) -> None:
    """<VAR>_FILE: the file's content, its trailing newline stripped, kept masked in the repr."""
    text, canary = secret_sample(variable)
    path = tmp_path / "secret"
    path.write_text(text + "\n", encoding="utf-8")
    assert variable.file_variable is not None
    config = from_env(cls, {**base_env(variable), variable.file_variable: str(path)})
    assert value_at(config, variable.path) == text
    assert canary not in repr(config)


@pytest.mark.parametrize(
    ("cls", "variable"),
    [(c, v) for c, v in secret_variables() if v.file_variable],
    ids=lambda x: getattr(x, "name", ""),
)
def test_bad_secret_files_name_the_variable(cls: type, variable: Variable, tmp_path: Path) -> None:
    """Both forms set, a missing, empty, oversized or non-UTF-8 file: an error naming <VAR>_FILE, never the
    content."""
    assert variable.file_variable is not None
    secret, canary = secret_sample(variable)
    given = tmp_path / "given"
    given.write_text(secret, encoding="utf-8")
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    huge = tmp_path / "huge"
    huge.write_text(secret * 4096, encoding="utf-8")
    binary = tmp_path / "binary"
    binary.write_bytes(secret.encode() + b"\xff\xfe")
    cases = [
        ({variable.name: secret, variable.file_variable: str(given)}, "both set"),
        ({variable.file_variable: str(tmp_path / "missing")}, "cannot be read"),
        ({variable.file_variable: str(tmp_path)}, "cannot be read"),  # a directory
        ({variable.file_variable: str(empty)}, "is empty"),
        ({variable.file_variable: str(huge)}, "larger than"),
        ({variable.file_variable: str(binary)}, "not UTF-8"),
    ]
    for env, reason in cases:
        with pytest.raises(errors.ConfigurationError) as caught:
            from_env(cls, {**base_env(variable), **env})
        assert caught.value.field == variable.file_variable, reason
        assert reason in caught.value.message and variable.file_variable in caught.value.message
        rendered = engine_frames(caught.value)
        assert "from_env" in rendered  # the engine's frames are there
        assert canary not in caught.value.message + rendered, reason


def test_a_bad_secret_never_appears_in_the_error(tmp_path: Path) -> None:
    """Canary: a JWT secret too short to sign with, from the variable or from its file, is refused naming the
    variable; neither the message nor a traceback rendered with frame locals holds it."""
    path = tmp_path / "jwt"
    path.write_text(SHORT_SECRET + "\n", encoding="utf-8")
    for env in ({"ENGINE_API_JWT_SECRET": SHORT_SECRET}, {"ENGINE_API_JWT_SECRET_FILE": str(path)}):
        with pytest.raises(errors.ConfigurationError) as caught:
            ApiConfig.from_env(env)
        assert "ENGINE_API_JWT_SECRET" in str(caught.value)
        rendered = engine_frames(caught.value)
        assert "from_env" in rendered
        assert SHORT_SECRET not in rendered and SHORT_SECRET not in str(caught.value)


# ---- README ------------------------------------------------------------------------------------------------

# variables in the table that are no configuration field: the command line's own metrics listener
NOT_FIELDS = {"ENGINE_METRICS_PORT", "ENGINE_METRICS_HOST"}


def readme_variables() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            found |= set(re.findall(r"`([A-Z][A-Z0-9_]*)`", first))
    return found


def test_readme_table_lists_every_variable() -> None:
    """README's configuration table lists every variable the loop reads (secrets' _FILE forms included) and
    nothing else besides the command line's own."""
    expected = {v.name for _, v in every_variable()} | {
        v.file_variable for _, v in every_variable() if v.file_variable
    }
    table = readme_variables()
    assert sorted(expected - table) == []
    assert sorted(table - expected - NOT_FIELDS) == []


# ---- command line ------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No engine variable of the test process's own; the logging cli.main configures undone afterwards."""
    for key in list(os.environ):
        if key.startswith(("ENGINE_", "DATABASE_URL", "PG")):
            monkeypatch.delenv(key)
    yield monkeypatch
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_EngineHandler"]:
        root.removeHandler(handler)
    structlog.reset_defaults()


def test_cli_log_json_reads_every_boolean_spelling(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: the command line took only ENGINE_LOG_JSON=1 for JSON (``true`` gave console lines) while
    EngineConfig took true/yes/on too; now both use the one parser."""
    clean_env.setenv("ENGINE_API_JWT_SECRET", "x" * 32)
    clean_env.setenv("ENGINE_LOG_JSON", "true")
    assert cli.main(["token", "--owner", "o-1"]) == 0
    capsys.readouterr()
    structlog.get_logger("engine.test").warning("json_probe", n=1)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["event"] == "json_probe"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ENGINE_LOG_JSON", "maybe"),
        ("ENGINE_LOG_LEVEL", "loud"),
        ("ENGINE_POLICY_EXPIRY_WARNING_DAYS", "soon"),
        ("ENGINE_WORKERS", "-1"),
        ("ENGINE_API_PORT", "http"),
    ],
)
@pytest.mark.timeout(120)
def test_cli_reports_a_bad_setting_in_one_line(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
) -> None:
    """Regression: a bad ENGINE_POLICY_EXPIRY_WARNING_DAYS was "internal error (ValueError)", a bad
    ENGINE_LOG_JSON was ignored, a bad ENGINE_API_PORT silently replaced. Now: exit 2, one line naming the
    variable, no traceback."""
    clean_env.setenv(variable, value)
    # were the setting taken, the command would fail fast on this server (nothing listens on port 1)
    clean_env.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:1/engine")
    clean_env.setenv("ENGINE_DATA_DIR", str(tmp_path))
    command = ["serve", "--sandbox"] if variable == "ENGINE_API_PORT" else ["migrate"]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("credential-engine: error: ") and variable in err
    assert "Traceback" not in err


def test_console_script_reports_a_bad_secret_file_without_a_traceback(tmp_path: Path) -> None:
    """The installed command in a process of its own: exit 2, one line naming the variable, not the path's
    content; nothing on stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENGINE_", "DATABASE_URL", "PG"))}
    env["DATABASE_URL_FILE"] = str(tmp_path / "missing")
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "migrate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DATABASE_URL_FILE" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("cls", "variable"),
    [(c, v) for c, v in secret_variables() if v.file_variable],
    ids=lambda x: getattr(x, "name", ""),
)
def test_a_secret_pasted_into_its_file_variable_is_never_quoted(cls: type, variable: Variable) -> None:
    """Canary: the secret itself given as <VAR>_FILE (pasted into the wrong variable) is no file; the error
    names the variable but never quotes its text (the "path"), in the message or in a traceback's locals."""
    assert variable.file_variable is not None
    secret, canary = secret_sample(variable)
    with pytest.raises(errors.ConfigurationError) as caught:
        from_env(cls, {**base_env(variable), variable.file_variable: secret})
    assert caught.value.field == variable.file_variable
    assert "cannot be read" in caught.value.message
    assert canary not in caught.value.message and canary not in str(caught.value)
    assert canary not in engine_frames(caught.value)


def _unblock_fifo(path: Path) -> None:
    """Open ``path`` for writing and close it, so a reader blocked in open() sees end of file."""
    with contextlib.suppress(OSError):  # no reader is waiting
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_secret_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    """A <VAR>_FILE naming a named pipe (or a device such as /dev/stdin) would block the start in open() or
    read() until a writer came: every wait has a bound. It is refused at once, naming the variable; a symlink
    to a regular file (Kubernetes' secret volumes) still works."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            ApiConfig.from_env({"ENGINE_API_JWT_SECRET_FILE": str(fifo)})
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    blocked = worker.is_alive()
    while worker.is_alive():
        _unblock_fifo(fifo)
        worker.join(timeout=0.1)
    assert not blocked, "reading a named pipe as a secret file blocked"
    assert outcome and isinstance(outcome[0], errors.ConfigurationError)
    assert outcome[0].field == "ENGINE_API_JWT_SECRET_FILE"
    assert "not a regular file" in outcome[0].message

    target = tmp_path / "real"
    target.write_text(JWT_SECRET + "\n", encoding="utf-8")
    link = tmp_path / "link"
    link.symlink_to(target)
    config = ApiConfig.from_env({"ENGINE_API_JWT_SECRET_FILE": str(link)})
    assert config.jwt_secret == JWT_SECRET


def test_a_kms_ciphertext_file_that_is_no_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    """ENGINE_MASTER_KEYS_KMS_FILE is read when the engine opens (inside its event loop): a named pipe there
    would stall the start, so it is refused at once like the secret files, naming the variable."""
    from engine.keys import KmsSettings

    fifo = tmp_path / "kms-pipe"
    os.mkfifo(fifo)
    settings = KmsSettings(ciphertext_file=fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            settings.blob()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=10)
    blocked = worker.is_alive()
    while worker.is_alive():
        _unblock_fifo(fifo)
        worker.join(timeout=0.1)
    assert not blocked, "reading a named pipe as the KMS ciphertext file blocked"
    assert outcome and isinstance(outcome[0], errors.ConfigurationError)
    assert "not a regular file" in outcome[0].message and outcome[0].field == "ENGINE_MASTER_KEYS_KMS_FILE"
