"""Envelope encryption, master keyrings and fingerprints (engine/crypto.py)."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import json
import os
import pickle
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine import crypto, errors
from venues.base import ApiKeys

CANARY = "CANARY-s3cr3t-7f9a2c"
CANARY_PASSPHRASE = "CANARY-pass-0b1e"
KEK_1 = bytes(range(32))
KEK_2 = bytes(range(100, 132))


def spec_of(*pairs: tuple[int, bytes]) -> str:
    return ",".join(f"{version}:{base64.b64encode(key).decode()}" for version, key in pairs)


@pytest.fixture
def keys() -> ApiKeys:
    return ApiKeys(api_key="pubkey-0123456789abcdef", api_secret=CANARY, api_passphrase=CANARY_PASSPHRASE)


@pytest.fixture
def vault() -> crypto.Vault:
    return crypto.Vault(crypto.MasterKeyring({1: KEK_1}))


@pytest.fixture
def cid() -> uuid.UUID:
    return uuid.UUID("6f1c3c9e-0a51-4a8b-9d0e-3c2b1a09f8e7")


def with_field(sealed: crypto.Sealed, name: str, value: bytes) -> crypto.Sealed:
    fields = {"wrapped_dek": sealed.wrapped_dek, "nonce": sealed.nonce, "ciphertext": sealed.ciphertext}
    fields[name] = value
    return crypto.Sealed(kek_version=sealed.kek_version, **fields)


def flipped(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_seal_then_open_round_trips(vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID) -> None:
    """What is sealed for a credential version opens to equal keys, passphrase or not."""
    sealed = vault.seal(keys, credential_id=cid, version=1)
    assert vault.open(sealed, credential_id=cid, version=1) == keys
    plain = ApiKeys(api_key="k" * 16, api_secret="ünïcode-secret")
    assert vault.open(vault.seal(plain, credential_id=cid, version=2), credential_id=cid, version=2) == plain


def test_every_seal_uses_fresh_randomness(vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID) -> None:
    """Sealing the same keys twice shares no data key, nonce or ciphertext."""
    first = vault.seal(keys, credential_id=cid, version=1)
    second = vault.seal(keys, credential_id=cid, version=1)
    assert first.wrapped_dek != second.wrapped_dek
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext
    assert CANARY.encode() not in first.ciphertext


def test_ciphertext_copied_to_another_credential_does_not_open(
    vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID
) -> None:
    """Associated data binds the secret to its credential id; the error names id and version only."""
    sealed = vault.seal(keys, credential_id=cid, version=1)
    other = uuid.uuid4()
    with pytest.raises(errors.DecryptionError) as caught:
        vault.open(sealed, credential_id=other, version=1)
    assert str(other) in str(caught.value)
    assert "version 1" in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_ciphertext_copied_to_another_version_does_not_open(
    vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID
) -> None:
    """Associated data binds the secret to its secret version."""
    sealed = vault.seal(keys, credential_id=cid, version=1)
    with pytest.raises(errors.DecryptionError, match="version 2"):
        vault.open(sealed, credential_id=cid, version=2)


def test_payload_moved_under_another_data_key_does_not_open(
    vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID
) -> None:
    """A row's ciphertext paired with another row's wrapped data key (same id and version) fails."""
    one = vault.seal(keys, credential_id=cid, version=1)
    two = vault.seal(keys, credential_id=cid, version=1)
    with pytest.raises(errors.DecryptionError):
        vault.open(dataclasses.replace(one, wrapped_dek=two.wrapped_dek), credential_id=cid, version=1)


@pytest.mark.parametrize("field", ["wrapped_dek", "nonce", "ciphertext"])
def test_any_tampered_byte_fails(vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID, field: str) -> None:
    """Flipping one bit at any position of any stored field makes opening fail."""
    sealed = vault.seal(keys, credential_id=cid, version=1)
    original: bytes = getattr(sealed, field)
    for index in range(len(original)):
        with pytest.raises(errors.DecryptionError):
            vault.open(with_field(sealed, field, flipped(original, index)), credential_id=cid, version=1)
    for truncated in (original[:-1], original + b"\x00", b""):
        with pytest.raises(errors.DecryptionError):
            vault.open(with_field(sealed, field, truncated), credential_id=cid, version=1)


def test_stored_format_is_the_documented_envelope(vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID) -> None:
    """Stored bytes follow the documented layout and AADs, and the payload itself is bound to its row."""
    sealed = vault.seal(keys, credential_id=cid, version=5)
    row = cid.bytes + (5).to_bytes(4, "big")
    nonce, wrapped = sealed.wrapped_dek[:12], sealed.wrapped_dek[12:]
    dek = AESGCM(KEK_1).decrypt(nonce, wrapped, b"ce:v1:dek:" + row + (1).to_bytes(4, "big"))
    payload = AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, b"ce:v1:payload:" + row)
    assert json.loads(payload) == {"key": keys.api_key, "secret": CANARY, "passphrase": CANARY_PASSPHRASE}

    # an attacker who could rewrap the data key for another row still cannot move the payload there
    other = uuid.uuid4()
    forged_aad = b"ce:v1:dek:" + other.bytes + (5).to_bytes(4, "big") + (1).to_bytes(4, "big")
    forged = dataclasses.replace(sealed, wrapped_dek=nonce + AESGCM(KEK_1).encrypt(nonce, dek, forged_aad))
    with pytest.raises(errors.DecryptionError):
        vault.open(forged, credential_id=other, version=5)


def test_tampered_kek_version_fails(keys: ApiKeys, cid: uuid.UUID) -> None:
    """A wrapped data key relabelled with another master-key version does not open, even if it exists."""
    vault = crypto.Vault(crypto.MasterKeyring({1: KEK_1, 2: KEK_1}, current=1))
    sealed = vault.seal(keys, credential_id=cid, version=1)
    with pytest.raises(errors.DecryptionError):
        vault.open(dataclasses.replace(sealed, kek_version=2), credential_id=cid, version=1)


def test_rewrap_moves_to_new_master_key_without_touching_payload(keys: ApiKeys, cid: uuid.UUID) -> None:
    """Rewrapping changes only the wrapped data key; without the old master key the secret still opens."""
    old = crypto.Vault(crypto.MasterKeyring({1: KEK_1}))
    sealed = old.seal(keys, credential_id=cid, version=3)
    both = crypto.Vault(crypto.MasterKeyring({1: KEK_1, 2: KEK_2}))
    assert both.needs_rewrap(sealed)

    rewrapped = both.rewrap(sealed, credential_id=cid, version=3)

    assert rewrapped.kek_version == 2
    assert rewrapped.ciphertext == sealed.ciphertext  # the payload was not re-encrypted
    assert rewrapped.nonce == sealed.nonce
    assert rewrapped.wrapped_dek != sealed.wrapped_dek
    assert not both.needs_rewrap(rewrapped)
    assert both.open(rewrapped, credential_id=cid, version=3) == keys
    new_only = crypto.Vault(crypto.MasterKeyring({2: KEK_2}))
    assert new_only.open(rewrapped, credential_id=cid, version=3) == keys
    with pytest.raises(errors.DecryptionError, match="master key version 1"):
        new_only.open(sealed, credential_id=cid, version=3)


def test_rewrap_is_a_noop_when_current(vault: crypto.Vault, keys: ApiKeys, cid: uuid.UUID) -> None:
    """A secret already under the current master key comes back unchanged."""
    sealed = vault.seal(keys, credential_id=cid, version=1)
    assert not vault.needs_rewrap(sealed)
    assert vault.rewrap(sealed, credential_id=cid, version=1) is sealed


def test_rewrap_checks_the_bound_context(keys: ApiKeys, cid: uuid.UUID) -> None:
    """Rewrapping under the wrong credential id fails instead of producing a relabelled secret."""
    sealed = crypto.Vault(crypto.MasterKeyring({1: KEK_1})).seal(keys, credential_id=cid, version=1)
    both = crypto.Vault(crypto.MasterKeyring({1: KEK_1, 2: KEK_2}))
    with pytest.raises(errors.DecryptionError):
        both.rewrap(sealed, credential_id=uuid.uuid4(), version=1)


def test_blobs_round_trip_bound_to_purpose_and_rewrap() -> None:
    """Engine blobs open only for their purpose, survive rewrapping, and are not credential secrets."""
    data = os.urandom(32)
    old = crypto.Vault(crypto.MasterKeyring({1: KEK_1}))
    sealed = old.wrap_blob(data, purpose="fingerprint-key")
    assert old.unwrap_blob(sealed, purpose="fingerprint-key") == data
    with pytest.raises(errors.DecryptionError):
        old.unwrap_blob(sealed, purpose="fingerprint-key2")
    with pytest.raises(errors.DecryptionError):
        old.open(sealed, credential_id=uuid.uuid4(), version=1)

    both = crypto.Vault(crypto.MasterKeyring({1: KEK_1, 2: KEK_2}))
    rewrapped = both.rewrap_blob(sealed, purpose="fingerprint-key")
    assert (rewrapped.kek_version, rewrapped.ciphertext, rewrapped.nonce) == (
        2,
        sealed.ciphertext,
        sealed.nonce,
    )
    assert both.rewrap_blob(rewrapped, purpose="fingerprint-key") is rewrapped
    new_only = crypto.Vault(crypto.MasterKeyring({2: KEK_2}))
    assert new_only.unwrap_blob(rewrapped, purpose="fingerprint-key") == data
    with pytest.raises(ValueError, match="purpose"):
        old.wrap_blob(data, purpose="")


def test_fingerprints_are_stable_keyed_and_venue_separated() -> None:
    """The same key on the same venue always matches; another venue, key or HMAC key does not."""
    fp_key = crypto.generate_fingerprint_key()
    assert len(fp_key) == 32
    assert fp_key != crypto.generate_fingerprint_key()
    first = crypto.fingerprint(fp_key, "BINANCE", "my-api-key")
    assert len(first) == 32
    assert crypto.fingerprint(fp_key, "BINANCE", "my-api-key") == first
    assert crypto.fingerprint(fp_key, "OKX", "my-api-key") != first
    assert crypto.fingerprint(fp_key, "BINANCE", "my-api-kez") != first
    assert crypto.fingerprint(crypto.generate_fingerprint_key(), "BINANCE", "my-api-key") != first
    # the encoding is unambiguous: moving characters between venue and key changes the result
    assert crypto.fingerprint(fp_key, "AB", "C") != crypto.fingerprint(fp_key, "A", "BC")
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.fingerprint(b"short", "BINANCE", "my-api-key")


def test_spec_highest_version_is_current_unless_starred() -> None:
    """Without a marker the highest version is current; a trailing ``*`` picks another one."""
    ring = crypto.MasterKeyring.from_spec(spec_of((2, KEK_2), (1, KEK_1)))
    assert (ring.versions, ring.current_version) == ((1, 2), 2)
    starred = crypto.MasterKeyring.from_spec(f" {spec_of((1, KEK_1))}* , {spec_of((2, KEK_2))} ")
    assert starred.current_version == 1
    assert (
        crypto.Vault(starred).seal(ApiKeys("a" * 8, "b"), credential_id=uuid.uuid4(), version=1).kek_version
        == 1
    )


def test_generated_spec_parses_and_is_random() -> None:
    """generate_spec gives a ready-to-use entry for the requested version, fresh each time."""
    spec = crypto.MasterKeyring.generate_spec(3)
    assert crypto.MasterKeyring.from_spec(spec).versions == (3,)
    assert spec != crypto.MasterKeyring.generate_spec(3)


BAD_KEY_B64 = base64.b64encode(b"\xaa" * 31).decode()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (BAD_KEY_B64, "form"),
        (f"x:{BAD_KEY_B64}", "version"),
        (f"0:{BAD_KEY_B64}", "version"),
        (f"{BAD_KEY_B64}:1", "version"),
        (f"1:{BAD_KEY_B64}", "32 bytes"),
        ("1:not base64 at all!", "base64"),
        (f"{spec_of((1, KEK_1))},", "empty"),
        (f"{spec_of((1, KEK_1))},{spec_of((1, KEK_2))}", "twice"),
        (f"{spec_of((1, KEK_1))}*,{spec_of((2, KEK_2))}*", "more than one"),
    ],
)
def test_spec_errors_name_the_setting_and_never_echo_keys(spec: str, reason: str) -> None:
    """Every malformed ENGINE_MASTER_KEYS says which setting and why, without repeating any key text."""
    with pytest.raises(errors.ConfigurationError) as caught:
        crypto.MasterKeyring.from_spec(spec)
    message = str(caught.value)
    assert "ENGINE_MASTER_KEYS" in message
    assert reason in message
    assert caught.value.field == "ENGINE_MASTER_KEYS"
    for secret in (BAD_KEY_B64, base64.b64encode(KEK_1).decode(), base64.b64encode(KEK_2).decode()):
        assert secret not in message


def test_spec_errors_use_the_given_setting_name() -> None:
    """A caller reading the spec from elsewhere gets its own setting name in the message."""
    with pytest.raises(errors.ConfigurationError, match="MY_KEYS entry 1"):
        crypto.MasterKeyring.from_spec("bogus", setting="MY_KEYS")


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Umask 000, so only the explicit 0600 can keep a new file private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_load_or_create_makes_a_private_file_and_reuses_it(tmp_path: Path) -> None:
    """Zero-config creates a 0600 key file (even with umask 000), then reuses the same key, and warns."""
    path = tmp_path / "state" / "master.key"
    with structlog.testing.capture_logs() as logs:
        first = crypto.MasterKeyring.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(tmp_path.joinpath("state").iterdir()) == [path]  # no temporary file left behind
    second = crypto.MasterKeyring.load_or_create(path)
    assert first.versions == second.versions == (1,)
    sealed = crypto.Vault(first).seal(ApiKeys("a" * 8, CANARY), credential_id=uuid.UUID(int=1), version=1)
    assert crypto.Vault(second).open(sealed, credential_id=uuid.UUID(int=1), version=1).api_secret == CANARY
    from_text = crypto.Vault(crypto.MasterKeyring.from_spec(path.read_text()))
    assert from_text.open(sealed, credential_id=uuid.UUID(int=1), version=1).api_secret == CANARY
    [record] = logs
    assert record["log_level"] == "warning"
    assert record["created"] is True
    assert "ENGINE_MASTER_KEYS" in record["hint"]
    assert "back" in record["hint"]
    assert path.read_text().strip() not in repr(record)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_or_create_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    """A key file readable or writable by group/others is refused, with the fix in the message."""
    path = tmp_path / "master.key"
    path.write_text(crypto.MasterKeyring.generate_spec() + "\n")
    path.chmod(mode)
    with pytest.raises(errors.ConfigurationError, match="chmod 600") as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert path.read_text().strip().split(":")[1] not in str(caught.value)


def test_load_or_create_reports_a_broken_file_by_path(tmp_path: Path) -> None:
    """A corrupt key file is a configuration error naming the file, not its content."""
    path = tmp_path / "master.key"
    path.write_text("1:" + BAD_KEY_B64)
    path.chmod(0o600)
    with pytest.raises(errors.ConfigurationError, match=f"master key file {path}") as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert BAD_KEY_B64 not in str(caught.value)


NOBODY = 65534  # another user: the key file or its folder handed to them with os.chown (tests run as root)
as_root = pytest.mark.skipif(
    os.name != "posix" or os.geteuid() != 0, reason="chown to another user needs root"
)


def private_key_file(path: Path) -> Path:
    """A valid 0600 key file at ``path`` (its folder made 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(crypto.MasterKeyring.generate_spec() + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.usefixtures("permissive_umask")
def test_created_key_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    """Zero-config makes the missing folder 0700 and the file 0600, whatever the umask."""
    path = tmp_path / "data" / "engine" / "master.keys"
    crypto.MasterKeyring.load_or_create(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == os.geteuid()


@as_root
def test_key_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A key file someone else owns (they could rewrite it, or chmod it open) is refused, by path and uid."""
    path = private_key_file(tmp_path / "state" / "master.keys")
    os.chown(path, NOBODY, -1)
    with pytest.raises(errors.ConfigurationError) as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert str(path) in caught.value.message and f"owned by uid {NOBODY}" in caught.value.message
    assert caught.value.field == "ENGINE_MASTER_KEYS"


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-key-file", "dangling"])
def test_symlinked_key_file_is_refused(tmp_path: Path, dangling: bool) -> None:
    """The key file's own name must not be a symbolic link (opened with O_NOFOLLOW): a link to a valid key
    file is refused, and a dangling one is refused without creating a key at its target."""
    target = tmp_path / "elsewhere" / "master.keys"
    if not dangling:
        private_key_file(target)
    else:
        target.parent.mkdir(mode=0o700)
    path = tmp_path / "state" / "master.keys"
    path.parent.mkdir(mode=0o700)
    path.symlink_to(target)
    with pytest.raises(errors.ConfigurationError) as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert str(path) in caught.value.message and "symbolic link" in caught.value.message
    assert target.exists() is not dangling  # nothing was written through the link
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.keys"]  # no temporary file left


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o730, 0o703], ids=oct)
@pytest.mark.parametrize("where", ["folder", "ancestor"])
def test_key_file_in_a_folder_others_can_write_is_refused(tmp_path: Path, mode: int, where: str) -> None:
    """Group/other write permission on the folder (or any folder above it) without the sticky bit lets them
    replace the file: refused before any key is written, naming the folder and the fix."""
    outer = tmp_path / "outer"
    path = tmp_path / "outer" / "inner" / "master.keys"
    path.parent.mkdir(mode=0o700, parents=True)
    loose = path.parent if where == "folder" else outer
    loose.chmod(mode)
    with pytest.raises(errors.ConfigurationError) as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert str(path) in caught.value.message and f"the folder {loose} is writable" in caught.value.message
    assert f"chmod go-w {loose}" in caught.value.message
    assert not path.exists()  # no key was generated into it


def test_key_file_in_a_sticky_shared_folder_is_accepted(tmp_path: Path) -> None:
    """A world-writable folder with the sticky bit (like /tmp) is fine: nobody else can rename our file."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "master.keys"
    assert crypto.MasterKeyring.load_or_create(path).versions == (1,)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@as_root
def test_key_file_in_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    """The folder's owner can replace the file: a folder owned by another user (not root) is refused."""
    path = private_key_file(tmp_path / "theirs" / "master.keys")
    os.chown(path.parent, NOBODY, -1)
    with pytest.raises(errors.ConfigurationError) as caught:
        crypto.MasterKeyring.load_or_create(path)
    assert str(path) in caught.value.message and f"owned by uid {NOBODY}" in caught.value.message


def test_a_fifo_in_place_of_the_key_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO would block a plain open() until someone writes: it is refused at once (O_NONBLOCK)."""
    path = tmp_path / "state" / "master.keys"
    path.parent.mkdir(mode=0o700)
    os.mkfifo(path, 0o600)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(crypto.MasterKeyring.load_or_create, path)
        try:
            with pytest.raises(errors.ConfigurationError, match="not a regular file"):
                future.result(timeout=10)
        finally:
            if not future.done():  # the old behaviour: release the blocked reader so the test can end
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_keyring_cannot_be_pickled() -> None:
    """Master keys are not copied out through pickle."""
    with pytest.raises(TypeError):
        pickle.dumps(crypto.MasterKeyring({1: KEK_1}))


def test_no_text_of_any_object_reveals_secrets_or_key_bytes(keys: ApiKeys, cid: uuid.UUID) -> None:
    """repr/str of keyrings, vaults, sealed values, opened keys and every error hold no secret or key byte."""
    ring = crypto.MasterKeyring.from_spec(spec_of((1, KEK_1), (2, KEK_2)))
    vault = crypto.Vault(ring)
    sealed = vault.seal(keys, credential_id=cid, version=1)
    blob = vault.wrap_blob(KEK_1, purpose="fingerprint-key")
    texts: list[str] = []
    for obj in (ring, vault, sealed, blob, vault.open(sealed, credential_id=cid, version=1)):
        texts += [repr(obj), str(obj)]
    failures: list[Exception] = []
    for attempt in (
        lambda: vault.open(sealed, credential_id=uuid.uuid4(), version=1),
        lambda: vault.open(
            dataclasses.replace(sealed, ciphertext=flipped(sealed.ciphertext, 0)),
            credential_id=cid,
            version=1,
        ),
        lambda: crypto.Vault(crypto.MasterKeyring({3: KEK_1})).open(sealed, credential_id=cid, version=1),
        lambda: vault.unwrap_blob(blob, purpose="other"),
        lambda: crypto.MasterKeyring.from_spec(spec_of((1, KEK_1)) + ",1:" + BAD_KEY_B64),
        lambda: crypto.MasterKeyring.from_spec(spec_of((1, KEK_1[:31]))),
        lambda: crypto.MasterKeyring({1: KEK_1[:31]}),
    ):
        with pytest.raises(errors.CredentialEngineError) as caught:
            attempt()
        failures.append(caught.value)
    for exc in failures:
        texts += [repr(exc), str(exc), repr(exc.args)]
    forbidden = [CANARY, CANARY_PASSPHRASE, "0123456789abcdef", BAD_KEY_B64]
    for raw in (
        KEK_1,
        KEK_2,
        KEK_1[:31],
        sealed.wrapped_dek,
        sealed.ciphertext,
        sealed.nonce,
        blob.ciphertext,
    ):
        forbidden += [
            raw.hex(),
            base64.b64encode(raw).decode(),
            base64.b64encode(raw).decode().rstrip("=")[:16],
        ]
        forbidden += [repr(raw)[2:30]]
    for text in texts:
        for secret in forbidden:
            assert secret not in text, text
