"""Concurrency: Hypothesis drives conflicting operations on the same credentials from TWO engine processes.

The test process holds one engine; a second OS process (tests/reliability/peer_process.py) holds another on the
same database, with its own pool, driven over a pipe. Each step starts one operation in each process at the same
instant (revoke against rotate, two rotations, connect against revoke, both running the job queue, ...). After
every step the invariants of docs/design.md §4 hold; each operation either succeeds or fails with the error its contract
names (nothing else escapes); after the queue has run in both processes nothing is left half-done (no PENDING
credential, no staged rotation, no unfinished job), and outcomes agree with the row lock (two revokes: one wins).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from reliability_support import FAKE_KEYS, HERE, PROJECT_ROOT, fetch, program_fake

from engine import CredentialEngine, EngineConfig, Venue, errors
from engine.testing import FakeVenue, broken_invariants, settle, unfinished_jobs

PEER_SCRIPT = HERE / "peer_process.py"

# what each operation may fail with: its contract's errors, matched by exact class name
ALLOWED: dict[str, set[str]] = {
    "verify": {"InvalidTransition"},
    "rotate": {"InvalidTransition", "RotationPending", "DuplicateCredential"},
    "revoke": {"InvalidTransition", "ActiveAccountsExist"},
    "connect": {"Conflict", "InvalidRequest"},
    "disconnect": set(),
    "work": set(),
}
OPS = st.sampled_from(["verify", "rotate", "rotate!", "revoke", "revoke!", "connect", "work"])


class Peer:
    """The second engine process and its pipe."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER_SCRIPT),
            env={**os.environ, "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{HERE}", **self.env},
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 60))
        assert "ready" in ready, ready
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            answer = json.loads(line)
            self._answers.pop(answer["id"]).set_result(answer)
        for future in self._answers.values():
            future.set_exception(AssertionError("the peer process died"))

    async def call(self, **request: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._answers[self._ids] = future
        self.proc.stdin.write((json.dumps({"id": self._ids, **request}) + "\n").encode())
        await self.proc.stdin.drain()
        return await asyncio.wait_for(future, 60)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


async def local(engine: CredentialEngine, request: dict[str, Any]) -> dict[str, Any]:
    """The same operations as the peer's, in this process; same answer shape."""
    owner = request["owner"]
    delay = request["at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    try:
        op = request["op"]
        result: Any = None
        if op == "verify":
            await engine.verify_credential(owner, request["cid"])
        elif op == "rotate":
            await engine.rotate_credential(
                owner, request["cid"], api_key=request["key"], api_secret="s", immediate=request["immediate"]
            )
        elif op == "revoke":
            await engine.revoke_credential(owner, request["cid"], cascade=request["cascade"])
        elif op == "connect":
            account = await engine.connect_trading_account(
                owner, credential_id=request["cid"], account_type=request["account_type"]
            )
            result = str(account.trading_account_id)
        elif op == "disconnect":
            await engine.disconnect_trading_account(owner, request["aid"])
        elif op == "work":
            await settle(engine)
        return {"result": result}
    except Exception as exc:  # judged by the caller, exactly like the peer's answers
        return {"error": type(exc).__name__, "module": type(exc).__module__}


def _without_id(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "id"}


def _brief(request: dict[str, Any]) -> str:
    shown = [request["op"]]
    for name in ("cid", "key", "immediate", "cascade", "account_type"):
        if request.get(name) is not None:
            value = request[name]
            shown.append(f"{name}={value[:8] if name == 'cid' else value}")
    return " ".join(shown)


async def _both(first: Any, second: Any) -> list[Any]:
    return list(await asyncio.gather(first, second))


def request_for(op: str, owner: str, cid: str, key: str, account_type: str | None) -> dict[str, Any]:
    name = op.rstrip("!")
    request: dict[str, Any] = {"op": name, "owner": owner, "cid": cid}
    if name == "rotate":
        request |= {"key": key, "immediate": op.endswith("!")}
    elif name == "revoke":
        request["cascade"] = not op.endswith("!")
    elif name == "connect":
        request["account_type"] = account_type
    return request


@pytest.mark.slow
def test_two_processes_racing_keep_every_invariant(
    database_url: str, master_keys: str, tmp_path: Path, size: Any, report: Any
) -> None:
    """Conflicting operations started at once in two engine processes keep every invariant after every step."""
    examples, steps = size((8, 12), (60, 30))
    loop = asyncio.new_event_loop()
    fake = FakeVenue()
    program_fake(fake)
    config = EngineConfig(
        database_url=database_url,
        master_keys=master_keys,
        data_dir=tmp_path,
        workers=0,
        backoff_base=0.005,
        backoff_max=0.01,
        poll_interval=0.2,
    )
    engine = CredentialEngine(config, probes=fake.probes())
    peer = Peer(
        {"DATABASE_URL": database_url, "ENGINE_MASTER_KEYS": master_keys, "ENGINE_DATA_DIR": str(tmp_path)}
    )
    loop.run_until_complete(engine.open())
    tally = {"steps": 0, "races": 0, "both_succeeded": 0, "one_refused": 0}

    class Race(RuleBasedStateMachine):
        credentials = Bundle("credentials")
        accounts = Bundle("accounts")

        def __init__(self) -> None:
            super().__init__()
            self.owner = "o-" + uuid.uuid4().hex[:10]
            self.trace: list[str] = []  # what happened, for failure messages (races do not replay exactly)

        def note(self, what: str, **answer: Any) -> None:
            shown = {k: (v[:8] if isinstance(v, str) and len(v) == 36 else v) for k, v in answer.items()}
            self.trace.append(f"{what} -> {shown}")

        def story(self) -> str:
            return "\n  ".join(["steps of this example:", *self.trace])

        def run(self, coro: Any) -> Any:
            return loop.run_until_complete(coro)

        def race(self, mine: dict[str, Any], theirs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
            """Start ``mine`` here and ``theirs`` in the peer at the same instant; both answers, judged."""
            at = time.time() + 0.03
            mine, theirs = {**mine, "owner": self.owner, "at": at}, {**theirs, "owner": self.owner, "at": at}
            a, b = self.run(_both(local(engine, mine), peer.call(**theirs)))
            self.note(f"race {_brief(mine)} | peer {_brief(theirs)}", here=a, peer=_without_id(b))
            for request, answer in ((mine, a), (theirs, b)):
                error = answer.get("error")
                assert error is None or error in ALLOWED[request["op"]], (request, answer, self.story())
            tally["races"] += 1
            tally["both_succeeded" if "error" not in a and "error" not in b else "one_refused"] += 1
            return a, b

        @rule(
            target=credentials,
            key=st.sampled_from(FAKE_KEYS),
            venue=st.sampled_from([Venue.BINANCE, Venue.BYBIT]),
        )
        def create(self, key: str, venue: Venue) -> str | None:
            try:
                cred = self.run(
                    engine.create_credential(self.owner, venue=venue, api_key=key, api_secret="s")
                )
            except errors.DuplicateCredential:
                self.note(f"create {key}", error="DuplicateCredential")
                return None
            self.note(f"create {key}", result=str(cred.credential_id))
            return str(cred.credential_id)

        @rule(
            cid=credentials,
            ops=st.tuples(OPS, OPS),
            keys=st.tuples(st.sampled_from(FAKE_KEYS), st.sampled_from(FAKE_KEYS)),
            account_type=st.sampled_from([None, "spot", "margin"]),
        )
        def conflict(
            self, cid: str | None, ops: tuple[str, str], keys: tuple[str, str], account_type: str | None
        ) -> None:
            if cid is None:
                return
            a, b = self.race(
                request_for(ops[0], self.owner, cid, keys[0], account_type),
                request_for(ops[1], self.owner, cid, keys[1], account_type),
            )
            if ops[0].startswith("revoke") and ops[1].startswith("revoke"):
                winners = [x for x in (a, b) if "error" not in x]
                assert len(winners) <= 1, "two revokes of one credential both succeeded\n" + self.story()
                if winners:
                    assert self.run(engine.get_credential(self.owner, cid)).status.value == "REVOKED"
            if ops[0] == ops[1] == "rotate":
                assert "error" in a or "error" in b, "two staged rotations both succeeded\n" + self.story()

        @rule(aid=accounts)
        def disconnect(self, aid: str | None) -> None:
            if aid is not None:
                self.run(engine.disconnect_trading_account(self.owner, aid))
                self.note(f"disconnect {aid[:8]}")

        @rule(target=accounts, cid=credentials, account_type=st.sampled_from([None, "spot"]))
        def connect_against_revoke(self, cid: str | None, account_type: str | None) -> str | None:
            if cid is None:
                return None
            a, _ = self.race(
                {"op": "connect", "cid": cid, "account_type": account_type},
                {"op": "revoke", "cid": cid, "cascade": True},
            )
            return a.get("result")

        @rule()
        def work(self) -> None:
            """Both processes run the queue at once, then this one once more: nothing may be left half-done."""
            self.race({"op": "work", "cid": None}, {"op": "work", "cid": None})
            self.run(settle(engine))
            self.quiescent()

        @invariant()
        def database_invariants(self) -> None:
            tally["steps"] += 1
            broken = self.run(broken_invariants(engine))
            assert broken == {}, f"{broken}\n{self.story()}"

        def quiescent(self) -> None:
            unfinished = self.run(unfinished_jobs(engine))
            assert unfinished == [], f"{unfinished}\n{self.story()}"
            stuck = self.run(
                fetch(
                    database_url,
                    """SELECT c.id, c.status, c.secret_version, s.version AS staged FROM credentials c
                       LEFT JOIN credential_secrets s ON s.credential_id = c.id AND s.state = 'PENDING'
                       WHERE c.owner_id = $1 AND (c.status = 'PENDING' OR s.version IS NOT NULL)""",
                    self.owner,
                )
            )
            assert stuck == [], (
                f"work finished but credentials are left PENDING or with a staged rotation: {stuck}\n{self.story()}"
            )

        def teardown(self) -> None:
            self.run(settle(engine))
            self.quiescent()

    try:
        loop.run_until_complete(peer.start())
        run_state_machine_as_test(
            Race,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                derandomize=not size.full,
            ),
        )
    finally:
        loop.run_until_complete(peer.close())
        loop.run_until_complete(engine.close())
        loop.close()
    report(
        "concurrency",
        examples=examples,
        steps=tally["steps"],
        races=tally["races"],
        **{k: v for k, v in tally.items() if k in ("both_succeeded", "one_refused")},
    )


async def test_immediate_rotation_while_a_verification_is_queued(make_engine: Any, fake: FakeVenue) -> None:
    """Rotating immediately before the first verification ran still ends with the new keys verified."""
    eng: CredentialEngine = await make_engine()
    fake.add_key("first", "s", account_id="uid-1")
    fake.add_key("second", "s", account_id="uid-1")
    cred = await eng.create_credential("owner", venue=Venue.BINANCE, api_key="first", api_secret="s")
    await eng.rotate_credential("owner", cred.credential_id, api_key="second", api_secret="s", immediate=True)
    await settle(eng)
    done = await eng.get_credential("owner", cred.credential_id)
    assert (done.status.value, done.secret_version) == ("VERIFIED", 2)
