"""Standard Webhooks signing and verification (engine.webhooks), against the spec's test vector and the PyPI library."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import pytest
import standardwebhooks

from engine import Event, webhooks

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(msg_id: str, ts: int, signature: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_official_test_vector_signs_byte_for_byte() -> None:
    """The Standard Webhooks test vector: our signature equals the published one exactly."""
    assert webhooks.sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE
    assert webhooks.signature_header(
        [webhooks.secret_key(VECTOR_SECRET)], VECTOR_ID, VECTOR_TS, VECTOR_BODY
    ) == (VECTOR_SIGNATURE)


def test_official_test_vector_verifies() -> None:
    """Our verifier accepts the vector at its own time and refuses it five minutes and a second later."""
    verifier = webhooks.Verifier(VECTOR_SECRET)
    hdrs = headers(VECTOR_ID, VECTOR_TS, VECTOR_SIGNATURE)
    assert verifier.verify(VECTOR_BODY, hdrs, now=VECTOR_TS) == {"test": 2432232314}
    assert verifier.verify(VECTOR_BODY, hdrs, now=VECTOR_TS + 300) == {"test": 2432232314}
    with pytest.raises(webhooks.WebhookVerificationError, match="too old"):
        verifier.verify(VECTOR_BODY, hdrs, now=VECTOR_TS + 301)
    with pytest.raises(webhooks.WebhookVerificationError, match="future"):
        verifier.verify(VECTOR_BODY, hdrs, now=VECTOR_TS - 301)


def test_standardwebhooks_library_accepts_our_signatures() -> None:
    """What we sign, the PyPI standardwebhooks package verifies (and the reverse), for fresh secrets."""
    secret = webhooks.generate_secret()
    now = int(time.time())
    body = json.dumps({"type": "credential.created", "timestamp": now * 1000, "data": {"x": "é"}}).encode()
    ours = webhooks.sign(secret, "evt-1", now, body)
    assert standardwebhooks.Webhook(secret).verify(body, headers("evt-1", now, ours))["data"] == {"x": "é"}
    theirs = standardwebhooks.Webhook(secret).sign(
        "evt-1", datetime.fromtimestamp(now, tz=UTC), body.decode()
    )
    assert theirs == ours
    assert (
        webhooks.Verifier(secret).verify(body, headers("evt-1", now, theirs))["type"] == "credential.created"
    )


def test_generated_secrets_are_whsec_base64_of_32_random_bytes() -> None:
    """generate_secret: whsec_ + base64 of 32 bytes, different each time."""
    secrets = {webhooks.generate_secret() for _ in range(20)}
    assert len(secrets) == 20
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


def test_several_secrets_any_signature_matches() -> None:
    """Rotation: a header with old and new signatures verifies with either secret alone, not with a third."""
    old, new, other = (webhooks.generate_secret() for _ in range(3))
    now = int(time.time())
    header = webhooks.signature_header(
        [webhooks.secret_key(new), webhooks.secret_key(old)], "evt-2", now, b"{}"
    )
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        assert webhooks.Verifier(secret).verify(b"{}", headers("evt-2", now, header)) == {}
        standardwebhooks.Webhook(secret).verify(b"{}", headers("evt-2", now, header))
    assert webhooks.Verifier([other, new]).verify(b"{}", headers("evt-2", now, header)) == {}
    with pytest.raises(webhooks.WebhookVerificationError, match="no signature"):
        webhooks.Verifier(other).verify(b"{}", headers("evt-2", now, header))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h, b: ({**h, "webhook-id": "evt-other"}, b), "no signature"),
        (lambda h, b: (h, b + b" "), "no signature"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "missing"),
        (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "number"),
        (lambda h, b: ({**h, "webhook-signature": "v2," + h["webhook-signature"][3:]}, b), "no signature"),
        (lambda h, b: ({**h, "webhook-signature": "v1,not base64!"}, b), "no signature"),
        (lambda h, b: (h, b"[1, 2]"), "no signature"),
    ],
)
def test_tampered_requests_are_refused(mutate: object, message: str) -> None:
    """Another id, another body, missing or malformed headers, other signature versions: all refused."""
    secret = webhooks.generate_secret()
    now = int(time.time())
    body = b'{"type":"x"}'
    hdrs = headers("evt-3", now, webhooks.sign(secret, "evt-3", now, body))
    bad_headers, bad_body = mutate(hdrs, body)  # type: ignore[operator]
    with pytest.raises(webhooks.WebhookVerificationError, match=message):
        webhooks.Verifier(secret).verify(bad_body, bad_headers)


def test_header_names_are_case_insensitive_and_non_object_bodies_refused() -> None:
    """Header names in any case work; a correctly signed body that is not a JSON object is refused."""
    secret = webhooks.generate_secret()
    now = int(time.time())
    body = b"[1]"
    hdrs = {
        "Webhook-Id": "e",
        "WEBHOOK-TIMESTAMP": str(now),
        "Webhook-Signature": webhooks.sign(secret, "e", now, body),
    }
    with pytest.raises(webhooks.WebhookVerificationError, match="object"):
        webhooks.Verifier(secret).verify(body, hdrs)


def test_verifier_and_errors_never_show_a_secret() -> None:
    """repr(Verifier) and every verification error name no secret."""
    secret = webhooks.generate_secret()
    verifier = webhooks.Verifier([secret, secret])
    assert secret not in repr(verifier) and secret[6:] not in repr(verifier)
    with pytest.raises(webhooks.WebhookVerificationError) as info:
        verifier.verify(b"{}", headers("e", int(time.time()), "v1,AAAA"))
    assert secret[6:] not in str(info.value) and secret[6:] not in repr(info.value)
    with pytest.raises(ValueError, match="whsec_") as bad:
        webhooks.Verifier("whsec_%%%")
    assert "%%%" not in str(bad.value)


def test_parse_event_inverts_event_payload() -> None:
    """parse_event(Event.payload()) gives back the same Event (credential id from data.credential)."""
    cid = uuid.uuid4()
    event = Event(
        event_id=uuid.uuid4(),
        type="credential.revoked",
        owner_id="o-1",
        credential_id=cid,
        sequence=7,
        timestamp_ms=1_700_000_000_123,
        data={"credential": {"credentialId": str(cid), "status": "REVOKED"}, "previousStatus": "VERIFIED"},
    )
    assert webhooks.parse_event(event.payload()) == event
    with pytest.raises(webhooks.WebhookVerificationError):
        webhooks.parse_event({"type": "x", "timestamp": 1, "data": {}})


def test_recent_ids_forget_the_oldest_beyond_capacity() -> None:
    """RecentIds keeps at most ``capacity`` ids, dropping the oldest first."""
    recent = webhooks.RecentIds(3)
    for i in range(5):
        recent.add(f"id-{i}")
    assert len(recent) == 3
    assert "id-0" not in recent and "id-1" not in recent
    assert all(f"id-{i}" in recent for i in (2, 3, 4))


def test_receiver_module_does_not_import_the_database_driver() -> None:
    """``import engine.webhooks`` (what receivers use) pulls in neither asyncpg nor the engine core."""
    code = "import sys, engine.webhooks; print('asyncpg' in sys.modules, 'engine.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
