"""Scopes against every route: no token 401, a token without the route's scope 403 (errno -110005), a token with
only that scope passes. Table-driven over the server's ROUTES: a new route without a scope, or without a case
here, fails these tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine import CredentialEngine, cli, errors
from engine.api import auth, scopes, server

OWNER = "owner-1"
MISSING_ID = "00000000-0000-0000-0000-000000000000"

# (method, path) -> the request made with a token holding only the route's scope, and the status expected.
# Run in this order (reads before the writes that change what they read). ids: filled by the setup.
Case = tuple[Callable[[dict[str, str]], dict[str, Any]], int]
CASES: dict[tuple[str, str], Case] = {
    ("GET", "/api/v3/credential/get"): (lambda ids: {"params": {"credentialId": ids["cid"]}}, 200),
    ("GET", "/api/v3/credential/list"): (lambda ids: {"params": {}}, 200),
    ("POST", "/api/v3/credential/create"): (
        lambda ids: {
            "json_body": {
                "venue": "OKX",
                "apiKey": "okx-key-0001",
                "apiSecret": "okx-secret-0001",
                "apiPassphrase": "okx-pass-1",
            }
        },
        200,
    ),
    ("POST", "/api/v3/tradingAccount/connect"): (
        lambda ids: {"json_body": {"credentialId": ids["cid"], "accountType": "SPOT", "name": "Spot desk"}},
        200,
    ),
    ("GET", "/api/v3/tradingAccount/get"): (lambda ids: {"params": {"tradingAccountId": ids["aid"]}}, 200),
    ("GET", "/api/v3/tradingAccount/list"): (lambda ids: {"params": {}}, 200),
    ("POST", "/api/v3/tradingAccount/disconnect"): (
        lambda ids: {"json_body": {"tradingAccountId": ids["aid"]}},
        200,
    ),
    ("POST", "/api/v3/credential/verify"): (lambda ids: {"json_body": {"credentialId": ids["cid"]}}, 200),
    ("POST", "/api/v3/credential/rotate"): (
        lambda ids: {
            "json_body": {
                "credentialId": ids["cid"],
                "apiKey": "binance-key-0002",
                "apiSecret": "binance-secret-0002",
            }
        },
        200,
    ),
    ("POST", "/api/v3/credential/revoke"): (lambda ids: {"json_body": {"credentialId": ids["cid"]}}, 200),
    # an EXCHANGE credential mints nothing (409, errno -100022): the scope check comes first all the same
    ("POST", "/api/v3/credential/mint"): (
        lambda ids: {"json_body": {"brokerCredentialId": ids["cid"], "subAccount": "sub-1"}},
        409,
    ),
    ("POST", "/api/v3/webhook/create"): (
        lambda ids: {"json_body": {"url": "http://127.0.0.1:9/other-hooks"}},
        200,
    ),
    ("GET", "/api/v3/webhook/list"): (lambda ids: {"params": {}}, 200),
    ("GET", "/api/v3/webhook/get"): (lambda ids: {"params": {"endpointId": ids["eid"]}}, 200),
    ("POST", "/api/v3/webhook/update"): (
        lambda ids: {"json_body": {"endpointId": ids["eid"], "eventTypes": []}},
        200,
    ),
    ("POST", "/api/v3/webhook/rotateSecret"): (lambda ids: {"json_body": {"endpointId": ids["eid"]}}, 200),
    ("GET", "/api/v3/webhook/delivery/list"): (lambda ids: {"params": {"endpointId": ids["eid"]}}, 200),
    ("POST", "/api/v3/webhook/delivery/retry"): (lambda ids: {"json_body": {"deliveryId": MISSING_ID}}, 404),
    ("POST", "/api/v3/webhook/delete"): (lambda ids: {"json_body": {"endpointId": ids["eid"]}}, 200),
}
API_ROUTES = [(method, path) for method, path, _ in server.ROUTES if path.startswith("/api/")]


def test_every_api_route_declares_a_scope_and_has_a_case() -> None:
    """ROUTES, ROUTE_SCOPES and this table name the same /api routes; operator routes are the public ones."""
    assert set(API_ROUTES) == set(scopes.ROUTE_SCOPES) == set(CASES)
    public = {(method, path) for method, path, _ in server.ROUTES if not path.startswith("/api/")}
    assert public == scopes.PUBLIC_ROUTES


def test_an_api_route_without_a_scope_refuses_to_start() -> None:
    """make_app's check: a new /api route that declares no scope is a ConfigurationError, not an open route."""
    routes = [*API_ROUTES, *scopes.PUBLIC_ROUTES]
    scopes.check_routes(routes)
    with pytest.raises(errors.ConfigurationError, match="declares no scope"):
        scopes.check_routes([*routes, ("POST", "/api/v3/credential/export")])
    with pytest.raises(errors.ConfigurationError, match="neither scoped nor public"):
        scopes.check_routes([*routes, ("GET", "/debug")])
    with pytest.raises(errors.ConfigurationError, match="missing route"):
        scopes.check_routes(routes[1:])


async def test_scopes_against_every_route(
    api: Any, eng: CredentialEngine, jwt_secret: str, create_body: Callable[..., Any]
) -> None:
    """For each /api route: no token 401; every scope but its own 403 naming the scope; only its own scope
    the route's success (or, for delivery/retry of a missing id, 404: past the scope check)."""
    cid = (await api.post("/api/v3/credential/create", create_body())).data["credentialId"]
    await eng.run_until_idle()
    account = await api.post(
        "/api/v3/tradingAccount/connect", {"credentialId": cid, "accountType": "MARGIN", "name": "Margin"}
    )
    endpoint = await api.post("/api/v3/webhook/create", {"url": "http://127.0.0.1:9/hooks"})
    ids = {"cid": cid, "aid": account.data["tradingAccountId"], "eid": endpoint.data["endpointId"]}
    for (method, path), (request, expected) in CASES.items():
        scope = scopes.ROUTE_SCOPES[(method, path)]
        others = [name for name in scopes.ALL_SCOPES if name != scope]
        kwargs = request(ids)
        anonymous = await api.call(method, path, token=None, **kwargs)
        assert anonymous.status == 401 and anonymous.body["errno"] == -110001, (method, path)
        refused = await api.call(
            method, path, token=auth.mint_token(jwt_secret, OWNER, scopes=others), **kwargs
        )
        assert refused.status == 403, (method, path, refused.text)
        assert refused.body["errno"] == -110005 and scope in refused.body["error"], (method, path)
        allowed = await api.call(
            method, path, token=auth.mint_token(jwt_secret, OWNER, scopes=[scope]), **kwargs
        )
        assert allowed.status == expected, (method, path, allowed.text)


async def test_a_token_without_scopes_is_403_everywhere_and_operator_routes_stay_open(
    api: Any, jwt_secret: str
) -> None:
    """A signed token that grants nothing (no scope claim) passes authentication and is refused by every /api
    route; /healthz, /readyz, /metrics and /openapi.json need no token at all."""
    import jwt  # the oracle: a token without a scope claim

    bare = jwt.encode({"sub": OWNER, "exp": 4_000_000_000}, jwt_secret, algorithm="HS256")
    for method, path in API_ROUTES:
        reply = await api.call(method, path, token=bare, json_body={} if method == "POST" else None)
        assert reply.status == 403, (method, path)
    for method, path in sorted(scopes.PUBLIC_ROUTES):
        reply = await api.call(method, path, token=None)
        assert reply.status not in (401, 403), path


async def test_connect_with_keys_also_needs_credentials_write(api: Any, jwt_secret: str) -> None:
    """Connecting with keys stores a credential: accounts:write alone is 403 naming credentials:write."""
    body = {"venue": "BINANCE", "apiKey": "binance-key-0001", "apiSecret": "binance-secret-0001", "name": "B"}
    only_accounts = auth.mint_token(jwt_secret, OWNER, scopes=[scopes.ACCOUNTS_WRITE])
    reply = await api.post("/api/v3/tradingAccount/connect", body, token=only_accounts)
    assert reply.status == 403 and "credentials:write" in reply.body["error"]
    both = auth.mint_token(jwt_secret, OWNER, scopes=[scopes.ACCOUNTS_WRITE, scopes.CREDENTIALS_WRITE])
    assert (await api.post("/api/v3/tradingAccount/connect", body, token=both)).status == 200


def test_token_command_grants_every_scope_unless_narrowed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`credential-engine token` carries every scope; --scope (repeatable, space-separated) narrows it; an
    unknown scope is a usage error naming it."""
    secret = auth.generate_secret()
    monkeypatch.setenv(auth.SECRET_ENV, secret)
    assert cli.main(["token", "--owner", "desk-7"]) == 0
    assert auth.verify_token(secret, capsys.readouterr().out.strip()).scopes == set(scopes.ALL_SCOPES)
    argv = [
        "token",
        "--owner",
        "desk-7",
        "--scope",
        "credentials:read webhooks:read",
        "--scope",
        "accounts:read",
    ]
    assert cli.main(argv) == 0
    granted = auth.verify_token(secret, capsys.readouterr().out.strip()).scopes
    assert granted == {"credentials:read", "webhooks:read", "accounts:read"}
    assert cli.main(["token", "--owner", "desk-7", "--scope", "credentials:delete"]) == 2
    assert "credentials:delete" in capsys.readouterr().err
