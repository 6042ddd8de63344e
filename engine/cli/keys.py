"""``credential-engine keys encrypt``: a master keyring encrypted by an AWS KMS key (engine/keys/providers.py).

The keyring is read from a file (``--input FILE``, ``-`` for stdin), made afresh (``--generate``), or made from
the keyring the configuration's ``ENGINE_MASTER_KEYS_KMS`` holds with a new version added (``--add-version``:
the first step of a master-key rotation). Its plaintext is never printed; what is printed (or written to
``--output``) is the base64 ciphertext blob to set as ``ENGINE_MASTER_KEYS_KMS`` (or to store in the file of
``ENGINE_MASTER_KEYS_KMS_FILE``), with the encryption context it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from typing import Any

from engine import crypto, environment, errors
from engine.config import EngineConfig
from engine.environment import settings_view
from engine.keys import providers as keys
from engine.sensitive import MasterKeysText


def add_parsers(sub: Any) -> None:
    """The ``keys`` command and its actions, on the main parser's subparsers."""
    group = sub.add_parser("keys", help="master keys: encrypt a keyring with AWS KMS")
    actions = group.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "encrypt", help="encrypt a master keyring with an AWS KMS key (prints the base64 ciphertext)"
    )
    p.add_argument("--kms-key-id", required=True, help="the KMS key: id, ARN or alias/NAME")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help="the keyring spec from FILE ('-' = stdin)")
    source.add_argument(
        "--generate", action="store_true", help="a new keyring with one fresh key (version 1)"
    )
    source.add_argument(
        "--add-version",
        action="store_true",
        help="the keyring of $ENGINE_MASTER_KEYS_KMS(_FILE) with a fresh key added as the next version",
    )
    p.add_argument(
        "--context",
        action="append",
        metavar="KEY=VALUE",
        help="encryption context entry, repeatable (default: $ENGINE_KMS_ENCRYPTION_CONTEXT or "
        f"{','.join(f'{k}={v}' for k, v in keys.DEFAULT_KMS_CONTEXT.items())})",
    )
    p.add_argument("--region", help="AWS region (default $ENGINE_KMS_REGION, then the AWS SDK's)")
    p.add_argument("--endpoint-url", help="KMS endpoint (default $ENGINE_KMS_ENDPOINT_URL)")
    p.add_argument(
        "--output", metavar="FILE", help="write the base64 ciphertext to FILE (new file, mode 0600)"
    )
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="bound on the KMS call")
    p.set_defaults(func=encrypt)


async def encrypt(args: argparse.Namespace) -> int:
    from engine.keys import aws as keys_aws

    env = settings_view(os.environ)  # the ENGINE_KMS_* variables read as the engine reads them

    def setting(name: str) -> Any:
        return environment.setting(keys.KmsSettings, (name,), env)

    context = keys.parse_context(",".join(args.context)) if args.context else setting("encryption_context")
    if context is None:
        context = dict(keys.DEFAULT_KMS_CONTEXT)
    elif not context:
        raise errors.ConfigurationError(
            f"{keys.KMS_CONTEXT_SETTING} is empty", field=keys.KMS_CONTEXT_SETTING
        )
    region = args.region or setting("region")
    endpoint = args.endpoint_url or setting("endpoint_url")
    spec = await _spec(args)
    blob = await keys_aws.encrypt_spec(
        spec, key_id=args.kms_key_id, encryption_context=context, region=region, endpoint_url=endpoint,
        seconds=args.timeout,
    )  # fmt: skip
    text = base64.b64encode(blob).decode("ascii")
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(text + "\n")
        where = f"{keys.KMS_FILE_SETTING}={args.output}"
    else:
        print(text)
        where = f"{keys.KMS_SETTING}=<the line above>"
    versions = crypto.MasterKeyring.from_spec(spec, setting="the keyring").versions
    shown = ",".join(f"{k}={v}" for k, v in context.items())
    print(
        f"keyring (versions {', '.join(map(str, versions))}) encrypted by {args.kms_key_id}; set {where}, "
        f"ENGINE_KMS_KEY_ID={args.kms_key_id} and {keys.KMS_CONTEXT_SETTING}={shown}",
        file=sys.stderr,
    )
    return 0


def _read_input(path: str) -> str:
    if path == "-":
        return sys.stdin.read().strip()
    with open(path, encoding="ascii") as handle:
        return handle.read().strip()


async def _spec(args: argparse.Namespace) -> MasterKeysText:
    """The keyring to encrypt, masked (never printed)."""
    if args.generate:
        return MasterKeysText(crypto.MasterKeyring.generate_spec(1))
    if args.input is not None:
        return MasterKeysText(await asyncio.to_thread(_read_input, args.input))
    settings = EngineConfig.from_env().kms
    if settings is None:
        raise errors.ConfigurationError(
            f"--add-version needs the current keyring: set {keys.KMS_SETTING} or {keys.KMS_FILE_SETTING}",
            field=keys.KMS_SETTING,
        )
    from engine.keys import aws as keys_aws

    current = await keys_aws.decrypt_spec(settings, source=keys.AwsKmsKeys(settings).source)
    keyring = crypto.MasterKeyring.from_spec(current, setting="the current keyring")
    return MasterKeysText(f"{current},{crypto.MasterKeyring.generate_spec(max(keyring.versions) + 1)}")
