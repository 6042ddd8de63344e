"""Master keys from a key provider: where the engine's :class:`~engine.crypto.MasterKeyring` comes from.

A provider is any object with a ``source`` (where the keys come from, for messages and logs: never a key)
and ``async def load() -> MasterKeyring``, called once when the engine opens. Built in:

    EnvironmentKeys    ENGINE_MASTER_KEYS           the spec itself ("1:<base64 32 bytes>,2:<...>")
    KeyFile            ENGINE_MASTER_KEYS_FILE      a file holding the spec: a regular file of this user,
                                                    mode 0600 or stricter, no symbolic link, in a folder
                                                    nobody else can change (crypto.read_key_file)
    AwsKmsKeys         ENGINE_MASTER_KEYS_KMS       the spec encrypted by an AWS KMS key (base64 of the
                       or ..._KMS_FILE              ciphertext blob), decrypted once at start with
                                                    kms:Decrypt and an encryption context (engine/keys/aws.py,
                                                    extra ``aws``)
    GeneratedKeyFile   none of them                 zero-config: ENGINE_DATA_DIR/master.keys, made if missing

At most one of the three settings may be given (two would leave it unclear which keys encrypt); a provider
passed to ``CredentialEngine(key_provider=...)`` replaces them (Vault transit, GCP KMS: implement the two
members, and build the keyring with ``MasterKeyring.from_spec(spec, setting=self.source)``, whose errors
name the source and an entry's position, never its text). What a provider returns only changes where the
master keys live: the envelope format and the rewrap procedure are the same for every provider.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import structlog

from engine import crypto, environment, errors
from engine.keys import aws as keys_aws
from engine.keys.aws import KMS_SETTING
from engine.sensitive import MasterKeysText

__all__ = [
    "DEFAULT_KMS_CONTEXT",
    "KMS_SETTING",
    "AwsKmsKeys",
    "EnvironmentKeys",
    "GeneratedKeyFile",
    "KeyFile",
    "KeyProvider",
    "KmsSettings",
    "load_keyring",
    "provider_for",
]

log = structlog.get_logger("engine.keys")

FILE_SETTING = "ENGINE_MASTER_KEYS_FILE"
KMS_FILE_SETTING = "ENGINE_MASTER_KEYS_KMS_FILE"
KMS_CONTEXT_SETTING = "ENGINE_KMS_ENCRYPTION_CONTEXT"
# bound to the purpose: a ciphertext of this KMS key made for anything else does not decrypt as master keys
DEFAULT_KMS_CONTEXT: Mapping[str, str] = {"purpose": "credential-engine-master-keys"}
MAX_CIPHERTEXT_TEXT = 16 * 1024  # KMS plaintexts are at most 4096 bytes; their base64 ciphertexts much less


@runtime_checkable
class KeyProvider(Protocol):
    """Where the master keys come from. ``load`` runs once per engine start; it must bound its own waits."""

    @property
    def source(self) -> str:
        """Where the keys come from (a setting, a path, a KMS key id), for messages and logs; never a key."""
        ...

    async def load(self) -> crypto.MasterKeyring:
        """The keyring; a :class:`errors.ConfigurationError` naming the source and the reason otherwise."""
        ...


@dataclass(frozen=True)
class EnvironmentKeys:
    """The spec given as a setting (``ENGINE_MASTER_KEYS``); ``repr`` shows the versions only."""

    spec: str
    setting: str = crypto.MASTER_KEYS_SETTING

    def __post_init__(self) -> None:
        object.__setattr__(self, "spec", MasterKeysText(self.spec))

    @property
    def source(self) -> str:
        return self.setting

    async def load(self) -> crypto.MasterKeyring:
        return crypto.MasterKeyring.from_spec(self.spec, setting=self.setting)


@dataclass(frozen=True)
class KeyFile:
    """The spec in an operator's file (``ENGINE_MASTER_KEYS_FILE``), checked as :func:`crypto.read_key_file` says."""

    path: Path
    setting: str = FILE_SETTING

    @property
    def source(self) -> str:
        return f"{self.setting} ({self.path})"

    async def load(self) -> crypto.MasterKeyring:
        spec = await asyncio.to_thread(crypto.read_key_file, self.path, setting=self.setting)
        return crypto.MasterKeyring.from_spec(spec, setting=f"{self.setting} ({self.path})")


@dataclass(frozen=True)
class GeneratedKeyFile:
    """Zero-config: the spec in ``path``, generated there (0600) when missing (``MasterKeyring.load_or_create``)."""

    path: Path

    @property
    def source(self) -> str:
        return f"the generated key file {self.path}"

    async def load(self) -> crypto.MasterKeyring:
        return await asyncio.to_thread(crypto.MasterKeyring.load_or_create, self.path)


@dataclass(frozen=True, kw_only=True)
class KmsSettings:
    """The keyring spec stored encrypted by an AWS KMS key (``credential-engine keys encrypt`` makes it).

    ``ciphertext`` (``ENGINE_MASTER_KEYS_KMS``) or ``ciphertext_file`` (``ENGINE_MASTER_KEYS_KMS_FILE``): the
    base64 of the ``CiphertextBlob`` (exactly one). ``key_id`` (``ENGINE_KMS_KEY_ID``): the key it must have
    been encrypted by (recommended: without it KMS uses whichever key the blob names). ``region``
    (``ENGINE_KMS_REGION``; else the AWS SDK's own: ``AWS_REGION``, the profile), ``endpoint_url``
    (``ENGINE_KMS_ENDPOINT_URL``: a VPC endpoint, a test server), ``encryption_context``
    (``ENGINE_KMS_ENCRYPTION_CONTEXT``, ``k=v,k2=v2``: must equal the one it was encrypted with), ``timeout``
    (``ENGINE_KMS_TIMEOUT``: seconds the whole decryption may take, retries included). AWS credentials come
    from the SDK's usual chain (environment, profile, instance or task role).
    """

    ciphertext: str | None = field(default=None, repr=False)
    ciphertext_file: Path | None = None
    key_id: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    encryption_context: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_KMS_CONTEXT))
    timeout: float = 10.0

    ENV: ClassVar[environment.Section] = environment.Section(
        prefix="ENGINE_KMS_",
        names={"ciphertext": KMS_SETTING, "ciphertext_file": KMS_FILE_SETTING},
        bounds={"timeout": environment.POSITIVE},
        built_when=("ciphertext", "ciphertext_file"),  # ENGINE_KMS_REGION alone configures no KMS keys
    )

    def __post_init__(self) -> None:
        if (self.ciphertext is None) == (self.ciphertext_file is None):
            raise errors.ConfigurationError(
                f"AWS KMS master keys: give exactly one of {KMS_SETTING} (base64) and {KMS_FILE_SETTING}",
                field=KMS_SETTING,
            )
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout) and self.timeout > 0):
            raise errors.ConfigurationError(
                "ENGINE_KMS_TIMEOUT must be a positive number", field="ENGINE_KMS_TIMEOUT"
            )
        if not self.encryption_context:  # the default binds the ciphertext to its purpose; none would not
            raise errors.ConfigurationError(f"{KMS_CONTEXT_SETTING} is empty", field=KMS_CONTEXT_SETTING)
        for key, value in self.encryption_context.items():
            if not (isinstance(key, str) and isinstance(value, str) and key):
                raise errors.ConfigurationError(
                    f"{KMS_CONTEXT_SETTING}: keys and values are strings, keys not empty",
                    field=KMS_CONTEXT_SETTING,
                )
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise errors.ConfigurationError(
                "ENGINE_KMS_ENDPOINT_URL must be an http(s):// URL", field="ENGINE_KMS_ENDPOINT_URL"
            )
        object.__setattr__(self, "encryption_context", dict(self.encryption_context))

    @property
    def setting(self) -> str:
        """The setting that holds the ciphertext."""
        return KMS_SETTING if self.ciphertext is not None else f"{KMS_FILE_SETTING} ({self.ciphertext_file})"

    def blob(self) -> bytes:
        """The ciphertext blob, decoded from base64 (the file read, bounded)."""
        if self.ciphertext is not None:
            text = self.ciphertext
        else:
            assert self.ciphertext_file is not None
            try:  # a regular file only: a named pipe or a device is refused at once, never waited on
                data = environment.read_regular_file(self.ciphertext_file, MAX_CIPHERTEXT_TEXT)
                text = data.decode("ascii", errors="replace")
            except OSError as exc:
                raise errors.ConfigurationError(
                    f"{self.setting}: cannot read it ({exc.strerror or type(exc).__name__})",
                    field=KMS_FILE_SETTING,
                ) from None
        text = "".join(text.split())
        try:
            blob = base64.b64decode(text, validate=True) if len(text) <= MAX_CIPHERTEXT_TEXT else b""
        except (binascii.Error, ValueError):
            blob = b""
        if not blob:
            raise errors.ConfigurationError(
                f"{self.setting}: not the base64 of a KMS ciphertext blob (make it with "
                "`credential-engine keys encrypt --kms-key-id ...`)",
                field=KMS_SETTING,
            )
        return blob

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KmsSettings | None:
        """The ``ENGINE_MASTER_KEYS_KMS*`` and ``ENGINE_KMS_*`` variables; None when no ciphertext is set."""
        kwargs = environment.build_kwargs(cls, environment.settings_view(env))
        if not any(name in kwargs for name in cls.ENV.built_when):
            return None
        return environment.construct(cls, kwargs)


def parse_context(spec: str) -> dict[str, str]:
    """``"purpose=credential-engine-master-keys,env=prod"`` -> a KMS encryption context."""
    context: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise errors.ConfigurationError(
                f"{KMS_CONTEXT_SETTING} entries look like key=value", field=KMS_CONTEXT_SETTING
            )
        context[key.strip()] = value.strip()
    if not context:
        raise errors.ConfigurationError(f"{KMS_CONTEXT_SETTING} is empty", field=KMS_CONTEXT_SETTING)
    return context


class AwsKmsKeys:
    """The spec decrypted by AWS KMS (engine/keys/aws.py; needs the ``aws`` extra: aiobotocore)."""

    def __init__(self, settings: KmsSettings) -> None:
        self.settings = settings

    @property
    def source(self) -> str:
        key = f" with KMS key {self.settings.key_id}" if self.settings.key_id else ""
        return f"AWS KMS ({self.settings.setting}{key})"

    def __repr__(self) -> str:
        return f"AwsKmsKeys(source={self.source!r})"

    async def load(self) -> crypto.MasterKeyring:
        return await keys_aws.decrypt_keyring(self.settings, source=self.source)


def provider_for(
    *,
    master_keys: str | None,
    master_keys_file: Path | None,
    kms: KmsSettings | None,
    data_dir: Path,
) -> KeyProvider:
    """The provider the settings name (at most one of them), or the zero-config key file in ``data_dir``."""
    given: list[KeyProvider] = []
    if master_keys:
        given.append(EnvironmentKeys(master_keys))
    if master_keys_file is not None:
        given.append(KeyFile(master_keys_file))
    if kms is not None:
        given.append(AwsKmsKeys(kms))
    if len(given) > 1:
        raise errors.ConfigurationError(
            "master keys are configured more than once: "
            + ", ".join(p.source for p in given)
            + f"; set only one of {crypto.MASTER_KEYS_SETTING}, {FILE_SETTING} and {KMS_SETTING}",
            field=crypto.MASTER_KEYS_SETTING,
        )
    return given[0] if given else GeneratedKeyFile(data_dir / "master.keys")


async def load_keyring(provider: KeyProvider) -> crypto.MasterKeyring:
    """``provider.load()``, checked: a :class:`crypto.MasterKeyring`, or a ConfigurationError naming the source."""
    keyring = await provider.load()
    if not isinstance(keyring, crypto.MasterKeyring):
        raise errors.ConfigurationError(
            f"the key provider {provider.source} returned {type(keyring).__name__}, not a MasterKeyring",
            field=crypto.MASTER_KEYS_SETTING,
        )
    log.info("master_keys_loaded", source=provider.source, versions=list(keyring.versions),
             current=keyring.current_version)  # fmt: skip
    return keyring
