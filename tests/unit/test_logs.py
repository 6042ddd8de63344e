"""Logging configuration and redaction (engine/logs.py): secrets never reach the rendered output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog

from engine import errors, logs
from venues.base import ApiKeys

CANARY = "CANARY-9d1f-secret-value"
API_KEY = "PUBKEY-abcdefghijklmnop"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test configures logging globally; put structlog and the root logger back afterwards."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.contextvars.clear_contextvars()


def configured(*, json_mode: bool, level: str = "DEBUG") -> io.StringIO:
    stream = io.StringIO()
    logs.configure_logging(level, json=json_mode, stream=stream)
    return stream


def failing_with_secret_local() -> None:
    api_secret = CANARY  # a frame local that a locals-showing traceback would print
    raise RuntimeError(f"signing failed ({len(api_secret)} chars)")


MODES = pytest.mark.parametrize("json_mode", [False, True], ids=["console", "json"])


@MODES
def test_sensitive_fields_are_redacted(json_mode: bool) -> None:
    """Fields named like secrets print ``***``; api_key prints masked; metadata names are kept."""
    out = configured(json_mode=json_mode)
    structlog.get_logger("t").info(
        "stored",
        api_secret=CANARY,
        Password=CANARY,
        api_passphrase=CANARY,
        private_key=CANARY,
        signature=CANARY,
        Authorization=f"Bearer {CANARY}",
        access_token=CANARY,
        cookie=CANARY,
        api_key=API_KEY,
        secret_version=7,
        masked_api_key="PUBKEY-***",
    )
    text = out.getvalue()
    assert CANARY not in text
    assert API_KEY not in text
    assert "PUBKEY-***" in text
    assert "***" in text
    assert any(shown in text for shown in ("secret_version=7", '"secret_version": 7'))


@MODES
def test_nested_secrets_are_redacted(json_mode: bool) -> None:
    """Secrets inside nested dicts and lists (e.g. venue request headers) are redacted too."""
    out = configured(json_mode=json_mode)
    structlog.get_logger("t").warning(
        "request",
        request={
            "headers": {"OK-ACCESS-SIGN": CANARY, "OK-ACCESS-PASSPHRASE": CANARY, "X-MBX-APIKEY": API_KEY},
            "attempts": [{"secret": CANARY}, ("token", {"password": CANARY})],
        },
    )
    text = out.getvalue()
    assert CANARY not in text
    assert API_KEY not in text
    assert "OK-ACCESS-SIGN" in text


@MODES
def test_api_keys_objects_render_redacted(json_mode: bool) -> None:
    """An ApiKeys anywhere in the event prints as its redacted repr."""
    keys = ApiKeys(api_key=API_KEY, api_secret=CANARY, api_passphrase=CANARY)
    out = configured(json_mode=json_mode)
    structlog.get_logger("t").info("probing", keys=keys, batch=[{"k": keys}], event_keys=(keys,))
    text = out.getvalue()
    assert CANARY not in text
    assert API_KEY not in text
    assert "ApiKeys(api_key=" in text


@MODES
def test_exception_frame_locals_never_rendered(json_mode: bool) -> None:
    """A traceback whose frame holds the secret in a local prints the trace, never the locals."""
    out = configured(json_mode=json_mode)
    try:
        failing_with_secret_local()
    except RuntimeError:
        structlog.get_logger("t").exception("probe_crashed")
    text = out.getvalue()
    assert "failing_with_secret_local" in text  # the traceback is there
    assert "signing failed" in text
    assert CANARY not in text


@MODES
def test_registered_secret_scrubbed_from_exception_text(json_mode: bool) -> None:
    """A registered secret inside an exception message is replaced in the rendered traceback."""
    out = configured(json_mode=json_mode)
    with logs.secret_scope(CANARY):
        try:
            raise ValueError(f"venue rejected {CANARY}")
        except ValueError:
            structlog.get_logger("t").error("failed", exc_info=True)
    text = out.getvalue()
    assert "venue rejected ***" in text
    assert CANARY not in text


@MODES
def test_stdlib_records_pass_through_redaction(json_mode: bool) -> None:
    """aiohttp/asyncpg records (standard logging) are rendered by the same redacting processors."""
    out = configured(json_mode=json_mode)
    with logs.secret_scope(CANARY):
        logging.getLogger("aiohttp.client").warning("request to %s failed: %s", "https://x/api", CANARY)
    logging.getLogger("asyncpg").error("cannot connect to postgresql://app:%s@db:5432/engine", CANARY)
    try:
        failing_with_secret_local()
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("handler crashed")
    text = out.getvalue()
    assert CANARY not in text
    assert "postgresql://app:***@db:5432/engine" in text
    assert "request to https://x/api failed: ***" in text
    assert "handler crashed" in text
    assert "failing_with_secret_local" in text


@MODES
def test_secrets_in_free_text_patterns_are_scrubbed(json_mode: bool) -> None:
    """DSN passwords, key=value secrets, bearer tokens, webhook secrets and PEM keys are cut from strings."""
    out = configured(json_mode=json_mode)
    pem = f"-----BEGIN EC PRIVATE KEY-----\n{CANARY}\n-----END EC PRIVATE KEY-----\n"
    structlog.get_logger("t").info(
        f"GET /api?timestamp=1&signature={CANARY}",
        dsn=f"postgresql://user:{CANARY}@localhost/db",
        libpq=f"host=db user=app password={CANARY} dbname=x",
        header=f"Authorization: Bearer {CANARY}",
        webhook=f"whsec_{CANARY}",
        pem=pem,
    )
    text = out.getvalue()
    assert CANARY not in text
    assert "postgresql://user:***@localhost/db" in text
    assert "signature=***" in text


@MODES
def test_contextvars_are_merged_and_redacted(json_mode: bool) -> None:
    """Context bound with contextvars is rendered, and redacted like any field."""
    out = configured(json_mode=json_mode)
    structlog.contextvars.bind_contextvars(job_id="job-42", api_secret=CANARY)
    structlog.get_logger("t").info("working")
    text = out.getvalue()
    assert "job-42" in text
    assert CANARY not in text


def test_other_root_handlers_only_see_redacted_engine_events() -> None:
    """structlog events are redacted before they reach logging, so a foreign handler cannot leak them."""
    configured(json_mode=False)
    foreign = io.StringIO()
    handler = logging.StreamHandler(foreign)
    logging.getLogger().addHandler(handler)
    keys = ApiKeys(api_key=API_KEY, api_secret=CANARY)
    try:
        failing_with_secret_local()
    except RuntimeError:
        structlog.get_logger("t").exception("crashed", api_secret=CANARY, keys=keys)
    logging.getLogger().removeHandler(handler)
    assert "crashed" in foreign.getvalue()
    assert CANARY not in foreign.getvalue()
    assert API_KEY not in foreign.getvalue()


def test_json_mode_writes_one_valid_object_per_line() -> None:
    """Every JSON-mode line parses, exceptions included, and carries event, level, logger and timestamp."""
    out = configured(json_mode=True)
    log = structlog.get_logger("engine.test")
    log.info("first", n=1, data=b"\x00\xff", multi="line\nbreak")
    try:
        failing_with_secret_local()
    except RuntimeError:
        log.exception("second")
    logging.getLogger("asyncpg").warning("third %d", 3)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    parsed = [json.loads(line) for line in lines]
    assert [p["event"] for p in parsed] == ["first", "second", "third 3"]
    assert [p["level"] for p in parsed] == ["info", "error", "warning"]
    assert parsed[0]["logger"] == "engine.test"
    assert parsed[0]["data"] == "<2 bytes>"
    assert all("timestamp" in p for p in parsed)
    frames = parsed[1]["exception"][0]["frames"]
    assert all(frame.get("locals") is None for frame in frames)


def test_level_filters_and_bad_level_is_a_configuration_error() -> None:
    """Events below the level are dropped; an unknown level names the setting."""
    out = configured(json_mode=True, level="warning")
    structlog.get_logger("t").info("hidden")
    logging.getLogger("aiohttp").info("hidden too")
    structlog.get_logger("t").warning("shown")
    assert [json.loads(line)["event"] for line in out.getvalue().splitlines()] == ["shown"]
    with pytest.raises(errors.ConfigurationError, match="log level"):
        logs.configure_logging("LOUD")


def test_reconfiguring_replaces_the_handler() -> None:
    """Calling configure_logging twice writes each record once, to the latest stream only."""
    first = configured(json_mode=True)
    second = configured(json_mode=True)
    structlog.get_logger("t").info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_secret_scope_is_reference_counted_and_ends() -> None:
    """Nested scopes keep a value registered until the outer one exits; afterwards it is not replaced."""
    value = "harmless-marker-value"
    with logs.secret_scope(value):
        with logs.secret_scope(value):
            pass
        assert logs.redact(None, "info", {"event": value})["event"] == "***"
    assert logs.redact(None, "info", {"event": value})["event"] == value


def test_secret_scope_masks_api_key_and_hides_secret_parts() -> None:
    """Scoping an ApiKeys hides its secret and passphrase and shows its API key masked in free text."""
    keys = ApiKeys(api_key=API_KEY, api_secret=CANARY, api_passphrase="pass-phrase-x")
    with logs.secret_scope(keys, None):
        event = logs.redact(None, "info", {"event": f"{API_KEY} {CANARY} pass-phrase-x"})
    assert event["event"] == "PUBKEY-*** *** ***"


def test_registry_is_bounded_and_ignores_tiny_values() -> None:
    """Beyond its capacity the registry forgets the oldest value; values too short to scrub are ignored."""
    registry = logs.SecretRegistry(capacity=2)
    for value in ("first-secret", "second-secret", "third-secret"):
        registry.add(value)
    assert len(registry) == 2
    assert registry.scrub("first-secret second-secret third-secret") == "first-secret *** ***"
    registry.add("abc")
    assert len(registry) == 2
    assert "secret" not in repr(registry)
    registry.discard("third-secret")
    assert registry.scrub("third-secret") == "third-secret"


def test_longer_secret_replaced_whole_before_its_substring() -> None:
    """A registered value containing another registered value is replaced whole, not partially."""
    registry = logs.SecretRegistry()
    registry.add("abcd-1234")
    registry.add("abcd-1234-efgh-5678")
    assert registry.scrub("x abcd-1234-efgh-5678 y") == "x *** y"


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError(CANARY)


class _BrokenMapping(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError(CANARY)

    def __len__(self) -> int:
        return 1


def test_redaction_never_raises_and_fails_closed() -> None:
    """A value that cannot be rendered becomes a placeholder; if cleaning fails the content is dropped."""
    event = logs.redact(None, "info", {"event": "x", "thing": _BadRepr()})
    assert event == {"event": "x", "thing": "<unrepresentable _BadRepr>"}
    failed = logs.redact(None, "error", {"event": CANARY, "level": "error", "bad": _BrokenMapping()})
    assert failed["event"] == "log_redaction_failed"
    assert CANARY not in repr(failed)


def test_broken_values_do_not_break_rendering() -> None:
    """A broken repr or absurd nesting still yields one rendered line rather than an error."""
    out = configured(json_mode=True)
    structlog.get_logger("t").info("odd", thing=_BadRepr(), deep=[[[[[[[[[["too deep"]]]]]]]]]])
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["thing"] == "<unrepresentable _BadRepr>"
    assert "<nested too deep>" in line
