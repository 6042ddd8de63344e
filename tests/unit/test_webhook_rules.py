"""Delivery rules that need no server: retry delays, Retry-After, job payloads, configuration, schemas, models."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from engine import EngineConfig, errors, events
from engine.config import WEBHOOK_RETRY_SCHEDULE
from engine.webhooks import delivery, schemas
from engine.webhooks.models import WebhookEndpoint, display_url


def test_default_schedule_is_svix_published_one() -> None:
    """Eight attempts: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    assert WEBHOOK_RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert EngineConfig().webhook_retry_schedule == WEBHOOK_RETRY_SCHEDULE
    assert EngineConfig().webhook_timeout == 15.0
    assert EngineConfig().webhook_disable_after == 5 * 86400


def test_retry_delays_follow_the_schedule_with_jitter() -> None:
    """After try n the delay is schedule[n] within +-10 %; the last delay repeats if asked beyond the end."""
    rng = random.Random(7)
    for tries, base in enumerate(WEBHOOK_RETRY_SCHEDULE[1:], start=1):
        for _ in range(50):
            delay = delivery.retry_delay(WEBHOOK_RETRY_SCHEDULE, tries, None, rng)
            assert base * 0.9 <= delay <= base * 1.1
    spread = {round(delivery.retry_delay(WEBHOOK_RETRY_SCHEDULE, 2, None, rng), 3) for _ in range(20)}
    assert len(spread) > 10  # jitter actually varies
    assert delivery.retry_delay((0.0, 1.0), 5, None, rng) <= 1.1


def test_retry_after_is_a_floor_capped_at_a_day() -> None:
    """Retry-After later than the schedule wins; earlier does not shorten it; absurd values are capped."""
    assert delivery.retry_delay((0.0, 5.0), 1, 60.0) == 60.0
    assert 4.5 <= delivery.retry_delay((0.0, 5.0), 1, 1.0) <= 5.5
    assert delivery.retry_delay((0.0, 5.0), 1, 10**9) == delivery.MAX_RETRY_AFTER


def test_retry_after_header_forms() -> None:
    """Delta-seconds and HTTP dates are read; junk and absence give None; past dates give 0."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert delivery.parse_retry_after("120") == 120.0
    assert delivery.parse_retry_after(" 3 ") == 3.0
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert delivery.parse_retry_after(later, now=now.timestamp()) == pytest.approx(90.0)
    earlier = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert delivery.parse_retry_after(earlier, now=now.timestamp()) == 0.0
    assert delivery.parse_retry_after("soon") is None
    assert delivery.parse_retry_after(None) is None


def test_a_delivery_job_round_trips_its_payload() -> None:
    """The payload stored in the queue reads back as the same job (credential or none); one queued attempt per
    delivery (the dedupe key names the delivery); the payload's field names stay those of queued jobs."""
    for stream in (uuid.uuid4(), None):
        job = delivery.DeliveryJob(uuid.uuid4(), uuid.uuid4(), stream)
        payload = job.to_payload()
        assert set(payload) == {"deliveryId", "endpointId", "streamId"}
        assert delivery.DeliveryJob.from_payload(payload) == job
        assert job.dedupe_key == f"webhook:{job.delivery_id}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"webhook_retry_schedule": ()},
        {"webhook_retry_schedule": (5.0, 1.0)},
        {"webhook_retry_schedule": (0.0, -1.0)},
        {"webhook_timeout": 0},
        {"webhook_disable_after": -1},
    ],
)
def test_bad_webhook_settings_are_configuration_errors(overrides: dict[str, object]) -> None:
    """Webhook settings are checked when the config is built."""
    with pytest.raises(errors.ConfigurationError):
        EngineConfig(**overrides)  # type: ignore[arg-type]


def test_every_event_type_has_a_schema() -> None:
    """Each type in events.EVENT_TYPES has a schema whose `type` is a constant of that name."""
    assert set(schemas.EXTRAS) == set(events.EVENT_TYPES)
    for name, body in schemas.all_schemas().items():
        assert body["properties"]["type"] == {"const": name}
        assert "credential" in body["properties"]["data"]["required"] or name.startswith("webhook_endpoint.")
    strict = schemas.schema("credential.created", strict=True)
    assert strict["properties"]["data"]["additionalProperties"] is False
    assert "additionalProperties" not in schemas.schema("credential.created")["properties"]["data"]


def test_display_url_drops_query_and_user_info() -> None:
    """What events and logs show of an endpoint URL: no query (tokens), no fragment, no user info."""
    assert (
        display_url("https://u:p@Hooks.example.com:8443/in/x?token=abc#f")
        == "https://hooks.example.com:8443/in/x"
    )
    assert display_url("http://[::1]:9/h") == "http://[::1]:9/h"


def test_endpoint_secret_is_not_in_repr_or_equality() -> None:
    """WebhookEndpoint.secret is hidden from repr and ignored by ==."""
    now = 1_700_000_000_000
    fields = {
        "endpoint_id": uuid.uuid4(),
        "owner_id": "o",
        "url": "https://x.example/h",
        "description": None,
        "event_types": None,
        "enabled": True,
        "disabled_reason": None,
        "failing_since_ms": None,
        "created_at_ms": now,
        "updated_at_ms": now,
    }
    with_secret = WebhookEndpoint(**fields, secret="whsec_c2VjcmV0c2VjcmV0")  # type: ignore[arg-type]
    assert "whsec_" not in repr(with_secret) and "secret" not in with_secret.public_dict()
    assert with_secret == WebhookEndpoint(**fields)  # type: ignore[arg-type]
