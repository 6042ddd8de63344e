"""Hypothesis drives the public API at random and checks DESIGN.md's invariants after every step."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from engine import CredentialEngine, EngineConfig, Venue, errors
from engine.crypto import MasterKeyring
from engine.testing import FakeVenue, settle
from venues.base import Outcome

INVARIANT_SQL = {
    "revoked credentials hold no key material": """
        SELECT c.id FROM credentials c JOIN credential_secrets s ON s.credential_id = c.id
        WHERE c.status = 'REVOKED'""",
    "revoked credentials have secret version 0, others a positive one": """
        SELECT id FROM credentials WHERE (status = 'REVOKED') <> (secret_version = 0)""",
    "a live credential has exactly one CURRENT secret, at its secret version": """
        SELECT c.id FROM credentials c
        WHERE c.status <> 'REVOKED' AND 1 <> (
            SELECT count(*) FROM credential_secrets s
            WHERE s.credential_id = c.id AND s.state = 'CURRENT' AND s.version = c.secret_version)""",
    "at most one staged rotation, newer than the current version": """
        SELECT s.credential_id FROM credential_secrets s JOIN credentials c ON c.id = s.credential_id
        WHERE s.state = 'PENDING' GROUP BY s.credential_id, c.secret_version
        HAVING count(*) > 1 OR min(s.version) <= c.secret_version""",
    "an ACTIVE trading account points at a non-revoked credential": """
        SELECT a.id FROM trading_accounts a JOIN credentials c ON c.id = a.credential_id
        WHERE a.status = 'ACTIVE' AND c.status = 'REVOKED'""",
    "event sequences are gapless and match the credential's counter": """
        SELECT c.id FROM credentials c LEFT JOIN events e ON e.credential_id = c.id
        GROUP BY c.id, c.event_seq
        HAVING count(e.id) <> c.event_seq OR coalesce(max(e.sequence), 0) <> c.event_seq
            OR count(DISTINCT e.sequence) <> count(e.id)""",
    "VERIFIED means verified with permissions; FAILED names a reason": """
        SELECT id FROM credentials
        WHERE (status = 'VERIFIED' AND (verified_at IS NULL OR permissions IS NULL))
           OR (status = 'FAILED' AND failure_reason IS NULL)""",
}

KEYS = ["good-1", "good-2", "same-acct", "other-acct", "bad", "flaky", "withdraw"]


def program(fake: FakeVenue) -> None:
    fake.add_key("good-1", "s", account_id="uid-1", identities=("spot", "margin"))
    fake.add_key("good-2", "s", account_id="uid-2", identities=("spot",))
    fake.add_key("same-acct", "s", account_id="uid-1", identities=("spot",))
    fake.add_key("other-acct", "s", account_id="uid-3")
    fake.fail_key("bad", Outcome.INVALID_SECRET, api_secret="s")
    fake.flaky_key("flaky", "s", transient=1, account_id="uid-2")
    fake.add_key("withdraw", "s", withdraw=True)


@pytest.mark.slow
def test_lifecycle_state_machine(database_url: str, tmp_path: Path) -> None:
    """Random sequences of create/verify/rotate/revoke/connect/disconnect keep every invariant."""
    loop = asyncio.new_event_loop()
    fake = FakeVenue()
    program(fake)
    config = EngineConfig(
        database_url=database_url,
        master_keys=MasterKeyring.generate_spec(1),
        data_dir=tmp_path,
        workers=0,
        backoff_base=0.005,
        backoff_max=0.01,
    )
    engine = CredentialEngine(config, probes=fake.probes())
    loop.run_until_complete(engine.open())

    class Lifecycle(RuleBasedStateMachine):
        credentials = Bundle("credentials")
        accounts = Bundle("accounts")

        def __init__(self) -> None:
            super().__init__()
            self.owner = "o-" + uuid.uuid4().hex[:10]
            for key in fake.keys.values():  # the flaky key flakes once per example
                if key.transient_outcome and key is fake.keys["flaky"]:
                    key.transient_left = 1

        def run(self, coro: Any) -> Any:
            return loop.run_until_complete(coro)

        @rule(
            target=credentials, key=st.sampled_from(KEYS), venue=st.sampled_from([Venue.BINANCE, Venue.BYBIT])
        )
        def create(self, key: str, venue: Venue) -> uuid.UUID | None:
            try:
                cred = self.run(
                    engine.create_credential(self.owner, venue=venue, api_key=key, api_secret="s")
                )
            except errors.DuplicateCredential:
                return None
            return cred.credential_id

        @rule(cid=credentials)
        def verify(self, cid: uuid.UUID | None) -> None:
            if cid is None:
                return
            try:
                self.run(engine.verify_credential(self.owner, cid))
            except errors.InvalidTransition:
                assert self.run(engine.get_credential(self.owner, cid)).status.value == "REVOKED"

        @rule(cid=credentials, key=st.sampled_from(KEYS), immediate=st.booleans())
        def rotate(self, cid: uuid.UUID | None, key: str, immediate: bool) -> None:
            if cid is None:
                return
            with contextlib.suppress(
                errors.InvalidTransition, errors.RotationPending, errors.DuplicateCredential
            ):
                self.run(
                    engine.rotate_credential(
                        self.owner, cid, api_key=key, api_secret="s", immediate=immediate
                    )
                )

        @rule(cid=credentials, cascade=st.booleans())
        def revoke(self, cid: uuid.UUID | None, cascade: bool) -> None:
            if cid is None:
                return
            try:
                cred = self.run(engine.revoke_credential(self.owner, cid, cascade=cascade))
            except (errors.InvalidTransition, errors.ActiveAccountsExist):
                return
            assert cred.status.value == "REVOKED"

        @rule(target=accounts, cid=credentials, account_type=st.sampled_from([None, "spot", "margin"]))
        def connect(self, cid: uuid.UUID | None, account_type: str | None) -> uuid.UUID | None:
            if cid is None:
                return None
            try:
                acct = self.run(
                    engine.connect_trading_account(self.owner, credential_id=cid, account_type=account_type)
                )
            except (errors.Conflict, errors.InvalidRequest):
                return None
            return acct.trading_account_id

        @rule(aid=accounts)
        def disconnect(self, aid: uuid.UUID | None) -> None:
            if aid is not None:
                self.run(engine.disconnect_trading_account(self.owner, aid))

        @rule()
        def work(self) -> None:
            self.run(settle(engine))

        @invariant()
        def database_invariants(self) -> None:
            async def check() -> dict[str, list[Any]]:
                broken: dict[str, list[Any]] = {}
                async with engine.db.connection() as conn:
                    for name, sql in INVARIANT_SQL.items():
                        rows = await conn._conn.fetch(sql)
                        if rows:
                            broken[name] = [dict(r) for r in rows]
                return broken

            assert self.run(check()) == {}

    try:
        run_state_machine_as_test(
            Lifecycle,
            settings=settings(
                max_examples=25,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        loop.run_until_complete(engine.close())
        loop.close()
