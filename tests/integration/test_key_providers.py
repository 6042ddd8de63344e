"""Master keys from a key provider (engine/keys/providers.py): the environment, a file, AWS KMS (a real KMS server
on loopback: moto's ThreadedMotoServer, reached by aiobotocore over HTTP), and a provider of the caller's own."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from engine import CredentialEngine, EngineConfig, errors, logs
from engine.crypto import MasterKeyring
from engine.keys import AwsKmsKeys, EnvironmentKeys, KeyFile, KeyProvider, KmsSettings
from venues.base import Venue

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
KEY_1 = base64.b64encode(b"CANARY-kms-master-key-number-1-!").decode()
KEY_2 = base64.b64encode(b"CANARY-kms-master-key-number-2-!").decode()
SPEC = f"1:{KEY_1},2:{KEY_2}"
CONTEXT = {"purpose": "credential-engine-master-keys", "env": "test"}


def leaks(text: str) -> list[str]:
    """Every canary form found in ``text``: each key, a 16-character piece of it, the spec's base64."""
    forms = [KEY_1, KEY_2, KEY_1[:16], KEY_2[-16:], base64.b64encode(SPEC.encode()).decode()[:24]]
    forms += [base64.b64encode(f"1:{KEY_1}".encode()).decode()[8:32]]
    return [form for form in forms if form in text]


def with_locals(exc: BaseException) -> str:
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


async def store_and_read(eng: CredentialEngine, owner: str = "o-1") -> str:
    cred = await eng.create_credential(
        owner, venue=Venue.BINANCE, api_key="kms-key-0001", api_secret="kms-secret-1"
    )
    return str(cred.credential_id)


# ---- the environment and a file -----------------------------------------------------------------------------


def test_from_env_reads_each_way_and_refuses_two(tmp_path: Path) -> None:
    """ENGINE_MASTER_KEYS_FILE and the KMS variables land in EngineConfig; two ways at once are refused when the
    engine picks its provider; a bad KMS setting names its variable."""
    cfg = EngineConfig.from_env({"ENGINE_MASTER_KEYS_FILE": str(tmp_path / "k")})
    assert cfg.master_keys_file == tmp_path / "k" and cfg.kms is None
    cfg = EngineConfig.from_env(
        {
            "ENGINE_MASTER_KEYS_KMS": "QUJD",
            "ENGINE_KMS_KEY_ID": "alias/ce",
            "ENGINE_KMS_REGION": "eu-west-1",
            "ENGINE_KMS_ENCRYPTION_CONTEXT": "purpose=x,env=prod",
            "ENGINE_KMS_TIMEOUT": "3",
        }
    )
    assert cfg.kms == KmsSettings(
        ciphertext="QUJD", key_id="alias/ce", region="eu-west-1", encryption_context={"purpose": "x", "env": "prod"},
        timeout=3.0,
    )  # fmt: skip
    with pytest.raises(errors.ConfigurationError) as bad:
        EngineConfig.from_env({"ENGINE_MASTER_KEYS_KMS": "QUJD", "ENGINE_KMS_ENCRYPTION_CONTEXT": "novalue"})
    assert bad.value.field == "ENGINE_KMS_ENCRYPTION_CONTEXT"
    with pytest.raises(errors.ConfigurationError) as bad:
        EngineConfig.from_env({"ENGINE_MASTER_KEYS_KMS": "QUJD", "ENGINE_MASTER_KEYS_KMS_FILE": "/x"})
    assert "exactly one" in bad.value.message


async def test_two_ways_at_once_are_refused(database_url: str, tmp_path: Path) -> None:
    config = EngineConfig(
        database_url=database_url, master_keys=SPEC, master_keys_file=tmp_path / "k", data_dir=tmp_path
    )
    with pytest.raises(errors.ConfigurationError) as refused:
        await CredentialEngine(config).open()
    assert "more than once" in refused.value.message and "ENGINE_MASTER_KEYS_FILE" in refused.value.message
    assert not leaks(with_locals(refused.value))


async def test_a_key_file_opens_the_same_credentials_as_the_environment(
    make_engine: Any, tmp_path: Path
) -> None:
    """Keys stored with ENGINE_MASTER_KEYS open with the same spec from ENGINE_MASTER_KEYS_FILE (0600)."""
    first = await make_engine(master_keys=SPEC)
    cid = await store_and_read(first)
    path = tmp_path / "keys" / "master.keys"
    path.parent.mkdir(mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (SPEC + "\n").encode())
    os.close(fd)
    second = await make_engine(master_keys=None, master_keys_file=path)
    keys = await second.reveal_keys("o-1", cid)
    assert keys.api_secret == "kms-secret-1"


@pytest.mark.parametrize("problem", ["readable by others", "symbolic link", "missing"])
async def test_a_key_file_is_refused_like_the_generated_one(problem: str, tmp_path: Path) -> None:
    """The file provider refuses what the zero-config key file refuses, naming ENGINE_MASTER_KEYS_FILE."""
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    real = folder / "real.keys"
    real.write_text(SPEC)
    real.chmod(0o600)
    path = real
    if problem == "readable by others":
        real.chmod(0o644)
    elif problem == "symbolic link":
        path = folder / "link.keys"
        path.symlink_to(real)
    else:
        path = folder / "absent.keys"
    with pytest.raises(errors.ConfigurationError) as refused:
        await KeyFile(path).load()
    assert refused.value.field == "ENGINE_MASTER_KEYS_FILE"
    assert (
        refused.value.message.startswith("ENGINE_MASTER_KEYS_FILE: ") and str(path) in refused.value.message
    )
    assert not leaks(with_locals(refused.value))


class PrefixedEnvironment:
    """A provider of the caller's own (as a Vault transit or GCP KMS one would be): two members."""

    source = "the test's provider"

    def __init__(self, spec: str) -> None:
        self._spec = spec

    async def load(self) -> MasterKeyring:
        return MasterKeyring.from_spec(self._spec, setting=self.source)


async def test_a_provider_of_ones_own(make_engine: Any, database_url: str, tmp_path: Path) -> None:
    """CredentialEngine(key_provider=...) takes any object with source and load(); given with configured master
    keys it is refused (which keys encrypt would be unclear)."""
    provider = PrefixedEnvironment(SPEC)
    assert isinstance(provider, KeyProvider) and isinstance(EnvironmentKeys(SPEC), KeyProvider)
    first = await make_engine(master_keys=SPEC)
    cid = await store_and_read(first)
    eng = CredentialEngine(
        EngineConfig(database_url=database_url, data_dir=tmp_path, workers=0), key_provider=provider
    )
    async with eng:
        assert (await eng.reveal_keys("o-1", cid)).api_secret == "kms-secret-1"
    both = CredentialEngine(EngineConfig(database_url=database_url, master_keys=SPEC), key_provider=provider)
    with pytest.raises(errors.ConfigurationError, match="only one"):
        await both.open()


# ---- AWS KMS, served by moto on loopback --------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for the test server (moto accepts any); never the machine's own."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_SESSION_TOKEN", "testing"), ("AWS_DEFAULT_REGION", REGION)):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
async def kms_keys(kms_server: str, aws_env: None) -> tuple[str, str]:
    """Two symmetric KMS keys on the test server: (the keyring's key, another key)."""
    async with get_session().create_client("kms", region_name=REGION, endpoint_url=kms_server) as kms:
        first = (await kms.create_key(Description="credential-engine master keys"))["KeyMetadata"]["KeyId"]
        other = (await kms.create_key(Description="another key"))["KeyMetadata"]["KeyId"]
    return first, other


async def encrypt(kms_server: str, key_id: str, context: dict[str, str]) -> str:
    async with get_session().create_client("kms", region_name=REGION, endpoint_url=kms_server) as kms:
        blob = (await kms.encrypt(KeyId=key_id, Plaintext=SPEC.encode(), EncryptionContext=context))[
            "CiphertextBlob"
        ]
    return base64.b64encode(blob).decode()


def settings(kms_server: str, ciphertext: str, **overrides: Any) -> KmsSettings:
    fields: dict[str, Any] = {
        "ciphertext": ciphertext, "region": REGION, "endpoint_url": kms_server, "encryption_context": CONTEXT,
        "timeout": 10.0, **overrides,
    }  # fmt: skip
    return KmsSettings(**fields)


async def test_an_engine_whose_keyring_lives_only_in_kms_form(
    make_engine: Any, kms_server: str, kms_keys: tuple[str, str]
) -> None:
    """The keyring exists only as a KMS ciphertext: the engine decrypts it at start and opens what an engine
    holding the same spec in ENGINE_MASTER_KEYS stored; and what it stores opens there too."""
    key_id, _ = kms_keys
    ciphertext = await encrypt(kms_server, key_id, CONTEXT)
    assert KEY_1 not in ciphertext
    plain = await make_engine(master_keys=SPEC)
    cid = await store_and_read(plain)
    kms_engine = await make_engine(master_keys=None, kms=settings(kms_server, ciphertext, key_id=key_id))
    assert (await kms_engine.reveal_keys("o-1", cid)).api_secret == "kms-secret-1"
    other = await kms_engine.create_credential(
        "o-2", venue=Venue.BINANCE, api_key="kms-key-0002", api_secret="s-2"
    )
    assert (await plain.reveal_keys("o-2", other.credential_id)).api_secret == "s-2"


async def test_the_cli_encrypts_a_keyring_that_opens_an_engine(
    make_engine: Any, kms_server: str, kms_keys: tuple[str, str], tmp_path: Path
) -> None:
    """`credential-engine keys encrypt --kms-key-id ... --input FILE` (a real process): the base64 it prints
    is ENGINE_MASTER_KEYS_KMS; stdout and stderr hold no key; --add-version adds version 3 to it."""
    key_id, _ = kms_keys
    source = tmp_path / "spec"
    source.write_text(SPEC)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ENGINE_KMS_ENDPOINT_URL": kms_server,
        "ENGINE_KMS_REGION": REGION,
    }

    async def run(*argv: str, extra: dict[str, str] | None = None) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.cli", "keys", "encrypt", "--kms-key-id", key_id, *argv,
            env={**env, **(extra or {})}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 0, err.decode()
        return out.decode(), err.decode()

    out, err = await run("--input", str(source), "--context", "purpose=credential-engine-master-keys",
                         "--context", "env=test")  # fmt: skip
    assert not leaks(out + err), out + err
    assert (
        "versions 1, 2" in err
        and "ENGINE_KMS_ENCRYPTION_CONTEXT=purpose=credential-engine-master-keys,env=test" in err
    )
    ciphertext = out.strip()
    plain = await make_engine(master_keys=SPEC)
    cid = await store_and_read(plain)
    eng = await make_engine(master_keys=None, kms=settings(kms_server, ciphertext, key_id=key_id))
    assert (await eng.reveal_keys("o-1", cid)).api_secret == "kms-secret-1"

    out, err = await run("--add-version", "--context", "purpose=credential-engine-master-keys",
                         "--context", "env=test",
                         extra={"ENGINE_MASTER_KEYS_KMS": ciphertext, "ENGINE_KMS_ENCRYPTION_CONTEXT":
                                "purpose=credential-engine-master-keys,env=test"})  # fmt: skip
    assert not leaks(out + err) and "versions 1, 2, 3" in err
    rotated = await AwsKmsKeys(settings(kms_server, out.strip(), key_id=key_id)).load()
    assert rotated.versions == (1, 2, 3) and rotated.current_version == 3


@pytest.mark.parametrize("wrong", ["key", "context", "not a ciphertext"])
async def test_a_wrong_kms_key_or_context_is_a_clear_error(
    wrong: str, kms_server: str, kms_keys: tuple[str, str], database_url: str, tmp_path: Path
) -> None:
    """The ciphertext pinned to another KMS key, decrypted with another encryption context, or not a KMS
    ciphertext at all: the engine does not open; a ConfigurationError says why, with no key and no ciphertext."""
    key_id, other = kms_keys
    ciphertext = await encrypt(kms_server, key_id, CONTEXT)
    overrides: dict[str, Any] = {"key_id": key_id}
    if wrong == "key":
        overrides["key_id"] = other
    elif wrong == "context":
        overrides["encryption_context"] = {**CONTEXT, "env": "prod"}
    else:
        ciphertext = base64.b64encode(b"x" * 64).decode()
    config = EngineConfig(
        database_url=database_url, data_dir=tmp_path, kms=settings(kms_server, ciphertext, **overrides)
    )
    with pytest.raises(errors.ConfigurationError) as refused:
        await CredentialEngine(config).open()
    message = refused.value.message
    assert message.startswith("AWS KMS (ENGINE_MASTER_KEYS_KMS with KMS key ")
    expected = {
        "key": "Exception)",
        "context": "encryption context",
        "not a ciphertext": "Exception)",
    }[wrong]
    assert expected in message, message
    text = with_locals(refused.value) + repr(config)
    assert not leaks(text), text
    assert ciphertext[:24] not in message


async def test_kms_unreachable_is_a_bounded_clear_error(aws_env: None) -> None:
    """Nothing listens at the KMS endpoint: a ConfigurationError saying so, well within the bound."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: connections are refused
    provider = AwsKmsKeys(
        settings(f"http://127.0.0.1:{port}", base64.b64encode(b"y" * 64).decode(), timeout=3.0)
    )
    started = time.monotonic()
    with pytest.raises(errors.ConfigurationError) as refused:
        await provider.load()
    assert time.monotonic() - started < 30
    assert "unreachable" in refused.value.message or "did not answer" in refused.value.message


async def test_a_kms_that_does_not_answer_is_cut_at_the_timeout(aws_env: None) -> None:
    """A KMS endpoint that accepts connections and never answers: cut at ENGINE_KMS_TIMEOUT."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(60)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        provider = AwsKmsKeys(
            settings(f"http://127.0.0.1:{port}", base64.b64encode(b"y" * 64).decode(), timeout=1.5)
        )
        started = time.monotonic()
        with pytest.raises(errors.ConfigurationError) as refused:
            await provider.load()
        assert time.monotonic() - started < 20
        assert (
            "did not answer within 1.5 s" in refused.value.message or "unreachable" in refused.value.message
        )
    finally:
        server.close()


async def test_the_decrypted_keyring_never_reaches_logs_reprs_or_errors(
    make_engine: Any, kms_server: str, kms_keys: tuple[str, str]
) -> None:
    """Canary: the engine's logging and the AWS SDK's at DEBUG (botocore logs request and response bodies at
    DEBUG) while an engine decrypts its keyring, uses it, and while a CLI-style encryption runs; then the
    reprs of the config, the provider, the keyring, and a failure rendered with locals."""
    from engine.keys import aws as keys_aws

    key_id, other = kms_keys
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure_logging("DEBUG", stream=stream)
    sdk = io.StringIO()
    raw = logging.StreamHandler(sdk)  # a plain handler too: what a host's own logging setup would print
    raw.setLevel(logging.DEBUG)
    root.addHandler(raw)
    for name in ("botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        ciphertext = base64.b64encode(
            await keys_aws.encrypt_spec(SPEC, key_id=key_id, encryption_context=CONTEXT, region=REGION,
                                        endpoint_url=kms_server)
        ).decode()  # fmt: skip
        kms = settings(kms_server, ciphertext, key_id=key_id)
        eng = await make_engine(master_keys=None, kms=kms)
        await store_and_read(eng)
        provider = AwsKmsKeys(kms)
        keyring = await provider.load()
        texts = [
            repr(eng.config),
            repr(kms),
            repr(provider),
            repr(keyring),
            str(keyring),
            repr(EnvironmentKeys(SPEC)),
        ]
        with pytest.raises(errors.ConfigurationError) as refused:
            await AwsKmsKeys(settings(kms_server, ciphertext, key_id=other)).load()
        texts.append(with_locals(refused.value))
    finally:
        root.removeHandler(raw)
        for name in ("botocore", "aiobotocore"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        structlog.reset_defaults()
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
    logged = stream.getvalue() + sdk.getvalue()
    assert "master_keys_loaded" in logged and "botocore" in sdk.getvalue()  # both loggers spoke: not vacuous
    assert not leaks(logged), leaks(logged)
    for text in texts:
        assert not leaks(text), text
