"""Envelope encryption of key material: AES-256-GCM data keys wrapped by versioned master keys.

Each secret version gets its own random 256-bit data key (DEK) that encrypts the serialized
:class:`~venues.base.ApiKeys`; the DEK is wrapped (AES-GCM again) by the current master key (KEK). What is
stored is a :class:`Sealed`: ``kek_version``, ``wrapped_dek`` (``nonce || ct``), ``nonce`` and ``ciphertext``.

Associated data binds every ciphertext to where it lives, so a value copied to another row does not open:

    DEK wrap     b"ce:v1:dek:"          + credential_id.bytes + u32(version) + u32(kek_version)
    payload      b"ce:v1:payload:"      + credential_id.bytes + u32(version)
    blob DEK     b"ce:v1:blob-dek:"     + u16(len(purpose)) + purpose + u32(kek_version)
    blob         b"ce:v1:blob:"         + u16(len(purpose)) + purpose

(``u32`` big-endian; credential AADs are fixed-length and purposes length-prefixed, so no two contexts
encode alike; the ``v1`` prefix lets the format evolve.) The payload's AAD leaves the KEK version out on
purpose: master-key rotation (:meth:`Vault.rewrap`) rewraps the DEK and never decrypts the payload.

Nothing here logs, prints or puts in an exception any key byte, plaintext or ciphertext: errors name the
setting, the credential id and the version, never a value.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import errors
from engine.sensitive import MasterKeysText
from venues.base import ApiKeys

__all__ = [
    "MASTER_KEYS_SETTING",
    "MasterKeyring",
    "Sealed",
    "Vault",
    "fingerprint",
    "generate_fingerprint_key",
    "read_key_file",
]

log = structlog.get_logger("engine.crypto")

MASTER_KEYS_SETTING = "ENGINE_MASTER_KEYS"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # the GCM standard nonce; random is safe: each DEK encrypts once, each KEK < 2**32 times
MAX_KEK_VERSION = 2**31 - 1  # stored in a PostgreSQL integer column
MAX_PURPOSE_BYTES = 255

_AAD_DEK = b"ce:v1:dek:"
_AAD_PAYLOAD = b"ce:v1:payload:"
_AAD_BLOB_DEK = b"ce:v1:blob-dek:"
_AAD_BLOB = b"ce:v1:blob:"
_FINGERPRINT_DOMAIN = b"ce:v1:fp:"

_DekAad = Callable[[int], bytes]  # the DEK wrap's associated data for a given KEK version
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; elsewhere symbolic links are not refused


class MasterKeyring:
    """Versioned 32-byte master keys (KEKs); one of them, ``current_version``, wraps new data keys.

    Spec format (``ENGINE_MASTER_KEYS``): comma-separated ``<version>:<base64 of 32 bytes>`` entries. The
    **highest version is current** unless exactly one entry ends with ``*``, which makes it current. The
    marker serves rolling deploys: ship ``"1:<old>*,2:<new>"`` to every process first (all can read
    version 2), then ``"1:<old>,2:<new>"`` (all write it), then rewrap and drop version 1.

    Its ``repr`` shows versions only; it cannot be pickled.
    """

    __slots__ = ("_current", "_keys")

    def __init__(self, keys: Mapping[int, bytes], *, current: int | None = None) -> None:
        if not keys:
            raise errors.ConfigurationError("a master keyring needs at least one key", field="master_keys")
        for version, key in keys.items():
            if not isinstance(version, int) or not 1 <= version <= MAX_KEK_VERSION:
                raise errors.ConfigurationError(
                    f"master key versions are integers from 1 to {MAX_KEK_VERSION}", field="master_keys"
                )
            if not isinstance(key, bytes) or len(key) != KEY_BYTES:
                raise errors.ConfigurationError(
                    f"master key version {version} must be exactly {KEY_BYTES} bytes", field="master_keys"
                )
        if current is None:
            current = max(keys)
        elif current not in keys:
            raise errors.ConfigurationError(
                f"current master key version {current} is not in the keyring", field="master_keys"
            )
        self._keys: dict[int, bytes] = dict(keys)
        self._current = current

    @classmethod
    def from_spec(cls, spec: str, *, setting: str = MASTER_KEYS_SETTING) -> MasterKeyring:
        """Parse ``"1:<b64>,2:<b64>"`` (optionally one entry marked current with a trailing ``*``).

        Errors name ``setting`` and the entry's position, never any text of the spec (a mistyped entry
        may be a key). The parsing happens in a helper that returns before anything is raised, and ``spec``
        is held masked here, so a traceback rendered with frame locals shows no key either.
        """
        spec = MasterKeysText(spec)
        parsed = _parse_spec(spec, setting)
        if isinstance(parsed, str):
            raise errors.ConfigurationError(parsed, field=setting)
        return cls(parsed[0], current=parsed[1])

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKeyring:
        """Zero-config mode: read the keyring spec stored at ``path``, creating it (mode 0600) if missing.

        The file holds a spec in the ``ENGINE_MASTER_KEYS`` format, so an operator can copy it into the
        environment. A missing folder is made with mode 0700. A new file is written to a temporary name
        opened with ``O_CREAT | O_EXCL`` and mode 0600 (never readable by others, not even briefly), then
        hard-linked into place: a concurrent starter either wins or reads the winner's complete file.

        Refused with a :class:`errors.ConfigurationError` naming the path and the reason, before any key is
        read or written: a folder (or any folder above it) that group or others may write without the sticky
        bit, or a folder owned by another user than this process's or root (they could replace the file);
        a file that is a symbolic link (opened with ``O_NOFOLLOW``), is not a regular file, is owned by
        another user, or that group or others may read or write. Logs a WARNING either way: local keys must
        be backed up, and replaced by ``ENGINE_MASTER_KEYS`` in production.
        """
        setting = f"master key file {path}"
        _make_private_folder(path)
        _check_folders(path)
        created = _create_key_file(path, MasterKeysText(cls.generate_spec()))
        spec = MasterKeysText(_read_private_file(path))
        keyring = cls.from_spec(spec, setting=setting)
        log.warning(
            "master_key_file_in_use",
            path=str(path),
            created=created,
            hint=(
                "master keys were generated locally: back this file up (losing it loses every stored "
                f"secret) and set {MASTER_KEYS_SETTING} in production"
            ),
        )
        return keyring

    @staticmethod
    def generate_spec(version: int = 1) -> str:
        """A fresh ``"<version>:<base64>"`` entry for operators (append it to rotate, or use it alone)."""
        if not 1 <= version <= MAX_KEK_VERSION:
            raise ValueError(f"version must be from 1 to {MAX_KEK_VERSION}")
        return f"{version}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode('ascii')}"

    @property
    def current_version(self) -> int:
        return self._current

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version held, ascending."""
        return tuple(sorted(self._keys))

    def _key(self, version: int) -> bytes | None:
        """The raw key of ``version``, or None; for :class:`Vault` only."""
        return self._keys.get(version)

    def __repr__(self) -> str:
        return f"MasterKeyring(versions={list(self.versions)}, current={self._current})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # pickling would copy master keys into places nobody audits
        raise TypeError("MasterKeyring cannot be pickled")


def _parse_spec(spec: str, setting: str) -> tuple[dict[int, bytes], int | None] | str:
    """(keys by version, the version marked current or None), or the message of the first problem."""
    if not spec.strip():
        return (
            f"{setting} is empty; expected '<version>:<base64 32-byte key>[,...]' "
            f"(make one with MasterKeyring.generate_spec())"
        )
    keys: dict[int, bytes] = {}
    marked: int | None = None
    for position, raw_entry in enumerate(spec.split(","), start=1):
        entry = raw_entry.strip()
        where = f"{setting} entry {position}"
        if not entry:
            return f"{where} is empty (stray comma?)"
        is_marked = entry.endswith("*")
        if is_marked:
            entry = entry[:-1].rstrip()
        version_text, colon, key_text = entry.partition(":")
        if not colon:
            return f"{where} is not of the form '<version>:<base64 key>'"
        version_text = version_text.strip()
        if (
            not (version_text.isascii() and version_text.isdigit())
            or not 1 <= int(version_text) <= MAX_KEK_VERSION
        ):
            return f"{where}: the version must be an integer from 1 to {MAX_KEK_VERSION}"
        version = int(version_text)
        if version in keys:
            return f"{where}: version {version} appears twice"
        key = _decode_key(key_text.strip())
        if key is None:
            return f"{where} (version {version}): key is not base64"
        if len(key) != KEY_BYTES:
            return f"{where} (version {version}): key must decode to {KEY_BYTES} bytes, not {len(key)}"
        if is_marked:
            if marked is not None:
                return f"{setting}: more than one entry is marked current with '*'"
            marked = version
        keys[version] = key
    return keys, marked


def _decode_key(text: str) -> bytes | None:
    """Standard or URL-safe base64 (padding required), or None when it is neither."""
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        return None


def read_key_file(path: Path, *, setting: str) -> MasterKeysText:
    """The keyring spec stored in an operator's key file (``ENGINE_MASTER_KEYS_FILE``), masked.

    The checks of :meth:`MasterKeyring.load_or_create`, without creating anything: refused with a
    :class:`errors.ConfigurationError` naming ``setting``, the path and the reason when the file is missing,
    a symbolic link, not a regular file, owned by another user or accessible to group/others, or when its
    folder (or one above it) could be changed by another user.
    """
    try:
        _check_folders(path, setting)
        return MasterKeysText(_read_private_file(path, setting))
    except errors.ConfigurationError as exc:
        raise errors.ConfigurationError(f"{setting}: {exc.message}", field=setting) from None


def _refused(path: Path, reason: str, setting: str = MASTER_KEYS_SETTING) -> errors.ConfigurationError:
    return errors.ConfigurationError(f"the master key file {path} is refused: {reason}", field=setting)


def _make_private_folder(path: Path) -> None:
    """Make the key file's missing folders, each with mode 0700 (whatever the umask); existing folders are
    left as they are (:func:`_check_folders` judges them)."""
    missing: list[Path] = []
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    try:
        for each in reversed(missing):
            try:
                each.mkdir(mode=0o700)
            except FileExistsError:
                continue  # a concurrent starter made it: judged like any existing folder
            each.chmod(0o700)  # mkdir's mode passes through the umask; ours is exact
    except OSError as exc:
        raise errors.ConfigurationError(
            f"cannot create the folder of the master key file {path} ({exc.strerror or type(exc).__name__}); "
            f"set {MASTER_KEYS_SETTING} instead",
            field=MASTER_KEYS_SETTING,
        ) from None


def _check_folders(path: Path, setting: str = MASTER_KEYS_SETTING) -> None:
    """Refuse a key file whose folder someone else could change: the folder is owned by this process's user
    or root, and neither it nor any folder above it is writable by group/others without the sticky bit
    (``/tmp``'s sticky bit lets nobody else rename or delete our entries)."""
    if os.name != "posix":
        return
    me = os.geteuid()
    folder = path.parent.resolve()
    for each in (folder, *folder.parents):
        try:
            info = os.stat(each)
        except OSError as exc:
            raise _refused(
                path, f"cannot inspect the folder {each} ({exc.strerror or type(exc).__name__})", setting
            ) from None
        if each == folder and info.st_uid not in (me, 0):
            raise _refused(
                path,
                f"its folder {each} is owned by uid {info.st_uid}, not by this process's user (uid {me}) or "
                "root, who could replace the file",
                setting,
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            raise _refused(
                path,
                f"the folder {each} is writable by group/others (mode {stat.S_IMODE(info.st_mode):04o}, no "
                f"sticky bit), who could replace the file; run `chmod go-w {each}`",
                setting,
            )


def _create_key_file(path: Path, content: str) -> bool:
    """Create ``path`` atomically with mode 0600 holding ``content``; False if it already exists."""
    if os.path.lexists(path):  # a symbolic link, even a dangling one, is there: reading it refuses it
        return False
    try:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as out:
                out.write(content + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, path)
            _fsync_directory(path.parent)  # the new name survives a crash: losing it loses every secret
        except FileExistsError:
            return False  # another process created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise errors.ConfigurationError(
            f"cannot create the master key file {path} ({exc.strerror or type(exc).__name__}); "
            f"set {MASTER_KEYS_SETTING} instead",
            field=MASTER_KEYS_SETTING,
        ) from None
    return True


def _fsync_directory(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_private_file(path: Path, setting: str = MASTER_KEYS_SETTING) -> str:
    """Read a key file: a regular file, not a symbolic link, owned by this process's user, mode 0600 or
    stricter. ``O_NONBLOCK`` keeps a FIFO put in its place from blocking the start for ever."""
    try:
        fd = os.open(
            path, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symbolic link
            raise _refused(
                path, "it is a symbolic link (the key file itself must be a regular file)", setting
            ) from None
        raise errors.ConfigurationError(
            f"cannot read the master key file {path} ({exc.strerror or type(exc).__name__})",
            field=setting,
        ) from None
    with os.fdopen(fd, "r", encoding="ascii", errors="replace") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _refused(path, "it is not a regular file", setting)
        if os.name == "posix" and info.st_uid != os.geteuid():
            raise _refused(
                path,
                f"it is owned by uid {info.st_uid}, not by this process's user (uid {os.geteuid()})",
                setting,
            )
        if os.name == "posix" and info.st_mode & 0o077:
            raise _refused(
                path,
                f"it is accessible to group/others (mode {stat.S_IMODE(info.st_mode):04o}); "
                f"run `chmod 600 {path}`",
                setting,
            )
        return handle.read()


@dataclass(frozen=True, slots=True)
class Sealed:
    """One encrypted value as stored: the wrapped data key (``nonce || ct``) and the payload.

    Its ``repr`` shows sizes, never bytes.
    """

    kek_version: int
    wrapped_dek: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)

    def __repr__(self) -> str:
        return (
            f"Sealed(kek_version={self.kek_version}, wrapped_dek=<{len(self.wrapped_dek)} bytes>, "
            f"nonce=<{len(self.nonce)} bytes>, ciphertext=<{len(self.ciphertext)} bytes>)"
        )

    __str__ = __repr__


class Vault:
    """Seals and opens key material with a :class:`MasterKeyring`. Stateless apart from the keyring."""

    __slots__ = ("keyring",)

    def __init__(self, keyring: MasterKeyring) -> None:
        self.keyring = keyring

    def __repr__(self) -> str:
        return f"Vault(keyring={self.keyring!r})"

    # -- credential secrets ------------------------------------------------------------------------

    def seal(self, keys: ApiKeys, *, credential_id: uuid.UUID, version: int) -> Sealed:
        """Encrypt ``keys`` under a fresh data key for secret ``version`` of ``credential_id``."""
        plaintext = json.dumps(
            {"key": keys.api_key, "secret": keys.api_secret, "passphrase": keys.api_passphrase},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")
        return self._seal(
            plaintext,
            payload_aad=_payload_aad(credential_id, version),
            dek_aad=lambda kek: _dek_aad(credential_id, version, kek),
        )

    def open(self, sealed: Sealed, *, credential_id: uuid.UUID, version: int) -> ApiKeys:
        """Decrypt what :meth:`seal` made for this very credential id and version.

        Raises :class:`errors.DecryptionError` (naming the credential and version only) when the master key
        is missing, the bytes were tampered with, or they belong to another credential or version.
        """
        what = f"secret version {version} of credential {credential_id}"
        dek = self._unwrap(sealed, _dek_aad(credential_id, version, sealed.kek_version), what)
        plaintext = _decrypt(dek, sealed.nonce, sealed.ciphertext, _payload_aad(credential_id, version), what)
        try:
            data = json.loads(plaintext)
            passphrase = data["passphrase"]
            return ApiKeys(
                api_key=_expect_str(data["key"]),
                api_secret=_expect_str(data["secret"]),
                api_passphrase=None if passphrase is None else _expect_str(passphrase),
            )
        except (ValueError, TypeError, KeyError):
            raise errors.DecryptionError(f"{what} decrypted to an unreadable payload") from None

    def rewrap(self, sealed: Sealed, *, credential_id: uuid.UUID, version: int) -> Sealed:
        """Rewrap the data key under the current master key; the payload is never decrypted.

        Returns ``sealed`` itself when it already uses the current master key.
        """
        if not self.needs_rewrap(sealed):
            return sealed
        what = f"secret version {version} of credential {credential_id}"
        dek = self._unwrap(sealed, _dek_aad(credential_id, version, sealed.kek_version), what)
        return self._rewrapped(sealed, dek, lambda kek: _dek_aad(credential_id, version, kek))

    def needs_rewrap(self, sealed: Sealed) -> bool:
        """True when ``sealed``'s data key is wrapped by a master key other than the current one."""
        return sealed.kek_version != self.keyring.current_version

    # -- engine-internal blobs (e.g. the fingerprint key) ------------------------------------------

    def wrap_blob(self, data: bytes, *, purpose: str) -> Sealed:
        """Encrypt an engine-internal value; ``purpose`` (e.g. ``"fingerprint-key"``) binds it."""
        tag = _purpose_bytes(purpose)
        return self._seal(
            bytes(data), payload_aad=_AAD_BLOB + tag, dek_aad=lambda kek: _AAD_BLOB_DEK + tag + _u32(kek)
        )

    def unwrap_blob(self, sealed: Sealed, *, purpose: str) -> bytes:
        """Decrypt what :meth:`wrap_blob` made for the same ``purpose``."""
        tag = _purpose_bytes(purpose)
        what = f"engine blob {purpose!r}"
        dek = self._unwrap(sealed, _AAD_BLOB_DEK + tag + _u32(sealed.kek_version), what)
        return _decrypt(dek, sealed.nonce, sealed.ciphertext, _AAD_BLOB + tag, what)

    def rewrap_blob(self, sealed: Sealed, *, purpose: str) -> Sealed:
        """:meth:`rewrap` for blobs: new master key, same payload bytes."""
        if not self.needs_rewrap(sealed):
            return sealed
        tag = _purpose_bytes(purpose)
        dek = self._unwrap(sealed, _AAD_BLOB_DEK + tag + _u32(sealed.kek_version), f"engine blob {purpose!r}")
        return self._rewrapped(sealed, dek, lambda kek: _AAD_BLOB_DEK + tag + _u32(kek))

    # -- the envelope ------------------------------------------------------------------------------

    def _seal(self, plaintext: bytes, *, payload_aad: bytes, dek_aad: _DekAad) -> Sealed:
        dek = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = AESGCM(dek).encrypt(nonce, plaintext, payload_aad)
        kek_version = self.keyring.current_version
        return Sealed(
            kek_version=kek_version,
            wrapped_dek=self._wrap(dek, kek_version, dek_aad(kek_version)),
            nonce=nonce,
            ciphertext=ciphertext,
        )

    def _rewrapped(self, sealed: Sealed, dek: bytes, dek_aad: _DekAad) -> Sealed:
        kek_version = self.keyring.current_version
        return Sealed(
            kek_version=kek_version,
            wrapped_dek=self._wrap(dek, kek_version, dek_aad(kek_version)),
            nonce=sealed.nonce,
            ciphertext=sealed.ciphertext,
        )

    def _wrap(self, dek: bytes, kek_version: int, aad: bytes) -> bytes:
        kek = self.keyring._key(kek_version)
        if kek is None:  # pragma: no cover - the current version is always in the keyring
            raise errors.ConfigurationError(f"master key version {kek_version} is missing")
        nonce = os.urandom(NONCE_BYTES)
        return nonce + AESGCM(kek).encrypt(nonce, dek, aad)

    def _unwrap(self, sealed: Sealed, aad: bytes, what: str) -> bytes:
        kek = self.keyring._key(sealed.kek_version)
        if kek is None:
            raise errors.DecryptionError(
                f"{what} is wrapped by master key version {sealed.kek_version}, which is not in the keyring "
                f"({MASTER_KEYS_SETTING} holds {list(self.keyring.versions)})"
            )
        wrapped = sealed.wrapped_dek
        dek = _decrypt(kek, wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad, what)
        if len(dek) != KEY_BYTES:
            raise errors.DecryptionError(f"{what} does not open")
        return dek


def _decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes, what: str) -> bytes:
    """AES-GCM decryption whose every failure is one :class:`errors.DecryptionError` naming ``what``."""
    try:
        if len(nonce) != NONCE_BYTES:
            raise InvalidTag
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except (InvalidTag, ValueError, TypeError):
        raise errors.DecryptionError(
            f"{what} does not open: wrong master key, corrupted bytes, or bytes of another credential/version"
        ) from None


def _expect_str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def _dek_aad(credential_id: uuid.UUID, version: int, kek_version: int) -> bytes:
    return _AAD_DEK + credential_id.bytes + _u32(version) + _u32(kek_version)


def _payload_aad(credential_id: uuid.UUID, version: int) -> bytes:
    return _AAD_PAYLOAD + credential_id.bytes + _u32(version)


def _purpose_bytes(purpose: str) -> bytes:
    raw = purpose.encode("utf-8")
    if not raw or len(raw) > MAX_PURPOSE_BYTES:
        raise ValueError(f"purpose must be 1 to {MAX_PURPOSE_BYTES} bytes of UTF-8")
    return len(raw).to_bytes(2, "big") + raw


# -- duplicate detection ---------------------------------------------------------------------------


def generate_fingerprint_key() -> bytes:
    """A fresh random 32-byte HMAC key for :func:`fingerprint` (store it with :meth:`Vault.wrap_blob`)."""
    return secrets.token_bytes(KEY_BYTES)


def fingerprint(fingerprint_key: bytes, venue: str, api_key: str) -> bytes:
    """HMAC-SHA256 of venue and API key: equal keys on one venue match, the key itself is not stored.

    ``api_key`` is used exactly as given (callers trim/validate input before storing anything), so the
    fingerprint always describes the key that was sealed. The encoding is length-prefixed, so no
    venue/key split collides with another.
    """
    if len(fingerprint_key) < KEY_BYTES:
        raise ValueError(f"the fingerprint key must be at least {KEY_BYTES} bytes")
    venue_raw = str(venue).encode("utf-8")
    message = _FINGERPRINT_DOMAIN + len(venue_raw).to_bytes(2, "big") + venue_raw + api_key.encode("utf-8")
    return hmac.new(fingerprint_key, message, hashlib.sha256).digest()
