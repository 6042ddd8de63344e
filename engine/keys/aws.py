"""AWS KMS for master keys (the ``aws`` extra: aiobotocore): decrypt the keyring at start, encrypt it for the CLI.

The keyring spec is encrypted with ``kms:Encrypt`` under a symmetric KMS key and an encryption context
(https://docs.aws.amazon.com/kms/latest/developerguide/encrypt_context.html): the same context must be given
to ``kms:Decrypt``, so a ciphertext of the same key made for another purpose does not open as master keys.
A spec is at most 4096 bytes, the most ``Encrypt`` takes
(https://docs.aws.amazon.com/kms/latest/APIReference/API_Encrypt.html), about 80 key versions.

Every call is bounded: connect and read timeouts, two tries, and ``timeout`` seconds for the whole call.
Errors are :class:`errors.ConfigurationError` naming the setting, the KMS key and AWS's error code; never the
ciphertext, the plaintext, or AWS's message text. While a call of this module runs, the AWS SDK's DEBUG
records (they print request and response bodies, which hold the plaintext) are dropped (:class:`_Quiet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from engine import crypto, errors
from engine.sensitive import MasterKeysText

__all__ = ["decrypt_keyring", "decrypt_spec", "encrypt_spec"]

KMS_SETTING = "ENGINE_MASTER_KEYS_KMS"  # the setting named in errors (engine/keys/providers.py re-uses it)


class KmsSettings(Protocol):
    """What a decryption needs of :class:`engine.keys.KmsSettings` (a protocol, so this module does not import
    engine.keys, which imports it)."""

    @property
    def setting(self) -> str: ...
    @property
    def key_id(self) -> str | None: ...
    @property
    def region(self) -> str | None: ...
    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def encryption_context(self) -> Mapping[str, str]: ...
    @property
    def timeout(self) -> float: ...
    def blob(self) -> bytes: ...


MAX_PLAINTEXT = 4096  # kms:Encrypt's limit
# loggers of the AWS SDK whose DEBUG records carry request or response bodies
_BODY_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.awsrequest",
    "botocore.httpsession",
    "aiobotocore.endpoint",
    "aiobotocore.parsers",
    "aiobotocore.httpsession",
)
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("engine_kms_quiet", default=False)

# what AWS's error codes mean here (https://docs.aws.amazon.com/kms/latest/APIReference/API_Decrypt.html#API_Decrypt_Errors)
_DECRYPT_ERRORS = {
    "IncorrectKeyException": "it was not encrypted by this KMS key (ENGINE_KMS_KEY_ID)",
    "AccessDeniedException": "access denied: no kms:Decrypt permission, or the ciphertext is of another KMS key "
    "than ENGINE_KMS_KEY_ID",
    "InvalidCiphertextException": "KMS cannot decrypt it: the encryption context (ENGINE_KMS_ENCRYPTION_CONTEXT) "
    "differs from the one it was encrypted with, or it is not a ciphertext of this key",
    "NotFoundException": "the KMS key does not exist (in this region)",
    "DisabledException": "the KMS key is disabled",
    "KMSInvalidStateException": "the KMS key cannot be used in its state (pending deletion?)",
    "KeyUnavailableException": "the KMS key is unavailable right now",
    "InvalidKeyUsageException": "the KMS key is not a symmetric encryption key",
}


class _Quiet(logging.Filter):
    """Drops the AWS SDK's records below WARNING while a call of this module runs in this context."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not _quiet.get()


_FILTER = _Quiet()
for _name in _BODY_LOGGERS:
    logging.getLogger(_name).addFilter(_FILTER)


def _sdk() -> tuple[Any, Any, Any, Any]:
    """(get_session, AioConfig, ClientError, BotoCoreError), or a clear error without the ``aws`` extra."""
    try:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise errors.ConfigurationError(
            f"{KMS_SETTING} needs the AWS SDK: pip install 'credential-engine[aws]'", field=KMS_SETTING
        ) from None
    return get_session, AioConfig, ClientError, BotoCoreError


@contextlib.asynccontextmanager
async def _kms(region: str | None, endpoint_url: str | None, seconds: float) -> AsyncIterator[Any]:
    get_session, aio_config, _, _ = _sdk()
    config = aio_config(
        connect_timeout=seconds, read_timeout=seconds, retries={"max_attempts": 2, "mode": "standard"}
    )
    async with get_session().create_client(
        "kms", region_name=region, endpoint_url=endpoint_url, config=config
    ) as client:
        yield client


async def _call(
    operation: str, where: str, region: str | None, endpoint_url: str | None, seconds: float, **params: Any
) -> dict[str, Any] | str:
    """Run one KMS operation, bounded; its answer, or the message of what went wrong (never raised here, so no
    frame holding the parameters is on a traceback)."""
    _, _, client_error, botocore_error = _sdk()
    token = _quiet.set(True)
    try:
        async with asyncio.timeout(seconds):
            async with _kms(region, endpoint_url, seconds) as client:
                answer: dict[str, Any] = await getattr(client, operation)(**params)
                return answer
    except TimeoutError:
        return f"{where}: AWS KMS did not answer within {seconds:g} s (ENGINE_KMS_TIMEOUT)"
    except client_error as exc:
        code = str(exc.response.get("Error", {}).get("Code", "unknown"))
        reason = _DECRYPT_ERRORS.get(code, "AWS KMS refused the request")
        return f"{where}: {reason} ({code})"
    except botocore_error as exc:
        return f"{where}: AWS KMS is unreachable or not configured ({type(exc).__name__})"
    except OSError as exc:
        return f"{where}: AWS KMS is unreachable ({exc.strerror or type(exc).__name__})"
    finally:
        _quiet.reset(token)


async def decrypt_keyring(settings: KmsSettings, *, source: str) -> crypto.MasterKeyring:
    """Decrypt the keyring spec once (``kms:Decrypt`` with the encryption context) and parse it."""
    spec = await decrypt_spec(settings, source=source)
    return crypto.MasterKeyring.from_spec(spec, setting=f"the keyring decrypted from {settings.setting}")


async def decrypt_spec(settings: KmsSettings, *, source: str) -> MasterKeysText:
    """The keyring spec ``settings`` holds, decrypted and masked (``repr`` shows its versions only)."""
    spec = await _decrypt(settings, source)
    if not isinstance(spec, MasterKeysText):
        raise errors.ConfigurationError(spec, field=KMS_SETTING)
    return spec


async def _decrypt(settings: KmsSettings, source: str) -> MasterKeysText | str:
    """The spec, masked, or the message of what went wrong."""
    params: dict[str, Any] = {
        "CiphertextBlob": await asyncio.to_thread(settings.blob),  # a file, perhaps
        "EncryptionContext": dict(settings.encryption_context),
    }
    if settings.key_id:
        params["KeyId"] = settings.key_id
    answer = await _call(
        "decrypt", source, settings.region, settings.endpoint_url, settings.timeout, **params
    )
    if isinstance(answer, str):
        return answer
    plaintext = answer.pop("Plaintext", b"")
    answer.clear()
    try:
        return MasterKeysText(bytes(plaintext).decode("ascii"))
    except UnicodeDecodeError:
        return f"{source}: the decrypted value is not a keyring spec"
    finally:
        del plaintext


async def encrypt_spec(
    spec: str,
    *,
    key_id: str,
    encryption_context: Mapping[str, str],
    region: str | None = None,
    endpoint_url: str | None = None,
    seconds: float = 10.0,
) -> bytes:
    """``kms:Encrypt`` of a keyring spec (checked first): the ciphertext blob (store its base64)."""
    crypto.MasterKeyring.from_spec(
        spec, setting="the keyring to encrypt"
    )  # refuse a bad spec before sending it
    raw = str(spec).encode("ascii")
    if len(raw) > MAX_PLAINTEXT:
        raise errors.ConfigurationError(
            f"the keyring is {len(raw)} bytes; KMS encrypts at most {MAX_PLAINTEXT} (drop old versions)",
            field=KMS_SETTING,
        )
    answer = await _call(
        "encrypt",
        f"kms:Encrypt with KMS key {key_id}",
        region,
        endpoint_url,
        seconds,
        KeyId=key_id,
        Plaintext=raw,
        EncryptionContext=dict(encryption_context),
    )
    del raw
    if isinstance(answer, str):
        raise errors.ConfigurationError(answer, field="--kms-key-id")
    return bytes(answer["CiphertextBlob"])
