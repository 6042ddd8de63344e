"""Canaries for the configuration's secrets: master keys, the JWT secret and the database password never
appear in ``repr``/``str`` of a configuration, in a logged configuration, in :func:`engine.logs.redact`'s
output, or in a traceback rendered with frame locals (what error trackers capture by default).

Every canary is a module constant (or built inside the code under test), so no frame of the tests themselves
holds one in a local: a traceback's locals can only show what the engine's own frames hold.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import structlog

from engine import CredentialEngine, EngineConfig, errors, logs
from engine.api import ApiConfig
from engine.crypto import MasterKeyring

MASTER_KEY_1 = base64.b64encode(b"CANARY-master-key-number-one-32b").decode()
MASTER_KEY_2 = base64.b64encode(b"CANARY-master-key-number-two-32b").decode()
MASTER_SPEC = f"1:{MASTER_KEY_1},2:{MASTER_KEY_2}"
JWT_SECRET = "CANARY-jwt-secret-a1b2c3d4e5f6a7b8c9d0"
SHORT_JWT_SECRET = "CANARY-short-jwt"
DB_PASSWORD = "CANARYdbPassw0rd"
DSN = f"postgresql://app:{DB_PASSWORD}@db.internal:5432/engine"
UNREACHABLE_DSN = f"postgresql://app:{DB_PASSWORD}@127.0.0.1:1/engine"
CANARIES = (MASTER_KEY_1, MASTER_KEY_2, JWT_SECRET, SHORT_JWT_SECRET, DB_PASSWORD)


def leaks(text: str) -> list[str]:
    """Every canary (or a 16-character piece of one) found in ``text``."""
    found = []
    for canary in CANARIES:
        pieces = {canary, canary[:16], canary[-16:]}
        found += [piece for piece in pieces if piece in text]
    return found


def with_password(dsn: str, password: str) -> str:
    """The test database's DSN with a password in it (the embedded server trusts its socket, the test-postgres
    cluster its loopback: it is ignored). The host keeps its port."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, f"{user}:{password}@{host}", parts.path, parts.query, ""))


def with_locals(exc: BaseException) -> str:
    """The traceback as an error tracker that captures frame locals renders it."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """The engine's logging configured at DEBUG into a buffer; restored afterwards."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure_logging("DEBUG", stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)


# ---- repr and str ------------------------------------------------------------------------------------------


def test_config_reprs_show_versions_and_masked_dsn_only() -> None:
    """repr/str of EngineConfig and ApiConfig (built directly, from the environment, or replaced) hold no
    secret: the master keys as their versions, the DSN with its password masked, the JWT secret not at all."""
    built = EngineConfig(database_url=DSN, master_keys=MASTER_SPEC)
    from_env = EngineConfig.from_env({"DATABASE_URL": DSN, "ENGINE_MASTER_KEYS": MASTER_SPEC})
    replaced = dataclasses.replace(EngineConfig(), database_url=DSN, master_keys=MASTER_SPEC)
    copied = pickle.loads(pickle.dumps(built))  # noqa: S301 - our own bytes, made one line above
    api = ApiConfig(jwt_secret=JWT_SECRET)
    api_env = ApiConfig.from_env({"ENGINE_API_JWT_SECRET": JWT_SECRET})
    for config in (built, from_env, replaced, copied):
        for text in (repr(config), str(config), f"{config}", f"{config!r}"):
            assert not leaks(text), text
            assert "database_url='postgresql://app:***@db.internal:5432/engine'" in text
            assert "master_keys='<master keys: versions 1, 2>'" in text
    for config in (api, api_env):
        assert not leaks(repr(config)) and not leaks(str(config))
    # the values themselves are intact: the engine and the driver use them as they are
    assert built.master_keys == MASTER_SPEC and built.database_url == DSN and api.jwt_secret == JWT_SECRET
    assert MasterKeyring.from_spec(built.master_keys).versions == (1, 2)


# ---- logs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_mode", [False, True], ids=["console", "json"])
def test_logged_configuration_holds_no_secret(json_mode: bool) -> None:
    """A configuration logged whole, its fields logged by name, and the environment rendered into a message:
    nothing of any secret reaches the output, through structlog or the standard library."""
    stream = io.StringIO()
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure_logging("DEBUG", json=json_mode, stream=stream)
        engine_config = EngineConfig(database_url=DSN, master_keys=MASTER_SPEC)
        api_config = ApiConfig(jwt_secret=JWT_SECRET)
        log = structlog.get_logger("app")
        log.info("starting", config=engine_config, api=api_config, settings=dataclasses.asdict(engine_config))
        log.info(
            "settings",
            master_keys=MASTER_SPEC,
            ENGINE_MASTER_KEYS=MASTER_SPEC,
            kek=MASTER_KEY_1,
            keys=[MASTER_KEY_1, MASTER_KEY_2],
            database_url=DSN,
            dsn=DSN,
            jwt_secret=JWT_SECRET,
            token=JWT_SECRET,
            headers={"Authorization": f"Bearer {JWT_SECRET}"},
            value=engine_config.master_keys,  # a masked value under an innocent name
        )
        logging.getLogger("app.std").info("config %s and %r", engine_config, api_config)
        logging.getLogger("app.std").warning(
            "environment: %s",
            {"ENGINE_MASTER_KEYS": MASTER_SPEC, "DATABASE_URL": DSN, "ENGINE_API_JWT_SECRET": JWT_SECRET},
        )
        logging.getLogger("app.std").error(f"cannot connect to {DSN} (master keys {MASTER_SPEC})")
    finally:
        structlog.reset_defaults()
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert not leaks(text), text
    assert "postgresql://app:***@db.internal:5432/engine" in text  # the DSN stays useful, its password gone
    if json_mode:
        assert all(json.loads(line) for line in text.splitlines())


def test_redact_treats_master_kek_keys_dsn_jwt_and_tokens_as_secret() -> None:
    """logs.redact() on its own: secret names, DSN names, secret values under innocent names."""
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlLW9mLWEtdG9rZW4"
    event = {
        "event": f"rotated to {MASTER_SPEC}; DATABASE_URL={DSN}",
        "master_keys": MASTER_SPEC,
        "MASTER_KEY": MASTER_KEY_1,
        "kek": MASTER_KEY_2,
        "keys": {"1": MASTER_KEY_1},
        "jwt_secret": JWT_SECRET,
        "api_jwt_secret": JWT_SECRET,
        "dsn": DSN,
        "database_url": UNREACHABLE_DSN,
        "db_url": f"host=db user=app password={DB_PASSWORD}",
        "conninfo": f"host=db user=app password='{DB_PASSWORD} x'",
        "url": f"postgres://app:{DB_PASSWORD}@db/x",
        "note": f"postgresql://app:p@{DB_PASSWORD}@db/x and {{'password': '{DB_PASSWORD}'}}",
        "access_token": token,
        "message": f"got {token} from the client",
        "Authorization": f"Bearer {JWT_SECRET}",
        "headers": {"authorization": f"Basic {base64.b64encode(b'app:' + DB_PASSWORD.encode()).decode()}"},
        "raw_header": f"Authorization: Bearer {JWT_SECRET}",
        "master_key_versions": [1, 2],
        "kek_version": 2,
    }
    cleaned = logs.redact(None, "info", event)
    text = repr(cleaned)
    assert not leaks(text), text
    assert token[:20] not in text
    assert base64.b64encode(b"app:" + DB_PASSWORD.encode()).decode() not in text
    assert cleaned["master_key_versions"] == [1, 2] and cleaned["kek_version"] == 2  # metadata is kept
    assert cleaned["dsn"] == "postgresql://app:***@db.internal:5432/engine"
    assert cleaned["db_url"] == "host=db user=app password=***"


# ---- tracebacks rendered with frame locals -----------------------------------------------------------------


def _user_code_with_a_config() -> None:
    config = EngineConfig(database_url=DSN, master_keys=MASTER_SPEC)  # an application's local
    api = ApiConfig(jwt_secret=JWT_SECRET)
    raise RuntimeError(f"startup failed with {config.workers} workers on port {api.port}")


def _engine_config_from_a_bad_environment() -> None:
    EngineConfig.from_env({"DATABASE_URL": DSN, "ENGINE_MASTER_KEYS": MASTER_SPEC, "ENGINE_WORKERS": "many"})


def _api_config_with_a_bad_port() -> None:
    ApiConfig.from_env({"ENGINE_API_JWT_SECRET": JWT_SECRET, "ENGINE_API_PORT": "99999"})


def _api_config_with_a_short_secret() -> None:
    ApiConfig.from_env({"ENGINE_API_JWT_SECRET": SHORT_JWT_SECRET})


def _engine_config_refused_in_post_init() -> None:
    EngineConfig.from_env({"DATABASE_URL": DSN, "ENGINE_MASTER_KEYS": MASTER_SPEC}, workers=-1)


def _broken_master_key_spec() -> None:
    MasterKeyring.from_spec(f"1:{MASTER_KEY_1},2:{MASTER_KEY_2[:-4]}")  # the second key is cut short


SYNC_FAILURES: list[Callable[[], None]] = [
    _user_code_with_a_config,
    _engine_config_from_a_bad_environment,
    _api_config_with_a_bad_port,
    _api_config_with_a_short_secret,
    _engine_config_refused_in_post_init,
    _broken_master_key_spec,
]


@pytest.mark.parametrize("failing", SYNC_FAILURES, ids=lambda f: f.__name__.strip("_"))
def test_tracebacks_with_locals_hold_no_secret(failing: Callable[[], None]) -> None:
    """Configuration failures (and an application frame holding a configuration), rendered with locals."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - each case raises its own kind
        failing()
    text = with_locals(caught.value)
    assert not leaks(text), text
    assert "Traceback" in text and " = " in text  # the locals were rendered: the check is not vacuous


async def test_engine_open_failures_with_locals_hold_no_secret(database_url: str) -> None:
    """The engine failing to open (database unreachable; a broken master key spec after the database opened):
    the tracebacks through CredentialEngine's frames, rendered with locals, show only masked values."""
    unreachable = CredentialEngine(EngineConfig(database_url=UNREACHABLE_DSN, master_keys=MASTER_SPEC))
    with pytest.raises(errors.StorageError) as caught:
        await unreachable.open()
    text = with_locals(caught.value)
    assert not leaks(text), text
    assert "postgresql://app:***@127.0.0.1:1/engine" in text  # the DSN local, masked
    broken = CredentialEngine(
        EngineConfig(
            database_url=with_password(database_url, DB_PASSWORD), master_keys=f"1:{MASTER_KEY_1},2:nope"
        )
    )
    with pytest.raises(errors.ConfigurationError) as refused:
        await broken.open()
    text = with_locals(refused.value)
    assert not leaks(text), text
    assert "_open" in text and "<master keys: versions 1, 2>" in text


async def test_a_running_engine_logs_no_configuration_secret(
    database_url: str, log_output: io.StringIO, tmp_path: Any
) -> None:
    """An engine opened with a password in its DSN and canary master keys, used and closed, at DEBUG."""
    config = EngineConfig(
        database_url=with_password(database_url, DB_PASSWORD),
        master_keys=MASTER_SPEC,
        data_dir=tmp_path,
        workers=1,
        poll_interval=0.2,
    )
    async with CredentialEngine(config) as eng:
        structlog.get_logger("app").info("engine", engine=repr(eng), config=eng.config)
        await eng.run_until_idle()
    text = log_output.getvalue()
    assert "engine_open" in text
    assert not leaks(text), text
