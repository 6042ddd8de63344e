"""Hypothesis drives the public API at random and checks the invariants of docs/design.md §4 after every step."""

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
from engine.testing import INVARIANT_SQL, FakeVenue, settle
from venues.base import Outcome

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
