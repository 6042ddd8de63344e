"""Hypothesis throws malformed bodies, wrong types and huge values at every endpoint: never a 5xx, never a
stack trace, always the envelope (the conftest client also validates each answer against the OpenAPI document).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import api

FIELDS = [
    "venue", "credentialType", "type", "apiKey", "apiSecret", "apiPassphrase", "nickname", "name",
    "credentialId", "immediate", "cascade", "accountType", "tradingAccountId", "credentialStatus", "status",
    "offset", "limit", "url", "eventTypes", "description", "endpointId",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(["BINANCE", "okx", "EXCHANGE", "VERIFIED", "00000000-0000-0000-0000-000000000000", ""])
    | st.text(min_size=1000, max_size=20_000)  # huge strings
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
BODIES = (
    st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8).map(json.dumps).map(str.encode)
    | VALUES.map(json.dumps).map(str.encode)
    | st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
)
QUERIES = st.dictionaries(
    st.sampled_from(FIELDS), st.text(max_size=30) | st.integers(-(10**40), 10**40).map(str), max_size=6
)
ENDPOINTS = [(method, path) for method, path, _ in api.ROUTES]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(body=BODIES, params=QUERIES, wrong_method=st.booleans())
async def test_no_input_makes_a_server_error(
    api: Any, method: str, path: str, body: bytes, params: dict[str, str], wrong_method: bool
) -> None:
    """Whatever arrives (any body, any query, the wrong method), the answer is a 2xx/4xx envelope."""
    sent_method = "PATCH" if wrong_method else method
    reply = await api.call(
        sent_method,
        path,
        data=body if method == "POST" or wrong_method else None,
        params=params,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status < 500, (reply.status, reply.text[:300])
    if path in ("/metrics", "/openapi.json") and not wrong_method:
        return  # not envelopes: Prometheus text, the OpenAPI document
    assert reply.body is not None, reply.text[:300]
    assert set(reply.body) >= {"data", "success", "errno", "error"}
