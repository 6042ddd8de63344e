"""``make bench``: run every benchmark in bench/, print one summary table, write bench/results.json.

    python -m bench [--quick] [--only lifecycle,scale] [--skip queue] [--out bench/results.json] [--strict]

Each benchmark module with an ``async def run(...) -> dict`` runs in its own process (a crash or a leak in one
does not colour the next), with the sizes below: the issue's sizes where they fit the 15-minute budget of
``make bench`` on a 2-core machine, reduced where they do not (the plan says so). One PostgreSQL server (embedded
in a temporary folder unless ``ENGINE_BENCH_DATABASE_URL`` is set) serves them all; each run takes a fresh
database on it.

The summary gathers every benchmark's ``summary`` rows (see ``bench.common.figure``); for modules that return
none, rows are derived from their result. Figures with a target show ok or MISSED. The exit status is 1 when a
benchmark failed to run (``--strict``: also when a target was missed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import common

RESULTS = Path(__file__).resolve().parent / "results.json"
BUDGET = 15 * 60  # seconds for the whole `make bench`


@dataclass(frozen=True)
class Plan:
    """One benchmark: its module, its sizes (full and --quick), a time limit, and what was reduced."""

    name: str
    full: dict[str, Any]
    quick: dict[str, Any]
    timeout: float
    sizes: str  # the sizes as the summary states them, and where they depart from the issue
    optional: bool = False  # written by someone else, may not exist yet
    extra: dict[str, Any] = field(default_factory=dict)


PLANS = [
    Plan(
        "verify",
        {"probes": 20},
        {"probes": 5},
        180,
        "20 probes per key kind (module default 30: reduced for the budget)",
    ),
    Plan(
        "queue",
        {"n": 20_000},
        {"n": 2_000},
        420,
        "N = 20,000 no-op jobs per run (issue size); ours and pgqueuer at batch 10 and 50, 3 interleaved rounds,"
        " best of 3",
        optional=True,
    ),
    Plan(
        "lifecycle",
        {"n": 5000, "workers": 50},
        {"n": 500, "workers": 50},
        480,
        "N = 5,000 credentials, 50 ms per request, 50 workers = limit concurrency (issue size)",
    ),
    Plan(
        "scale",
        {"n": 2000, "processes": [1, 2, 4], "rounds": 2},
        {"n": 400, "processes": [1, 2], "rounds": 1},
        300,
        "backlog of 2,000 verify jobs, 50 workers per process, best of 2 interleaved rounds (no N in the issue)",
    ),
    Plan(
        "memory",
        {"stored": [0, 10_000, 100_000], "queued": 10_000, "in_flight": 1000},
        {"stored": [0, 10_000], "queued": 2000, "in_flight": 300},
        300,
        "100,000 idle + 11,050 working credentials, 10,000 queued, 1,000 in flight (issue size)",
    ),
    Plan(
        "fairness",
        {"n": 5000, "samples": 30},
        {"n": 1000, "samples": 10},
        240,
        "owner A's backlog of 5,000 verifications (issue size), 50 ms per request, 10 workers, 30 B creates",
    ),
    Plan(
        "budgets",
        {"seconds": 75.0, "bybit": 900, "binance": 500},
        {"seconds": 20.0, "bybit": 300, "binance": 40},
        420,
        "4 worker processes, 900 Bybit + 500 Binance verifications, up to 75 s per mode (Binance's minute window"
        " needs over 60 s to show the per-process violations; no size in the issue)",
    ),
    Plan("events", {"n": 2000}, {"n": 300}, 300, "N = 2,000 credentials per phase", optional=True),
    Plan(
        "statements",
        {"n": 200},
        {"n": 200},  # a few seconds; fewer credentials would spread the run's fixed statements over too few
        180,
        "N = 200 credentials, 10 clients, FakeVenue; backlog run by 10 workers, then live with one client",
    ),
    Plan("api", {}, {"requests": 200}, 300, "module defaults", optional=True),
    Plan(
        "leases",
        {"n": 200, "stress_leases": 50, "stress_seconds": 20.0},
        {"n": 30, "stress_leases": 50, "stress_seconds": 5.0},
        240,
        "two processes; 200 revocations and 200 rotations one at a time, 50 signing leases for 20 s (issue: 50)",
    ),
    Plan(
        "soak",
        {"events": 30_000, "sample_every": 15.0},
        {"events": 3_000, "sample_every": 3.0, "credentials": 100},
        600,
        "30,000 events, retention 5 s (the issue's 200,000: python -m bench.soak, about 16 minutes here)",
        optional=True,
    ),
]


# ---- one benchmark in a child process ----------------------------------------------------------------------


def child(name: str, kwargs: dict[str, Any], out: str) -> int:
    """Run ``bench.<name>.run(**kwargs)`` here and write its result (and its own rendering) to ``out``."""
    # engine logs as in production (JSON, INFO, redacted) but into /dev/null, for every module alike (a module
    # that configures logging itself still may)
    common.quiet_logs("INFO")
    module = importlib.import_module(f"bench.{name}")
    run = module.run
    result = asyncio.run(run(**kwargs)) if inspect.iscoroutinefunction(run) else run(**kwargs)
    render = getattr(module, "render", None)
    if callable(render):
        text = str(render(result))
    elif isinstance(result, dict) and isinstance(result.get("table"), str):
        text = result["table"]
    else:
        text = ""
    with open(out, "w") as handle:
        json.dump({"result": result, "text": text}, handle, default=str)
    return 0


def available(plan: Plan) -> bool:
    """The module exists and has a ``run`` (checked without importing it: peers may not be installed)."""
    spec = importlib.util.find_spec(f"bench.{plan.name}")
    if spec is None or spec.origin is None:
        return False
    return "def run(" in Path(spec.origin).read_text(encoding="utf-8")


async def run_one(plan: Plan, kwargs: dict[str, Any], timeout: float) -> dict[str, Any]:  # noqa: ASYNC109
    """The benchmark in its own process; returns its record for results.json."""
    with tempfile.TemporaryDirectory(prefix="ce-bench-") as folder:
        out = os.path.join(folder, "result.json")
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench",
            "--child",
            plan.name,
            "--kwargs",
            json.dumps(kwargs),
            "--result",
            out,
            cwd=common.REPO_ROOT,
            env=common.child_env(),
        )
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                for descendant in psutil.Process(proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        descendant.kill()
                proc.kill()
            await proc.wait()
            code = None
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {"settings": kwargs, "sizes": plan.sizes, "seconds": seconds}
        data = None if code != 0 else await asyncio.to_thread(read_result, out)
        if code is None:
            record["error"] = f"timed out after {timeout:.0f} s"
        elif data is None:
            record["error"] = f"exited with status {code} (its traceback is above)"
        else:
            record["result"] = data["result"]
            record["text"] = data["text"]
        return record


def read_result(path: str) -> dict[str, Any] | None:
    """What :func:`child` wrote, or None when it wrote nothing."""
    try:
        with open(path) as handle:
            data: dict[str, Any] = json.load(handle)
    except FileNotFoundError:
        return None
    return data


# ---- summary rows ------------------------------------------------------------------------------------------


def summary_rows(name: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's own summary rows, or rows derived from its result, each tagged with the benchmark."""
    if "error" in record:
        rows = [common.figure("did not run", None, target="runs", ok=False, note=record["error"])]
    else:
        result = record["result"]
        if isinstance(result, dict) and isinstance(result.get("summary"), list):
            rows = list(result["summary"])
        elif name == "verify":
            rows = verify_rows(result)
        elif name == "queue":
            rows = queue_rows(result)
        else:
            rows = generic_rows(result)
    return [{"benchmark": name, **row} for row in rows]


def verify_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """bench.verify: p50 verification latency over the per-request latency, per key kind (target <= 1.3)."""
    target = 1.3  # bench.verify.TARGET_RATIO: one round trip plus overhead
    return [
        common.figure(
            f"p50 latency / request latency, {row['venue']}",
            row["p50_over_latency"],
            "x",
            target=f"<= {target}",
            ok=row["p50_over_latency"] <= target,
            note=f"p50 {row['p50_ms']:.0f} ms, one after another {row['sequential_p50_ms']:.0f} ms",
        )
        for row in result["rows"]
    ]


def queue_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """bench.queue: every rate (the comparison's as best of its interleaved rounds) and the issue's ratios:
    ours >= 2.0 x pgqueuer at batch 10 and at batch 50 (like for like), >= 8 x procrastinate."""
    rows = [
        common.figure(key.removesuffix("_per_s").replace("_", " "), value, "jobs/s")
        for key, value in result.items()
        if key.endswith("_per_s") and isinstance(value, int | float)
    ]
    runs = result.get("runs", {})
    for ours, peer, target, label in (
        ("processed_batch10_per_s", "pgqueuer_batch10_per_s", 2.0, "ours batch 10 / pgqueuer batch 10"),
        ("processed_batch50_per_s", "pgqueuer_batch50_per_s", 2.0, "ours batch 50 / pgqueuer batch 50"),
        ("processed_batch50_per_s", "procrastinate_conc10_per_s", 8.0, "ours / procrastinate concurrency 10"),
    ):
        if ours in result and peer in result and result[peer]:
            ratio = result[ours] / result[peer]
            batch = ours.removeprefix("processed_batch").removesuffix("_per_s")
            raw = runs.get(f"ours_batch{batch}"), runs.get(f"pgqueuer_batch{batch}")
            note = (
                f"best of {len(raw[0])} interleaved: ours {', '.join(f'{v:,.0f}' for v in raw[0])}; "
                f"pgqueuer {', '.join(f'{v:,.0f}' for v in raw[1])}"
                if "pgqueuer" in peer and raw[0] and raw[1]
                else ""
            )
            rows.append(
                common.figure(label, ratio, "x", target=f">= {target:g}", ok=ratio >= target, note=note)
            )
        else:
            rows.append(common.figure(label, None, "x", target=f">= {target:g}", note="peer not installed"))
    return rows


def generic_rows(result: Any) -> list[dict[str, Any]]:
    """Top-level numbers of a result that brings no summary of its own."""
    if not isinstance(result, dict):
        return [common.figure("result", None, note=str(result)[:80])]
    rows = [
        common.figure(key.replace("_", " "), value)
        for key, value in result.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if isinstance(result.get("ok"), bool):
        rows.append(common.figure("targets met", None, target="all", ok=result["ok"]))
    return rows


# ---- the machine -------------------------------------------------------------------------------------------


class OtherLoad:
    """Samples, while a benchmark runs, the CPU used by processes that are not this run's (this runner, its
    children, our PostgreSQL server): on a shared machine that is what makes the figures noisy."""

    def __init__(self, pg_pid: int | None, every: float = 5.0) -> None:
        self.pg_pid = pg_pid
        self.every = every
        self.samples = 0
        self.cpu: dict[str, float] = {}  # command -> sum of CPU % over the samples
        self.loads: list[float] = []

    def _ours(self) -> set[int]:
        ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
        if self.pg_pid is not None:
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self.pg_pid)
                ours |= {self.pg_pid, *(p.pid for p in server.children(recursive=True))}
        return ours

    async def run(self) -> None:
        while True:
            ours = self._ours()
            procs = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in ours]
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.cpu_percent(None)
            await asyncio.sleep(1.0)
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    percent = proc.cpu_percent(None)
                    if percent > 0:
                        command = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])[:90]
                        self.cpu[command] = self.cpu.get(command, 0.0) + percent
            self.samples += 1
            self.loads.append(os.getloadavg()[0])
            await asyncio.sleep(self.every)

    def report(self) -> dict[str, Any]:
        n = max(1, self.samples)
        busiest = sorted(self.cpu.items(), key=lambda item: -item[1])[:6]
        return {
            "samples": self.samples,
            "other_cpu_percent": round(sum(self.cpu.values()) / n, 1),  # 100 = one core busy on average
            "load_1min_mean": round(sum(self.loads) / len(self.loads), 2) if self.loads else None,
            "busiest": [{"command": c, "cpu_percent": round(v / n, 1)} for c, v in busiest if v / n >= 1.0],
        }


def describe(others: dict[str, Any]) -> str:
    """One line: how busy the rest of the machine was while a benchmark ran."""
    if not others.get("samples"):
        return "other load not sampled"
    busy = ", ".join(f"{b['command'][:50]} {b['cpu_percent']:.0f} %" for b in others["busiest"][:3])
    return (
        f"others used {others['other_cpu_percent']:.0f} % CPU on average (of {100 * (os.cpu_count() or 1)} %), "
        f"load {others['load_1min_mean']}; busiest: {busy or '-'}"
    )


# ---- the runner --------------------------------------------------------------------------------------------


async def run_all(plans: list[Plan], quick: bool, dsn: str) -> dict[str, Any]:
    pg_pid = await common.server_pid(dsn)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "quick": quick,
        "benchmarks": {},
    }
    began = time.perf_counter()
    for plan in plans:
        if not available(plan):
            print(f"\n== {plan.name}: skipped (bench/{plan.name}.py has no run() yet)", flush=True)
            report["benchmarks"][plan.name] = {"skipped": "module or run() missing"}
            continue
        kwargs = plan.quick if quick else plan.full
        print(f"\n== {plan.name} ({'quick' if quick else plan.sizes})", flush=True)
        others = OtherLoad(pg_pid)
        sampler = asyncio.create_task(others.run(), name="bench-other-load")
        try:
            record = await run_one(plan, kwargs, plan.timeout)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        record["others"] = others.report()
        if record.get("text"):
            print(record["text"], flush=True)
        if "error" in record:
            print(f"{plan.name}: {record['error']}", flush=True)
        print(f"({plan.name}: {record['seconds']:.0f} s; {describe(record['others'])})", flush=True)
        report["benchmarks"][plan.name] = record
    report["seconds"] = time.perf_counter() - began
    rows: list[dict[str, Any]] = []
    for name, record in report["benchmarks"].items():
        if "skipped" not in record:
            rows.extend(summary_rows(name, record))
    report["summary"] = rows
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every benchmark")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON results")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.kwargs), args.result)

    wanted = set(args.only.split(",")) if args.only else {plan.name for plan in PLANS}
    skipped = set(filter(None, args.skip.split(",")))
    unknown = (wanted | skipped) - {plan.name for plan in PLANS}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plans = [plan for plan in PLANS if plan.name in wanted - skipped]

    # one server for every benchmark process (each takes a fresh database on it)
    with common.postgres_server() as dsn:
        os.environ[common.DATABASE_ENV] = dsn
        report = asyncio.run(run_all(plans, args.quick, dsn))

    print(f"\n== summary ({report['seconds'] / 60:.1f} min; budget {BUDGET // 60} min)")
    print(common.render_summary(report["summary"], with_benchmark=True))
    for name, record in report["benchmarks"].items():
        if "others" in record:
            print(f"while {name} ran: {describe(record['others'])}")
    report["budget_seconds"] = BUDGET
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print(f"written: {args.out}")
    failed = any(row["name"] == "did not run" for row in report["summary"])
    missed = any(row.get("ok") is False for row in report["summary"])
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
