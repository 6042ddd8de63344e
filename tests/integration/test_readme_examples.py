"""Every example block of README.md, run or checked as a reader would use it ("every example in the
README is run by a test").

The blocks are read from README.md by heading, language and position, so an example edited without its test
fails here, and so does a new block nobody covers (``test_every_block_is_covered``). What runs is the block's
own text: Python examples as subprocesses or executed as written, shell lines through ``bash`` with the
placeholders the README uses (``KEY``, ``CREDENTIAL_ID``, ...) replaced by real values, against real parts: the
per-test PostgreSQL database, the exchange simulator as its own process on loopback (``python -m venues.simulator
--seed-demo``, as the README tells readers), the ``credential-engine`` console script, a real ``ApiServer``.
Webhook signatures are made by the PyPI ``standardwebhooks`` package, an implementation independent of ours.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import standardwebhooks
from openapi_schema_validator import OAS31Validator
from test_webhooks_support import FakeResolver

from engine import CredentialEngine, CredentialStatus, EngineConfig, lifecycle, webhooks
from engine.api import ApiConfig, ApiServer, auth, openapi
from engine.testing import FakeVenue
from engine.webhooks import schemas
from venues.base import ApiKeys, mask_api_key

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # the environment running the tests: its python and credential-engine
PUBLIC = "93.184.215.14"  # what the faked DNS answers for the README's endpoint host (never contacted)
PROCESS_TIMEOUT = 120.0  # seconds any one subprocess may take


# ---- the README's blocks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    heading: str  # the nearest heading above the block, without its #s
    lang: str  # the fence's info string ("" for none)
    index: int  # 0, 1, ...: its position among the blocks with the same heading and language
    line: int  # where its text starts in README.md (1-based)
    text: str


def readme_blocks() -> list[Block]:
    """Every fenced block of README.md, in order."""
    found: list[Block] = []
    heading = ""
    fence: tuple[str, int, list[str]] | None = None
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                lang, start, body = fence
                index = sum(1 for b in found if (b.heading, b.lang) == (heading, lang))
                found.append(Block(heading, lang, index, start, "\n".join(body) + "\n"))
                fence = None
            else:
                fence[2].append(line)
        elif line.startswith("```"):
            fence = (line[3:].strip(), number + 1, [])
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    assert fence is None, "README.md has an unclosed code fence"
    return found


def block(heading: str, lang: str, index: int = 0) -> Block:
    for candidate in readme_blocks():
        if (candidate.heading, candidate.lang, candidate.index) == (heading, lang, index):
            return candidate
    raise AssertionError(f"README.md has no {lang or 'plain'} block #{index} under the heading {heading!r}")


# (heading, language, index) -> the test that runs or checks the block
COVERED: dict[tuple[str, str, int], str] = {
    ("credential-engine", "", 0): "test_state_sketch_names_the_lifecycle_states",
    ("Two commands", "sh", 0): "test_two_commands_are_make_targets, test_make_run_prints_*",
    ("Library quick start", "python", 0): "test_library_quick_start_runs_as_written",
    ("Using keys in your trading backend", "python", 0): "test_trading_backend_example_runs_as_written",
    ("Lifecycle", "mermaid", 0): "tests/unit/test_lifecycle_diagram.py",
    ("REST API and command line", "sh", 0): "test_rest_api_block_make_targets, test_make_run_prints_*, "
    "test_serve_in_production_needs_the_three_variables_named",
    ("Envelope", "json", 0): "test_envelope_examples_are_what_the_server_answers",
    ("Command line", "sh", 0): "test_command_line_block_runs_line_by_line",
    ("Receiving webhooks", "python", 0): "test_webhook_receiver_runs_as_written",
    ("Receiving webhooks", "python", 1): "test_verifier_snippet_runs_as_written",
    ("Sending: endpoints", "python", 0): "test_endpoint_calls_run_as_written",
    ("Event types", "json", 0): "test_event_example_is_a_real_event_shape",
    ("Layout", "", 0): "test_layout_names_files_that_exist",
}


def test_every_block_is_covered() -> None:
    """Each block of README.md is one this file (or the named test) runs or checks: a new block needs a test."""
    found = {(b.heading, b.lang, b.index): b.line for b in readme_blocks()}
    uncovered = {key: f"README.md line {line}" for key, line in found.items() if key not in COVERED}
    assert not uncovered, uncovered
    assert set(found) == set(COVERED), {"gone from README.md": set(COVERED) - set(found)}
    diagram = (ROOT / "tests/unit/test_lifecycle_diagram.py").read_text(encoding="utf-8")
    assert "```mermaid" in diagram


# ---- subprocesses ------------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the engine's own settings (a test's database or keys must not leak
    into an example, nor the machine's engine state), with this environment's scripts first on PATH, this tree
    importable, unbuffered Python output, and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("ENGINE_", "PG")) or k in {"DATABASE_URL", "XDG_DATA_HOME"})
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)  # this tree's engine, installed (make setup) or not
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Running:
    """A subprocess started in its own session (so a shell and what it runs stop together), its stdout read
    line by line as it comes and its stderr collected."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    _new_line: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._tasks = [
            asyncio.create_task(self._read(self.proc.stdout, self.lines, wake=True)),
            asyncio.create_task(self._read(self.proc.stderr, self.err, wake=False)),
        ]

    async def _read(self, stream: asyncio.StreamReader, into: list[str], *, wake: bool) -> None:
        while line := await stream.readline():
            into.append(line.decode("utf-8", "replace").rstrip("\n"))
            if wake:
                self._new_line.set()
        self._new_line.set()

    async def wait_for_line(self, wanted: Callable[[str], bool], timeout: float = 60.0) -> str:  # noqa: ASYNC109
        """The first stdout line ``wanted`` accepts, waiting up to ``timeout`` seconds for it."""
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if wanted(line):
                        return line
                if self.proc.returncode is not None and self._tasks[0].done():
                    raise AssertionError(f"exited {self.proc.returncode}: {self.stderr_text()[-3000:]}")
                self._new_line.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._new_line.wait(), 0.5)

    async def stop(self) -> int:
        """SIGTERM to its session (the shell and its command), then its exit status (SIGKILL after 30 s)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            raise AssertionError("did not stop within 30 s of SIGTERM") from None
        await asyncio.gather(*self._tasks)
        assert self.proc.returncode is not None
        return self.proc.returncode

    def stdout_text(self) -> str:
        return "\n".join(self.lines)

    def stderr_text(self) -> str:
        return "\n".join(self.err)


@contextlib.asynccontextmanager
async def started(argv: list[str], env: dict[str, str], cwd: Path) -> AsyncIterator[Running]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    running = Running(proc)
    running.start_reading()
    try:
        yield running
    finally:
        await running.stop()


async def run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run to the end (at most PROCESS_TIMEOUT seconds): exit status, stdout, stderr."""
    async with started(argv, env, cwd) as running:
        try:
            await asyncio.wait_for(running.proc.wait(), timeout=PROCESS_TIMEOUT)
        except TimeoutError:
            raise AssertionError(
                f"{argv} ran over {PROCESS_TIMEOUT:g} s: {running.stderr_text()[-3000:]}"
            ) from None
    assert running.proc.returncode is not None
    return running.proc.returncode, running.stdout_text(), running.stderr_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def simulator(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """``python -m venues.simulator --seed-demo`` as its own process: the document it prints (venue URLs, keys)."""
    async with started(
        [sys.executable, "-m", "venues.simulator", "--seed-demo"], clean_env(), tmp_path
    ) as sim:
        await sim.wait_for_line(lambda line: line == "}")  # the end of its indented JSON document
        yield json.loads(sim.stdout_text())


def demo_key(document: dict[str, Any], venue: str, label: str) -> dict[str, Any]:
    return next(k for k in document["keys"] if k["venue"] == venue and k["label"] == label)


def secrets_of(*keys: dict[str, Any]) -> list[str]:
    """What must never be printed: secrets, passphrases and whole API keys (only masked forms may appear)."""
    return [k[name] for k in keys for name in ("api_key", "api_secret", "api_passphrase") if k.get(name)]


# ---- "credential-engine" (the state sketch) and "Layout" ---------------------------------------------------


def test_state_sketch_names_the_lifecycle_states() -> None:
    """The sketch under the title shows exactly the lifecycle's states, and REVOKED as the terminal one."""
    sketch = block("credential-engine", "").text
    assert set(re.findall(r"\b[A-Z]{5,}\b", sketch)) == {s.value for s in CredentialStatus}
    assert "REVOKED (terminal" in sketch and lifecycle.triggers_from("REVOKED") == []
    assert lifecycle.target("verify_succeeded", "PENDING") is CredentialStatus.VERIFIED  # "verify ok"
    assert lifecycle.target("verify_rejected", "PENDING") is CredentialStatus.FAILED  # "verify failed"


_PATHLIKE = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]+)*/?)")


def _names_a_path(token: str) -> bool:
    """A folder (``docs/``), a file with a source or document suffix, ``Makefile``, or a dot-folder's file
    (``.ci/run``); not words of the descriptions such as ``probe/simulator`` or ``engine.__all__``."""
    return (
        token.endswith("/")
        or token == "Makefile"
        or (token.startswith(".") and "/" in token)
        or token.rsplit(".", 1)[-1] in {"py", "sql", "md", "toml"}
    )


def layout_paths(text: str) -> list[Path]:
    """The files and folders the layout block names, resolved from its indentation (folders end with /)."""
    named: list[Path] = []
    parents: list[tuple[int, Path]] = []  # (indent, folder) of the enclosing folder lines
    for line in text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while parents and parents[-1][0] >= indent:
            parents.pop()
        base = parents[-1][1] if parents else ROOT
        tokens = [t for t in _PATHLIKE.findall(line) if _names_a_path(t)]
        if tokens and tokens[0].endswith("/") and line.lstrip().startswith(tokens[0]):
            folder = base / tokens[0]
            named.append(folder)
            named += [folder / t for t in tokens[1:]]
            parents.append((indent, folder))
        else:
            named += [base / t for t in tokens]
    return named


def test_layout_names_files_that_exist() -> None:
    """Every file and folder the Layout block names exists where the block puts it."""
    named = layout_paths(block("Layout", "").text)
    assert len(named) > 60, named  # the parser found the tree
    assert ROOT / "engine" / "webhooks" / "signing.py" in named and ROOT / "venues" / "okx.py" in named
    missing = [str(p.relative_to(ROOT)) for p in named if not p.exists()]
    assert not missing, missing


# ---- "Two commands", "REST API and command line": make targets, serve, the sandbox ---------------------------

MAKE_RECIPES = {  # what each make target the README names must run
    "run": "credential-engine serve --sandbox",
    "demo": "python -m engine.cli.demo",  # run end to end by tests/api/test_api_sandbox.py
    "test": "python -m pytest",
}


def make_lines(text: str) -> list[str]:
    return [line.split("#")[0].split()[1] for line in text.splitlines() if line.startswith("make ")]


def check_make_target(target: str) -> None:
    """The Makefile has the target and its recipe runs what the README says (``make -n``: nothing is run)."""
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert MAKE_RECIPES[target] in done.stdout.splitlines()[-1], done.stdout


def test_two_commands_are_make_targets() -> None:
    text = block("Two commands", "sh").text
    assert make_lines(text) == ["run", "test"]
    for target in make_lines(text):
        check_make_target(target)


def test_rest_api_block_make_targets() -> None:
    text = block("REST API and command line", "sh").text
    assert make_lines(text) == ["run", "demo"]
    for target in make_lines(text):
        check_make_target(target)


async def serve_until_healthy(script: str, env: dict[str, str], cwd: Path) -> None:
    """Run a shell script whose last command is ``credential-engine serve``: /healthz answers, SIGTERM stops it
    with exit status 0."""
    async with started(["bash", "-c", script], env, cwd) as serving:
        line = await serving.wait_for_line(lambda line: "listening on http://" in line)
        url = line.split("listening on ", 1)[1].split()[0]
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"] == {"status": "ok"}
        status = await serving.stop()
    assert status == 0, serving.stderr_text()[-3000:]
    assert "Traceback" not in serving.stderr_text()


async def test_serve_in_production_needs_the_three_variables_named(
    database_url: str, master_keys: str, tmp_path: Path
) -> None:
    """The block's ``credential-engine serve`` line runs with just the variables its comment names."""
    line = next(
        ln
        for ln in block("REST API and command line", "sh").text.splitlines()
        if ln.startswith("credential-engine")
    )
    command, _, comment = line.partition("#")
    assert command.split() == ["credential-engine", "serve"]
    named = re.findall(r"\b[A-Z][A-Z_]+\b", comment)
    assert sorted(named) == ["DATABASE_URL", "ENGINE_API_JWT_SECRET", "ENGINE_MASTER_KEYS"]
    values = {
        "DATABASE_URL": database_url,
        "ENGINE_MASTER_KEYS": master_keys,
        "ENGINE_API_JWT_SECRET": auth.generate_secret(),
    }
    env = clean_env(HOME=str(tmp_path), ENGINE_API_PORT="0", **{name: values[name] for name in named})
    await serve_until_healthy(command, env, tmp_path)


def banner_curls(banner: str) -> list[str]:
    """The banner's curl commands, continued lines joined as the shell joins them."""
    commands: list[str] = []
    current: list[str] = []
    for line in banner.splitlines():
        if line.startswith("curl ") or current:
            current.append(line.rstrip("\\").rstrip())
            if not line.endswith("\\"):
                commands.append(" ".join(current))
                current = []
    return commands


async def test_make_run_prints_url_token_keys_and_working_curl_examples(
    database_url: str, master_keys: str, tmp_path: Path
) -> None:
    """What ``make run`` runs (``credential-engine serve --sandbox``) prints the URL, a token, test keys and curl
    examples; the curl examples, pasted into a shell with the token, work."""
    env = clean_env(
        DATABASE_URL=database_url,
        ENGINE_MASTER_KEYS=master_keys,
        ENGINE_DATA_DIR=str(tmp_path),
        ENGINE_API_PORT="0",
    )
    async with started(MAKE_RECIPES["run"].split(), env, tmp_path) as sandbox:
        await sandbox.wait_for_line(lambda line: line.endswith("make demo"))  # the banner's last line
        banner = sandbox.stdout_text()
        url = re.search(r"^  API\s+(http://\S+)", banner, re.MULTILINE)
        token = re.search(r"^  export TOKEN=(\S+)$", banner, re.MULTILINE)
        assert url is not None and token is not None, banner
        assert "Test keys" in banner and re.search(r"^  OKX\s+demo-good\s+apiKey=", banner, re.MULTILINE)
        curls = banner_curls(banner)
        assert len(curls) >= 3
        for command in curls:
            code, out, err = await run(["bash", "-c", command], {**env, "TOKEN": token.group(1)}, tmp_path)
            assert code == 0, err
            assert json.loads(out)["success"] is True, (command, out)
        async with aiohttp.ClientSession() as http, http.get(f"{url.group(1)}/healthz") as resp:
            assert resp.status == 200
    assert "Traceback" not in sandbox.stderr_text()


# ---- "Library quick start" ---------------------------------------------------------------------------------


async def test_library_quick_start_runs_as_written(
    database_url: str, master_keys: str, tmp_path: Path, simulator: dict[str, Any], make_engine: Any
) -> None:
    """The quick start, run as a script with the environment its introduction describes (the simulator's OKX
    URL and demo keys), verifies, reveals masked keys, rotates on the same account and revokes; it prints the
    events it subscribed to, in order, and never a secret."""
    script = tmp_path / "quickstart.py"
    script.write_text(block("Library quick start", "python").text, encoding="utf-8")
    good, rotation = demo_key(simulator, "OKX", "demo-good"), demo_key(simulator, "OKX", "demo-rotation")
    assert good["uid"] == rotation["uid"]  # two keys of one account: the rotation's condition
    env = clean_env(
        DATABASE_URL=database_url,
        ENGINE_MASTER_KEYS=master_keys,
        ENGINE_DATA_DIR=str(tmp_path / "data"),
        ENGINE_VENUE_URLS=f"OKX={simulator['venues']['OKX']}",
        OKX_API_KEY=good["api_key"],
        OKX_API_SECRET=good["api_secret"],
        OKX_API_PASSPHRASE=good["api_passphrase"],
        OKX_NEW_API_KEY=rotation["api_key"],
        OKX_NEW_API_SECRET=rotation["api_secret"],
        OKX_NEW_API_PASSPHRASE=rotation["api_passphrase"],
    )
    code, out, err = await run([sys.executable, str(script)], env, tmp_path)
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    verified = (
        f"VERIFIED {tuple(sorted(good['identities']))!r} Permissions(read=True, trade=True, withdraw=False"
    )
    assert any(line.startswith(verified) for line in lines), out
    masked = repr(ApiKeys(good["api_key"], good["api_secret"], good["api_passphrase"]))
    assert masked in lines and masked.endswith("api_secret='***', api_passphrase='***')")
    heard = [line for line in lines if line.startswith("credential.")]
    assert heard == [
        "credential.verified 2 VERIFIED",
        "credential.rotated 4 VERIFIED",
        "credential.revoked 5 REVOKED",
    ]
    for secret in [*secrets_of(good, rotation), master_keys.split(":", 1)[1]]:
        assert secret not in out and secret not in err
    assert "Traceback" not in err
    # what it did, as the database holds it
    eng: CredentialEngine = await make_engine()
    (cred,) = (await eng.list_credentials("user-42")).items
    assert cred.status is CredentialStatus.REVOKED and cred.nickname == "Main"
    assert cred.venue_account_id == good["uid"] and cred.masked_api_key == mask_api_key(rotation["api_key"])
    assert [e.type for e in await eng.list_events("user-42", cred.credential_id)] == [
        "credential.created", "credential.verified", "credential.rotation_started", "credential.rotated",
        "credential.revoked",
    ]  # fmt: skip
    audit = await eng.db.fetch("list_key_access", cred.credential_id, "user-42", 10)
    assert [(r["secret_version"], r["purpose"]) for r in audit] == [(1, "order signing")]


# ---- "Using keys in your trading backend" --------------------------------------------------------------------


async def test_trading_backend_example_runs_as_written(
    database_url: str, master_keys: str, tmp_path: Path, simulator: dict[str, Any], make_engine: Any
) -> None:
    """The lease and ccxt example, run as a script against the simulator process: it trades, the rotation swaps
    the lease's keys and the exchange's on the same object, the revocation closes both, and no secret is printed.
    The simulator's signing log shows which key signed what."""
    script = tmp_path / "trading.py"
    script.write_text(block("Using keys in your trading backend", "python").text, encoding="utf-8")
    good, rotation = demo_key(simulator, "OKX", "demo-good"), demo_key(simulator, "OKX", "demo-rotation")
    env = clean_env(
        DATABASE_URL=database_url,
        ENGINE_MASTER_KEYS=master_keys,
        ENGINE_DATA_DIR=str(tmp_path / "data"),
        ENGINE_VENUE_URLS=f"OKX={simulator['venues']['OKX']}",
        OKX_API_KEY=good["api_key"],
        OKX_API_SECRET=good["api_secret"],
        OKX_API_PASSPHRASE=good["api_passphrase"],
        OKX_NEW_API_KEY=rotation["api_key"],
        OKX_NEW_API_SECRET=rotation["api_secret"],
        OKX_NEW_API_PASSPHRASE=rotation["api_passphrase"],
    )
    code, out, err = await run([sys.executable, str(script)], env, tmp_path)
    assert code == 0, err[-3000:]
    lines = out.splitlines()
    first = repr(ApiKeys(good["api_key"], good["api_secret"], good["api_passphrase"]))
    second = repr(ApiKeys(rotation["api_key"], rotation["api_secret"], rotation["api_passphrase"]))
    assert f"{first} 1" in lines, out
    assert "secret on the object: <held by credential-engine>" in lines, out
    assert any(line.startswith("lease rotated 1 -> 2") for line in lines), out
    assert f"now 2 {second}" in lines, out
    assert "exchange refused: CREDENTIAL_REVOKED" in lines, out
    assert "lease refused: -100018" in lines, out
    for secret in [*secrets_of(good, rotation), master_keys.split(":", 1)[1]]:
        assert secret not in out and secret not in err
    assert "Traceback" not in err
    # the simulator's own record: the order was signed by the first key, its cancel by the second
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{simulator['admin']}/requests", params={"venue": "OKX"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        record = await resp.json()
    signed = [(r["api_key"], r["path"]) for r in record]
    orders = [key for key, path in signed if path.startswith("/api/v5/trade/") and "order" in path]
    assert orders and orders[0] == good["api_key"] and orders[-1] == rotation["api_key"], signed
    eng: CredentialEngine = await make_engine()
    (cred,) = (await eng.list_credentials("user-42")).items
    assert cred.status is CredentialStatus.REVOKED
    audit = await eng.db.fetch("list_key_access", cred.credential_id, "user-42", 10)
    assert {(r["access"], r["purpose"]) for r in audit} >= {("lease_open", "market maker")}


# ---- "Command line" ------------------------------------------------------------------------------------------


def _placeholder(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")  # a whole word: KEY, not ENGINE_MASTER_KEYS


def _text(value: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: value  # a function, so that re.sub reads no escapes in the value


def cli_placeholders(text: str, values: dict[str, str]) -> Callable[[str], str]:
    """A function putting real values, shell-quoted, in place of the block's placeholders (each must occur in
    the block)."""
    for name in values:
        assert _placeholder(name).search(text), f"no {name} in the block"

    def fill(line: str) -> str:
        for name, value in values.items():
            line = _placeholder(name).sub(_text(shlex.quote(value)), line)
        return line

    return fill


async def test_command_line_block_runs_line_by_line(
    database_url: str, master_keys: str, tmp_path: Path, simulator: dict[str, Any], make_engine: Any
) -> None:
    """Each command line of the block, after its ``export`` line, through bash with real values for the
    placeholders: every one exits 0 and does what its line says; ``serve`` answers /healthz."""
    text = block("Command line", "sh").text
    good, rotation = (
        demo_key(simulator, "BINANCE", "demo-good"),
        demo_key(simulator, "BINANCE", "demo-rotation"),
    )
    shell = tmp_path / "shell"
    shell.mkdir()
    (shell / "key.secret").write_text(good["api_secret"] + "\n", encoding="utf-8")
    (shell / "new.secret").write_text(rotation["api_secret"] + "\n", encoding="utf-8")
    env = clean_env(  # the rest of the service's environment ("DATABASE_URL, ENGINE_MASTER_KEYS, ...")
        HOME=str(tmp_path),
        ENGINE_DATA_DIR=str(tmp_path / "data"),
        ENGINE_VENUE_URLS=",".join(f"{v}={u}" for v, u in simulator["venues"].items()),
        ENGINE_API_JWT_SECRET=auth.generate_secret(),
        ENGINE_API_PORT="0",
    )
    values = {
        "postgresql://...": database_url,
        "1:...": master_keys,
        "KEY": good["api_key"],
        "NEW": rotation["api_key"],
    }
    fill = cli_placeholders(text, values)
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    export, commands = fill(lines[0]), lines[1:]
    assert export.startswith("export ") and "..." not in export and "ENGINE_OWNER=desk-7" in export
    credential_id: str | None = None
    ran: list[str] = []
    for line in commands:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "credential-engine", line
        command = argv[1]
        if "CREDENTIAL_ID" in line:
            assert credential_id is not None, f"{line!r} comes before the line that creates the credential"
            line = line.replace("CREDENTIAL_ID", credential_id)
        script = f"{export}\n{fill(line)}"
        if command == "serve":
            await serve_until_healthy(script, env, shell)
            ran.append(command)
            continue
        code, out, err = await run(["bash", "-c", script], env, shell)
        assert code == 0, (line, out, err)
        assert "Traceback" not in err
        for secret in secrets_of(good, rotation):
            assert secret not in out and secret not in err, line
        if command == "create":
            found = re.search(r"^id\s+(\S+)$", out, re.MULTILINE)
            assert found is not None, out
            credential_id = str(uuid.UUID(found.group(1)))
            assert re.search(r"^status\s+VERIFIED$", out, re.MULTILINE) and "Desk 7" in out, out
        elif command in ("list", "verify"):
            assert credential_id is not None and credential_id in out and "VERIFIED" in out, (line, out)
        elif command == "rotate":
            assert re.search(r"^secret version\s+2$", out, re.MULTILINE) and "VERIFIED" in out, out
        elif command == "connect":
            assert re.search(rf"\bSPOT\s+Spot\s+ACTIVE\s+{credential_id}\b", out), out  # type, name, status
        elif command == "revoke":
            assert re.search(r"^status\s+REVOKED$", out, re.MULTILINE), out
        ran.append(command)
    assert ran == ["create", "list", "verify", "rotate", "connect", "revoke", "jobs", "serve"]
    # what the lines did, as the database holds it
    eng: CredentialEngine = await make_engine()
    assert credential_id is not None
    cred = await eng.get_credential("desk-7", credential_id)
    assert cred.status is CredentialStatus.REVOKED and cred.nickname == "Desk 7"
    assert cred.masked_api_key == mask_api_key(
        rotation["api_key"]
    )  # the rotation was promoted before the revoke
    (account,) = (await eng.list_trading_accounts("desk-7")).items
    assert account.name == "Spot" and account.status.value == "DISABLED"  # the revocation disconnected it


# ---- "Envelope" ----------------------------------------------------------------------------------------------

DOCUMENT = openapi.document()


def documented_schema(path: str, method: str, status: int) -> dict[str, Any]:
    """The OpenAPI document's schema of this answer, with the components it refers to."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    response = responses.get(str(status)) or responses["default"]
    return {**response["content"]["application/json"]["schema"], "components": DOCUMENT["components"]}


async def test_envelope_examples_are_what_the_server_answers(
    make_engine: Any, fake: FakeVenue, tmp_path: Path
) -> None:
    """The three envelope lines, with ``{...}``/``[...]`` filled by real answers of a running ApiServer, are
    valid answers of credential/get, credential/list and a refused create, and the error line is the server's
    answer word for word."""
    one, many, refused = block("Envelope", "json").text.splitlines()
    fake.add_key("binance-key-0001", "binance-secret-0001")
    eng: CredentialEngine = await make_engine()
    secret = auth.generate_secret()
    server = ApiServer(eng, ApiConfig(jwt_secret=secret, port=0))
    await server.start()
    try:
        headers = {"Authorization": f"Bearer {auth.mint_token(secret, 'user-1')}"}
        async with aiohttp.ClientSession(base_url=server.url, headers=headers) as http:
            body = {"venue": "BINANCE", "apiKey": "binance-key-0001", "apiSecret": "binance-secret-0001"}
            async with http.post("/api/v3/credential/create", json=body) as resp:
                created = await resp.json()
            cid = created["data"]["credentialId"]
            async with http.get("/api/v3/credential/get", params={"credentialId": cid}) as resp:
                got = await resp.json()
            async with http.get("/api/v3/credential/list") as resp:
                listed = await resp.json()
            async with http.post(
                "/api/v3/credential/create", json={"venue": "BINANCE", "apiSecret": "s"}
            ) as resp:
                error_status, error = resp.status, await resp.json()
    finally:
        await server.close()
    shown_one = json.loads(one.replace("{...}", json.dumps(got["data"])))
    shown_many = json.loads(many.replace("[...]", json.dumps(listed["data"])))
    shown_refused = json.loads(refused)
    OAS31Validator(documented_schema("/api/v3/credential/get", "get", 200)).validate(shown_one)
    OAS31Validator(documented_schema("/api/v3/credential/list", "get", 200)).validate(shown_many)
    OAS31Validator(documented_schema("/api/v3/credential/create", "post", error_status)).validate(
        shown_refused
    )
    assert shown_one == got
    assert shown_many == listed and shown_many["pagination"] == {"offset": 0, "limit": 50, "total": 1}
    assert error_status == 400 and shown_refused == error


# ---- "Event types" -------------------------------------------------------------------------------------------


def key_tree(value: Any) -> Any:
    """The nested key structure of a JSON value (objects only)."""
    if isinstance(value, dict):
        return {k: key_tree(v) for k, v in value.items()}
    return None


def readme_event() -> dict[str, Any]:
    document = json.loads(block("Event types", "json").text)
    assert isinstance(document, dict)
    return document


async def test_event_example_is_a_real_event_shape(make_engine: Any, fake: FakeVenue) -> None:
    """The example event is valid under the published (strict) schema of its type and has exactly the fields,
    at every level, of the same event a real engine emits."""
    shown = readme_event()
    jsonschema.validate(shown, schemas.schema(shown["type"], strict=True))
    assert webhooks.parse_event(shown).payload() == shown
    fake.add_key("AKIAEXAMPLE0001", "secret-0001", account_id="uid-9", identities=("margin", "spot"))
    eng: CredentialEngine = await make_engine()
    cred = await eng.create_credential("user-1", venue="BINANCE", api_key="AKIAEXAMPLE0001", api_secret="secret-0001",
                                       nickname="Main")  # fmt: skip
    await eng.run_until_idle()
    real = next(
        e for e in await eng.list_events("user-1", cred.credential_id) if e.type == shown["type"]
    ).payload()
    jsonschema.validate(real, schemas.schema(shown["type"], strict=True))
    assert key_tree(shown) == key_tree(real)
    assert shown["data"]["credential"]["status"] == real["data"]["credential"]["status"] == "VERIFIED"


# ---- "Receiving webhooks" ------------------------------------------------------------------------------------


def signed(secret: str, msg_id: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed by the standardwebhooks package (not our code)."""
    now = datetime.now(tz=UTC)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, now, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }


def event_body(**credential_changes: Any) -> tuple[bytes, dict[str, Any]]:
    """The README's example event (optionally changed) as a request body, and its parsed form."""
    event = readme_event()
    event["data"]["credential"].update(credential_changes)
    if credential_changes.get("status") == "REVOKED":
        event["type"], event["data"]["sequence"] = "credential.revoked", 3
    return json.dumps(event).encode(), event


async def test_webhook_receiver_runs_as_written(tmp_path: Path) -> None:
    """The receiver, run as a script with WEBHOOK_SECRET and PORT: a signed event is printed once; a repeated
    webhook-id answers 200 without a second print; a badly signed request answers 4xx and is not printed."""
    script = tmp_path / "receiver.py"
    script.write_text(block("Receiving webhooks", "python", 0).text, encoding="utf-8")
    secret, port = webhooks.generate_secret(), free_port()
    env = clean_env(WEBHOOK_SECRET=secret, PORT=str(port))
    verified_body, verified = event_body()
    revoked_body, _ = event_body(status="REVOKED")
    cid = verified["data"]["credential"]["credentialId"]
    first_line = f"credential.verified {cid} 2 VERIFIED"
    last_line = f"credential.revoked {cid} 3 REVOKED"
    url = f"http://127.0.0.1:{port}/hooks"
    async with started([sys.executable, str(script)], env, tmp_path) as receiver:
        await receiver.wait_for_line(lambda line: f":{port}" in line)  # aiohttp's "Running on ..." line
        async with aiohttp.ClientSession() as http:
            headers = signed(secret, "msg_1", verified_body)
            async with http.post(url, data=verified_body, headers=headers) as resp:
                assert resp.status == 200
            await receiver.wait_for_line(lambda line: line == first_line, timeout=10)
            async with http.post(url, data=verified_body, headers=headers) as resp:  # delivered again
                assert resp.status == 200
            forged = signed(webhooks.generate_secret(), "msg_2", revoked_body)
            async with http.post(url, data=revoked_body, headers=forged) as resp:
                assert 400 <= resp.status < 500
            async with http.post(
                url, data=revoked_body, headers=signed(secret, "msg_3", revoked_body)
            ) as resp:
                assert resp.status == 200
            await receiver.wait_for_line(lambda line: line == last_line, timeout=10)
        assert [line for line in receiver.lines if line.startswith("credential.")] == [first_line, last_line]
        status = await receiver.stop()
    assert status == 0, receiver.stderr_text()[-3000:]
    assert secret not in receiver.stdout_text() + receiver.stderr_text()


def test_verifier_snippet_runs_as_written() -> None:
    """The two lines, executed with the names they use bound to a real signed request: a request signed with
    either active secret gives the event; a changed body raises WebhookVerificationError."""
    code = compile(block("Receiving webhooks", "python", 1).text, "README.md (Verifier)", "exec")
    old_secret, new_secret = webhooks.generate_secret(), webhooks.generate_secret()
    body, shown = event_body()
    for signer in (old_secret, new_secret):
        names: dict[str, Any] = {
            "webhooks": webhooks,
            "new_secret": new_secret,
            "old_secret": old_secret,
            "raw_body_bytes": body,
            "request_headers": signed(signer, "msg_1", body),
        }
        exec(code, names)  # noqa: S102 - the README's own example, the point of the test
        event = names["event"]
        assert event.type == "credential.verified" and event.sequence == 2
        assert str(event.credential_id) == shown["data"]["credential"]["credentialId"]
    names["raw_body_bytes"] = body.replace(b"VERIFIED", b"REVOKED")
    with pytest.raises(webhooks.WebhookVerificationError):
        exec(code, names)  # noqa: S102


# ---- "Sending: endpoints" ------------------------------------------------------------------------------------


async def run_statements(text: str, names: dict[str, Any], before: dict[str, Callable[[], Any]]) -> None:
    """Run ``text`` statement by statement as ``python -m asyncio`` would (top-level await); before the statement
    assigning a name in ``before``, await what it maps to (the test's own setup between the README's lines)."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    for statement in ast.parse(text).body:
        targets = [t.id for t in getattr(statement, "targets", []) if isinstance(t, ast.Name)]
        for target in targets:
            if target in before:
                await before.pop(target)()
        code = compile(
            ast.Module(body=[statement], type_ignores=[]), "README.md (endpoints)", "exec", flags=flags
        )
        result = eval(code, names)  # noqa: S307 - the README's own example, the point of the test
        if asyncio.iscoroutine(result):
            await result
    assert not before, f"no statement assigns {list(before)}"


async def test_endpoint_calls_run_as_written(
    database_url: str, master_keys: str, fake: FakeVenue, tmp_path: Path
) -> None:
    """The endpoint calls, run in order on an open engine with the SSRF guard on (DNS faked to a public address,
    never contacted: no worker runs). Before the line listing dead deliveries, the test makes one: a revoked
    credential's event reaches the endpoint, and disabling and enabling the endpoint gives that delivery up."""
    config = EngineConfig(database_url=database_url, master_keys=master_keys, data_dir=tmp_path, workers=0)
    resolver = FakeResolver({"risk.example.com": [PUBLIC]})
    eng = CredentialEngine(config, probes=fake.probes(), webhook_resolver=resolver)
    await eng.open()
    try:
        fake.add_key("binance-key-0001", "binance-secret-0001")
        cred = await eng.create_credential("user-1", venue="BINANCE", api_key="binance-key-0001",
                                           api_secret="binance-secret-0001")  # fmt: skip
        names: dict[str, Any] = {"eng": eng}

        async def a_dead_delivery() -> None:
            endpoint_id = names["ep"].endpoint_id
            await eng.revoke_credential(
                "user-1", cred.credential_id
            )  # credential.revoked: one delivery queued
            await eng.update_webhook_endpoint("user-1", endpoint_id, enabled=False)  # gives it up: dead
            await eng.update_webhook_endpoint("user-1", endpoint_id, enabled=True)

        await run_statements(block("Sending: endpoints", "python").text, names, {"page": a_dead_delivery})
        ep, new_secret, page = names["ep"], names["new_secret"], names["page"]
        assert ep.secret.startswith("whsec_") and new_secret.startswith("whsec_") and new_secret != ep.secret
        assert "whsec_" not in repr(ep)
        assert [d.event_type for d in page.items] == ["credential.revoked"]
        assert resolver.asked == ["risk.example.com"]  # checked when added, through the guard
        assert await eng.list_webhook_endpoints("user-1") == []  # the last line removed it
    finally:
        await eng.close()
