"""Master keys: where the keyring comes from (``providers``: the environment, a file, AWS KMS in ``aws``, or your
own ``KeyProvider``), and master-key rotation (``rewrap``). Envelope encryption itself is :mod:`engine.crypto`."""

from engine.keys.providers import (
    DEFAULT_KMS_CONTEXT,
    KMS_SETTING,
    AwsKmsKeys,
    EnvironmentKeys,
    GeneratedKeyFile,
    KeyFile,
    KeyProvider,
    KmsSettings,
    load_keyring,
    provider_for,
)

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
