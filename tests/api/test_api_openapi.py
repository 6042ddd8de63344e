"""The OpenAPI document: valid OpenAPI 3.1, and exactly the server's routes (every response the other tests
receive is also validated against it, in conftest's client)."""

from __future__ import annotations

from typing import Any

from openapi_spec_validator import validate

from engine import CredentialEngine, EngineConfig
from engine.api import ApiConfig, make_app, openapi, scopes


def served_routes() -> set[tuple[str, str]]:
    app = make_app(CredentialEngine(EngineConfig()), ApiConfig(jwt_secret="x" * 32))
    return {
        (route.method.lower(), route.resource.canonical) for route in app.router.routes() if route.resource
    }


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in item}


def test_document_is_valid_openapi_3_1() -> None:
    """openapi-spec-validator accepts the document as OpenAPI 3.1."""
    document = openapi.document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_matches_the_routes() -> None:
    """Every route the server has is documented, and nothing else is (no HEAD twins either)."""
    assert documented_routes(openapi.document()) == served_routes()


def test_every_api_operation_needs_a_token_and_documents_errors() -> None:
    """/api operations require the bearer token with their one scope (the server's, engine/api/scopes.py) and
    list 400, 401, 403 and the error default; operator routes are open."""
    document = openapi.document()
    assert document["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"]["bearerFormat"] == "JWT"
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path.startswith("/api/"):
                scope = scopes.ROUTE_SCOPES[(method.upper(), path)]
                assert operation["security"] == [{"bearerAuth": [scope]}], (method, path)
                assert {"200", "400", "401", "403", "default"} <= set(operation["responses"]), (method, path)
            else:
                assert operation["security"] == [], (method, path)
                assert (method.upper(), path) in scopes.PUBLIC_ROUTES


def test_every_scope_is_documented_in_the_scheme() -> None:
    """The security scheme's description explains each scope the operations name."""
    text = openapi.document()["components"]["securitySchemes"]["bearerAuth"]["description"]
    assert all(f"{name}:" in text for name in scopes.ALL_SCOPES)


def test_operation_ids_are_unique() -> None:
    """Client generators need one operationId per operation."""
    ids = [op["operationId"] for item in openapi.document()["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_served_document_is_the_document(api: Any) -> None:
    """GET /openapi.json answers the document itself, without a token."""
    reply = await api.get("/openapi.json", token=None)
    assert reply.status == 200
    assert reply.body == openapi.document()


def test_documented_enums_are_the_models() -> None:
    """Venue and status enums in the document are the engine's own."""
    schemas = openapi.document()["components"]["schemas"]
    assert schemas["Venue"]["enum"] == ["BINANCE", "OKX", "BYBIT", "COINBASE", "KRAKEN"]
    assert schemas["CredentialStatus"]["enum"] == ["PENDING", "VERIFIED", "FAILED", "REVOKED"]
