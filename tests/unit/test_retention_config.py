"""The retention and LISTEN-check settings: read from the environment, refused with the field named when wrong."""

from __future__ import annotations

import math

import pytest

from engine import EngineConfig, errors
from engine.bounds import retention
from engine.queue import QueueSettings


def test_defaults() -> None:
    cfg = EngineConfig()
    assert cfg.event_retention == 30 * 86_400
    assert cfg.delivery_retention == 30 * 86_400
    assert cfg.dead_delivery_retention == 90 * 86_400
    assert cfg.key_access_retention == 400 * 86_400
    assert cfg.retention_interval == 300
    assert (cfg.listen_check_interval, cfg.listen_check_timeout) == (5, 5)
    settings = retention.RetentionSettings.of(cfg, verify_window=3600.0)
    assert (settings.batch_size, settings.max_batches) == (5_000, 20)


def test_from_env_reads_every_setting() -> None:
    cfg = EngineConfig.from_env(
        {
            "ENGINE_EVENT_RETENTION": "60",
            "ENGINE_DELIVERY_RETENTION": "120",
            "ENGINE_DEAD_DELIVERY_RETENTION": "0",
            "ENGINE_KEY_ACCESS_RETENTION": "3600",
            "ENGINE_RETENTION_INTERVAL": "10",
            "ENGINE_LISTEN_CHECK_INTERVAL": "2.5",
            "ENGINE_LISTEN_CHECK_TIMEOUT": "1",
        }
    )
    assert (cfg.event_retention, cfg.delivery_retention, cfg.dead_delivery_retention) == (60, 120, 0)
    assert (cfg.key_access_retention, cfg.retention_interval) == (3600, 10)
    assert (cfg.listen_check_interval, cfg.listen_check_timeout) == (2.5, 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("event_retention", -1.0),
        ("delivery_retention", math.inf),
        ("dead_delivery_retention", math.nan),
        ("key_access_retention", -0.5),
        ("retention_interval", 0.0),
        ("listen_check_interval", 0.0),
        ("listen_check_timeout", math.inf),
    ],
)
def test_bad_values_are_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        EngineConfig(**{field: value})
    assert field in str(caught.value)


def test_a_word_is_refused_naming_the_variable() -> None:
    with pytest.raises(errors.ConfigurationError) as caught:
        EngineConfig.from_env({"ENGINE_EVENT_RETENTION": "30d"})
    assert "ENGINE_EVENT_RETENTION" in str(caught.value)


def test_queue_settings_check_the_listen_bounds() -> None:
    with pytest.raises(errors.ConfigurationError):
        QueueSettings(listen_check_timeout=0)
