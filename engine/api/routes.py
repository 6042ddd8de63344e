"""The REST API's domain routes: credentials and trading accounts, in the dialect of docs/api-dialect.md.

Each handler reads its fields (both spellings of docs/api-dialect.md §4, where they differ), calls one
:class:`~engine.engine.CredentialEngine` method for the token's owner, and answers the public dict of the
result in the envelope. Field rules (required, lengths, formats) are the engine's own (``engine.validation``),
so the library and the API refuse the same things with the same messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from engine import errors
from engine.api import http, scopes

if TYPE_CHECKING:
    from engine.engine import CredentialEngine

ENGINE: web.AppKey[CredentialEngine] = web.AppKey("engine")
CONNECT_WAIT: web.AppKey[float] = web.AppKey("connect_wait", float)
DEFAULT_LIMIT = 50  # docs/api-dialect.md §6's pagination example


def engine_of(request: web.Request) -> CredentialEngine:
    return request.app[ENGINE]


# ---- credentials --------------------------------------------------------------------------------------------


async def create_credential(request: web.Request) -> web.Response:
    """POST /api/v3/credential/create (both spellings of docs/api-dialect.md §4 work)."""
    f = await http.body(request)
    cred = await engine_of(request).create_credential(
        http.owner_of(request),
        venue=f.text("venue") or "",  # "" is refused by the engine as "is required", naming the field
        credential_type=f.text("credentialType", "type"),
        api_key=f.text("apiKey") or "",
        api_secret=f.text("apiSecret") or "",
        api_passphrase=f.text("apiPassphrase"),
        nickname=f.text("nickname", "name"),
    )
    return http.ok(cred.public_dict())


async def verify_credential(request: web.Request) -> web.Response:
    """POST /api/v3/credential/verify: enqueue a (re-)verification; the answer is the credential as it is now."""
    f = await http.body(request)
    cred = await engine_of(request).verify_credential(http.owner_of(request), required(f, "credentialId"))
    return http.ok(cred.public_dict())


async def get_credential(request: web.Request) -> web.Response:
    """GET /api/v3/credential/get?credentialId=..."""
    f = http.query(request)
    cred = await engine_of(request).get_credential(http.owner_of(request), required(f, "credentialId"))
    return http.ok(cred.public_dict())


async def list_credentials(request: web.Request) -> web.Response:
    """GET /api/v3/credential/list with docs/api-dialect.md §6's filters and pagination."""
    f = http.query(request)
    page = await engine_of(request).list_credentials(
        http.owner_of(request),
        status=f.text("credentialStatus", "status"),
        credential_type=f.text("credentialType", "type"),
        venue=f.text("venue"),
        offset=f.integer("offset", 0),
        limit=f.integer("limit", DEFAULT_LIMIT),
    )
    return http.ok([c.public_dict() for c in page.items], page=page)


async def rotate_credential(request: web.Request) -> web.Response:
    """POST /api/v3/credential/rotate: stage new keys (``immediate``: replace the old ones now), or, for a
    credential minted through a BROKER credential, ``automatic``: the engine mints the new key itself."""
    f = await http.body(request)
    automatic = f.flag("automatic", False)
    cred = await engine_of(request).rotate_credential(
        http.owner_of(request),
        required(f, "credentialId"),
        api_key=f.text("apiKey") if automatic else f.text("apiKey") or "",
        api_secret=f.text("apiSecret") if automatic else f.text("apiSecret") or "",
        api_passphrase=f.text("apiPassphrase"),
        immediate=f.flag("immediate", False),
        automatic=automatic,
    )
    return http.ok(cred.public_dict())


async def mint_credential(request: web.Request) -> web.Response:
    """POST /api/v3/credential/mint: a credential whose key the engine creates for a sub-account through the
    master key of a BROKER credential (PENDING; minted and verified by jobs)."""
    f = await http.body(request)
    cred = await engine_of(request).mint_credential(
        http.owner_of(request),
        required(f, "brokerCredentialId"),
        sub_account=f.raw("subAccount"),
        permissions=f.raw("permissions"),
        ip_allowlist=f.raw("ipAllowlist"),
        nickname=f.text("nickname", "name"),
    )
    return http.ok(cred.public_dict())


async def revoke_credential(request: web.Request) -> web.Response:
    """POST /api/v3/credential/revoke: for good; ``cascade`` (default true) disconnects the accounts."""
    f = await http.body(request)
    cred = await engine_of(request).revoke_credential(
        http.owner_of(request), required(f, "credentialId"), cascade=f.flag("cascade", True)
    )
    return http.ok(cred.public_dict())


# ---- trading accounts ---------------------------------------------------------------------------------------

_KEY_FIELDS = ("venue", "apiKey", "apiSecret", "apiPassphrase")


async def connect_trading_account(request: web.Request) -> web.Response:
    """POST /api/v3/tradingAccount/connect: docs/api-dialect.md §8's body with keys, or a verified credentialId."""
    f = await http.body(request)
    credential_id = f.identifier("credentialId", required=False)
    account_type, name = f.text("accountType"), f.text("name", "nickname")
    venue, api_key, api_secret, api_passphrase = (f.text(name) for name in _KEY_FIELDS)
    if credential_id is not None and any(f.present(name) for name in _KEY_FIELDS):
        raise errors.InvalidRequest("credentialId", "give credentialId or venue/apiKey/apiSecret, not both")
    if credential_id is None:  # connect with keys stores a credential too
        scopes.require(request, scopes.CREDENTIALS_WRITE)
    account = await engine_of(request).connect_trading_account(
        http.owner_of(request),
        credential_id=credential_id,
        account_type=account_type,
        name=name,
        venue=venue,
        api_key=api_key,
        api_secret=api_secret,
        api_passphrase=api_passphrase,
        wait_timeout=request.app[CONNECT_WAIT],
    )
    return http.ok(account.public_dict())


async def disconnect_trading_account(request: web.Request) -> web.Response:
    """POST /api/v3/tradingAccount/disconnect (idempotent: a DISABLED account answers as it is)."""
    f = await http.body(request)
    account = await engine_of(request).disconnect_trading_account(
        http.owner_of(request), required(f, "tradingAccountId")
    )
    return http.ok(account.public_dict())


async def get_trading_account(request: web.Request) -> web.Response:
    """GET /api/v3/tradingAccount/get?tradingAccountId=..."""
    f = http.query(request)
    account = await engine_of(request).get_trading_account(
        http.owner_of(request), required(f, "tradingAccountId")
    )
    return http.ok(account.public_dict())


async def list_trading_accounts(request: web.Request) -> web.Response:
    """GET /api/v3/tradingAccount/list (credentialId, status, venue, offset, limit)."""
    f = http.query(request)
    page = await engine_of(request).list_trading_accounts(
        http.owner_of(request),
        credential_id=f.identifier("credentialId", required=False),
        status=f.text("status", "tradingAccountStatus"),
        venue=f.text("venue"),
        offset=f.integer("offset", 0),
        limit=f.integer("limit", DEFAULT_LIMIT),
    )
    return http.ok([a.public_dict() for a in page.items], page=page)


def required(f: http.Fields, name: str) -> str:
    """An id field that must be there: a UUID (:meth:`http.Fields.identifier`)."""
    value = f.identifier(name)
    assert value is not None
    return value


ROUTES: tuple[tuple[str, str, http.Handler], ...] = (
    ("POST", "/api/v3/credential/create", create_credential),
    ("POST", "/api/v3/credential/verify", verify_credential),
    ("GET", "/api/v3/credential/get", get_credential),
    ("GET", "/api/v3/credential/list", list_credentials),
    ("POST", "/api/v3/credential/rotate", rotate_credential),
    ("POST", "/api/v3/credential/revoke", revoke_credential),
    ("POST", "/api/v3/credential/mint", mint_credential),
    ("POST", "/api/v3/tradingAccount/connect", connect_trading_account),
    ("POST", "/api/v3/tradingAccount/disconnect", disconnect_trading_account),
    ("GET", "/api/v3/tradingAccount/get", get_trading_account),
    ("GET", "/api/v3/tradingAccount/list", list_trading_accounts),
)
