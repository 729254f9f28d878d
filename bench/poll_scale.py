"""Dashboards polling running jobs: 200 browser tabs, each showing one of 50 RUNNING jobs, poll it
with ``If-None-Match`` every 2 s for 60 s while the jobs' trainers write their progress. What a tab
sees: latency, how many answers are 304, and how stale its view gets.

A script of its own rather than a mode of ``bench/api_load.py``: wrk's closed loops there measure
how much the API can answer at saturation; this one offers a fixed, realistic rate far below
saturation, with writes going on, and measures what the clients see: the latency at that rate
and the time a change takes to reach them. Another driver (asyncio + httpx, tabs that wait
between polls), its own duration and its own report. The helpers are ``bench/api_load.py``'s.

Set-up: a fresh PostgreSQL database migrated to head, the API under uvicorn (``--api-workers``
processes, 1 by default: what ``REID_API_WORKERS`` gives ``python -m service serve``), one job
submitted through the API and bulk-inserted copies of it up to ``--table-jobs`` jobs of the key's
owner, ``--jobs`` of them set RUNNING (a worker id, a heartbeat).

The trainers (one writer process, not the event loop of the tabs): every ``--write-period`` s
(5 s) per job, spread over the period, what ``worker/supervisor.py``'s ``_tick`` does when the
trainer's ``progress.json`` changed: one transaction that locks the job (``lock_job``: SELECT
... FOR UPDATE), sets ``progress``, ``epoch``, ``step`` and ``metrics`` through
``service.core.job_progress.progress_columns`` (ORM attributes, so the same UPDATE bumps the row
version the ETag is made of), and ``heartbeat_at`` when ``REID_WORKER__HEARTBEAT_INTERVAL_S``
(10 s) has passed, then commits. Each write is recorded as (job, new version, commit time).
(A supervisor ticks every ``REID_WORKER__POLL_INTERVAL_S``, 1 s, and writes when the file
changed: how often depends on the trainer's ``runtime.log_every_n_steps``; 5 s is a setting.)

The tabs: what the dashboard's job view does (``service/static/js/views/job.js`` and
``poll.js``): ``GET /v1/jobs/{id}`` with the last ETag it got as ``If-None-Match``, then 2 s of
waiting counted from the answer; each tab its own keep-alive connection; the tabs start spread
over the first period, ``--tabs / --jobs`` on each job. (The view's log stream and the events and
metrics it fetches when the epoch changes are not simulated.) Each answer is recorded with its
latency (from sending to the whole answer read), status and the row version in its ETag. The
304 share leaves out each tab's first answer (it has no ETag to send yet).

Staleness of a write (job ``j``, version ``v``, committed at ``t``) for a tab on ``j``: from
``t`` to the first answer that tab got with a version >= ``v``. Counted for every write between
the tab's first answer and the start of its last poll (any poll sent after ``t`` sees it). A
tab's view is at most one period plus one request late: about 2 s. All times are
``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine).

Targets (the issue's): p99 latency < 50 ms and staleness p99 < 3 s.

    python bench/poll_scale.py                            # 200 tabs, 50 jobs, 60 s
    python bench/poll_scale.py --duration 10 --output /tmp/poll_scale.md
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import ssl
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.api_load import (  # noqa: E402
    DEFAULT_PG_URL,
    TINY_JOB,
    api_server,
    bulk_insert_jobs,
    clean_env,
    http_json,
    machine_rows,
    postgres_database,
    tree_cpu_s,
)
from bench.report import Transcript, command_line, table, targets_table, write_report  # noqa: E402
from bench.scheduling import percentile  # noqa: E402

#: The issue's targets: (what, bound), both "below".
TARGETS = {"p99 latency (ms)": 50.0, "staleness p99 (s)": 3.0}

#: The row version in a job's ETag (``"v<version>-<representation>"``, service/api/conditional.py).
ETAG_VERSION = re.compile(r'"v(\d+)-')

OWNER = "alice"


@dataclass(frozen=True)
class Write:
    """A trainer's progress write: the job's new row version and when its commit returned."""

    job: str
    version: int
    committed: float
    took: float  # seconds from the start of the transaction to the commit's return


@dataclass(frozen=True)
class Poll:
    """One answer a tab got (``status`` 0: the request failed)."""

    tab: int
    job: str
    sent: float
    answered: float
    status: int
    version: int | None

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.answered - self.sent)


# ----------------------------------------------------------------------------------------------
# the trainers
# ----------------------------------------------------------------------------------------------


def write_progress(
    db_url: str,
    job_ids: list[str],
    start: float,
    stop: float,
    period: float,
    heartbeat_s: float,
    out: Path,
) -> None:
    """The jobs' supervisors, in one process: from ``start`` to ``stop`` (monotonic), each job's
    progress every ``period`` s (the jobs spread over it), as ``worker/supervisor.py``'s
    ``_tick``; one JSON line per write to ``out``."""
    from datetime import UTC, datetime

    from reid_core.run_dir import Progress
    from service.core.db import make_session_factory, session_scope
    from service.core.job_progress import progress_columns
    from service.core.job_states import lock_job

    engine = create_engine(db_url, pool_size=2)
    factory = make_session_factory(engine)
    steps_per_epoch, epochs = 400, 60
    step = dict.fromkeys(job_ids, 0)
    beat = dict.fromkeys(job_ids, -heartbeat_s)
    due = [(start + period * k / len(job_ids), job) for k, job in enumerate(job_ids)]
    with out.open("w") as log:
        while due:
            when, job = min(due)
            due.remove((when, job))
            if when >= stop:
                continue
            time.sleep(max(0.0, when - time.monotonic()))
            step[job] += 37  # steps a trainer does in 5 s
            s = step[job]
            progress = Progress(
                status="running",
                epoch=s // steps_per_epoch,
                epochs=epochs,
                step_in_epoch=s % steps_per_epoch,
                steps_per_epoch=steps_per_epoch,
                global_step=s,
                progress=min(1.0, s / (steps_per_epoch * epochs)),
                losses={"instance": 3.1 - s * 1e-4, "gsl": 0.21, "pedal": 2.3, "total": 5.6},
                metrics={"mAP": 41.2, "R1": 70.1, "epoch": float(s // steps_per_epoch)},
                clustering={"clusters": 700.0, "outliers": 0.12},
                images_per_second=120.5 + (s % 7),
                eta_seconds=(steps_per_epoch * epochs - s) / 7.4,
            )
            t0 = time.monotonic()
            with session_scope(factory) as session:
                row = lock_job(session, uuid.UUID(job))
                assert row is not None
                version = row.version + 1  # the one UPDATE of this transaction bumps it
                if t0 - beat[job] >= heartbeat_s:
                    row.heartbeat_at = datetime.now(UTC)
                    beat[job] = t0
                for name, value in progress_columns(progress).items():
                    setattr(row, name, value)
            done = time.monotonic()
            log.write(json.dumps([job, version, done, done - t0]) + "\n")
            due.append((when + period, job))
    engine.dispose()


def read_writes(path: Path) -> list[Write]:
    return [Write(*json.loads(line)) for line in path.read_text().splitlines() if line]


# ----------------------------------------------------------------------------------------------
# the tabs
# ----------------------------------------------------------------------------------------------


async def run_tabs(
    base: str, key: str, jobs: list[str], tabs: int, start: float, stop: float, period: float
) -> tuple[list[Poll], float]:
    """``tabs`` tabs round-robin over ``jobs``, from ``start`` (spread over one ``period``) until
    their next poll would come after ``stop``; every answer they got, and the CPU seconds this
    process spent meanwhile."""
    import httpx

    polls: list[Poll] = []

    async def tab(number: int, job: str, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, start + period * number / tabs - time.monotonic()))
        etag: str | None = None
        while True:
            headers = {"If-None-Match": etag} if etag else {}
            sent = time.monotonic()
            try:
                response = await client.get(f"/v1/jobs/{job}", headers=headers)
                status = response.status_code
                etag = response.headers.get("etag", etag) if status == 200 else etag
                match = ETAG_VERSION.match(response.headers.get("etag", ""))
                version = int(match[1]) if match else None
            except httpx.HTTPError:
                status, version = 0, None
            polls.append(Poll(number, job, sent, time.monotonic(), status, version))
            if time.monotonic() + period >= stop:
                return
            await asyncio.sleep(period)

    tls = ssl.create_default_context()  # one for every client (each would build its own)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base, headers={"X-API-Key": key}, limits=limits, timeout=30, verify=tls
                )
            )
            for _ in range(tabs)
        ]
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu0 = time.process_time()
        await asyncio.gather(*(tab(n, jobs[n % len(jobs)], clients[n]) for n in range(tabs)))
        return polls, time.process_time() - cpu0


def staleness(writes: list[Write], polls: list[Poll]) -> tuple[list[float], int]:
    """Seconds from each write to each of its job's tabs seeing it (see the module's docstring),
    and how many of those answers came before the writer noted its commit (counted as 0 s)."""
    by_job: dict[str, list[Write]] = {}
    for w in writes:
        by_job.setdefault(w.job, []).append(w)
    by_tab: dict[int, list[Poll]] = {}
    for p in sorted(polls, key=lambda p: p.answered):
        if p.version is not None:
            by_tab.setdefault(p.tab, []).append(p)
    out: list[float] = []
    early = 0
    for seen in by_tab.values():
        first, last_sent = seen[0].answered, max(p.sent for p in seen)
        versions = list(itertools.accumulate((p.version or 0 for p in seen), max))
        for w in by_job.get(seen[0].job, []):
            if not first < w.committed <= last_sent:
                continue
            i = bisect.bisect_left(versions, w.version)
            if i == len(versions):
                continue  # not seen before the run ended (cannot happen for a poll sent later)
            lag = seen[i].answered - w.committed
            early += lag < 0
            out.append(max(0.0, lag))
    return out, early


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def dist(values: list[float], unit: str, scale: float = 1.0) -> str:
    """``p50 a, p90 b, p99 c, max d <unit> (n=...)``."""
    if not values:
        return "n/a"
    p = [percentile(values, q) * scale for q in (50, 90, 99)]
    return (
        f"p50 {p[0]:.1f}, p90 {p[1]:.1f}, p99 {p[2]:.1f}, max {max(values) * scale:.1f} {unit} "
        f"(n={len(values)})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="maintenance database of the server")
    p.add_argument("--tabs", type=int, default=200, help="dashboard tabs (default 200)")
    p.add_argument("--jobs", type=int, default=50, help="RUNNING jobs the tabs show (default 50)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of polling (default 60)")
    p.add_argument("--poll-period", type=float, default=2.0, help="a tab's wait between polls")
    p.add_argument("--write-period", type=float, default=5.0, help="a job's progress writes")
    p.add_argument("--heartbeat", type=float, default=10.0, help="a job's heartbeats (seconds)")
    p.add_argument("--table-jobs", type=int, default=10_000, help="jobs of the owner in all")
    p.add_argument("--api-workers", type=int, default=1, help="uvicorn processes of the API")
    p.add_argument(
        "--note", default="", help="a line for the report (e.g. how quiet the machine was)"
    )
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/poll_scale.md")
    args = p.parse_args(argv)
    if args.table_jobs <= args.jobs:
        p.error(f"--table-jobs {args.table_jobs} must be above --jobs {args.jobs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    command = command_line("poll_scale.py", argv)
    transcript = Transcript()
    say = transcript.say

    say(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs")
    from reid_core.data import generate_synthetic_market
    from service.core import migrate
    from service.core.api_keys import create_api_key
    from service.core.db import make_session_factory, session_scope

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="poll_scale_")))
        db_url = stack.enter_context(postgres_database(args.pg_url, "reid_bench_poll"))
        migrate.upgrade(db_url)
        engine = create_engine(db_url)
        stack.callback(engine.dispose)
        with session_scope(make_session_factory(engine)) as session:
            _, key = create_api_key(session, OWNER, name="bench")
        roots = tmp / "roots"
        data = generate_synthetic_market(
            roots / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
        )
        env = clean_env(
            DATABASE_URL=db_url,
            DATA_DIR=str(tmp / "var"),
            DATASET_ROOTS=json.dumps([str(roots)]),
            JOB_BOUNDS__MAX_GPUS="0",
            WORKER__ENQUEUE_ON_SUBMIT="false",
        )
        api = stack.enter_context(api_server(tmp, env, workers=args.api_workers))
        status, dataset, _ = http_json(
            "POST", api.base + "/v1/datasets", key, {"name": "synthetic", "path": str(data)}
        )
        assert status == 201, dataset
        body = {"dataset_id": dataset["id"], "config": TINY_JOB, "gpus": 0}
        status, template, _ = http_json("POST", api.base + "/v1/jobs", key, body)
        assert status == 201, template
        bulk_insert_jobs(engine, template["id"], args.table_jobs - 1)
        with engine.begin() as conn:
            job_ids = [
                str(i)
                for i in conn.execute(
                    text(
                        "UPDATE jobs SET state = 'RUNNING', worker_id = 'bench@poll-scale', "
                        "heartbeat_at = now(), progress = 0, epoch = 0, step = 0, "
                        "metrics = CAST('{}' AS JSONB) WHERE id IN (SELECT id FROM jobs "
                        "WHERE id <> :template ORDER BY created_at DESC LIMIT :n) RETURNING id"
                    ),
                    {"template": template["id"], "n": args.jobs},
                ).scalars()
            ]
        say(
            f"{args.table_jobs:,} jobs of the key's owner, {len(job_ids)} of them RUNNING; API on "
            f"{api.base} ({args.api_workers} uvicorn process{'es' if args.api_workers > 1 else ''})"
        )

        start = time.monotonic() + 3.0  # the writer process and the tabs' clients start meanwhile
        stop = start + args.duration
        writes_file = tmp / "writes.jsonl"
        writer = multiprocessing.get_context("spawn").Process(
            target=write_progress,
            args=(db_url, job_ids, start, stop, args.write_period, args.heartbeat, writes_file),
            name="trainers",
        )
        writer.start()
        cpu0 = tree_cpu_s(api.proc.pid)
        polls, own_cpu = asyncio.run(
            run_tabs(api.base, key, job_ids, args.tabs, start, stop, args.poll_period)
        )
        server_cpu = tree_cpu_s(api.proc.pid) - cpu0
        writer.join(timeout=60)
        if writer.exitcode != 0:
            raise SystemExit(f"the writer process failed (exit code {writer.exitcode})")
        writes = read_writes(writes_file)

    # ---- figures ----------------------------------------------------------------------------
    end = os.getloadavg()
    say(f"load average at the end {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}")
    window = args.duration
    codes = Counter(p.status for p in polls)
    answered = [p for p in polls if p.status in (200, 304)]
    latency = [p.latency_ms for p in answered]
    lag, early = staleness(writes, polls)
    # a tab's first poll has no ETag to send: its 200 says nothing of the polling
    first_sent: dict[int, float] = {}
    for p in polls:
        first_sent[p.tab] = min(p.sent, first_sent.get(p.tab, p.sent))
    later = [p for p in answered if p.sent > first_sent[p.tab]]
    share_304 = sum(p.status == 304 for p in later) / max(len(later), 1)
    expected_304 = max(
        0.0, 1 - (args.poll_period + percentile(latency, 50) / 1000) / args.write_period
    )
    rows = [
        ("tabs / running jobs / jobs of the owner", f"{args.tabs} / {len(job_ids)} / {args.table_jobs:,}"),
        ("polling", f"{window:g} s, {len(polls)} requests, {len(polls) / window:.1f} req/s"),
        ("status codes", ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))),
        ("304 share (after each tab's first answer)", f"{share_304:.1%} (a version change every {args.write_period:g} s, a poll every "
         f"{args.poll_period:g} s + latency: about {expected_304:.0%} expected)"),
        ("latency, all answers", dist(latency, "ms")),
        ("latency, each tab's first answer (no ETag yet)",
         dist([p.latency_ms for p in answered if p.sent == first_sent[p.tab]], "ms")),
        ("latency, the answers after it (If-None-Match)", dist([p.latency_ms for p in later], "ms")),
        ("latency, 304", dist([p.latency_ms for p in answered if p.status == 304], "ms")),
        ("latency, 200", dist([p.latency_ms for p in answered if p.status == 200], "ms")),
        ("staleness (write commit -> a tab's first answer showing it)", dist(lag, "s")),
        ("answers showing a write before the writer noted its commit (counted 0 s)", str(early)),
        ("progress writes", f"{len(writes)} ({len(writes) / window:.1f}/s), transaction "
         + dist([w.took for w in writes], "ms", 1000)),
        ("API CPU", f"{1000 * server_cpu / max(len(polls), 1):.2f} ms/request, "
         f"{server_cpu / window:.0%} of one CPU"),
        ("the tabs' own CPU (this process)", f"{own_cpu / window:.0%} of one CPU"),
    ]  # fmt: skip
    for label, value in rows:
        say(f"{label}: {value}")
    measured = {
        "p99 latency (ms)": percentile(latency, 99),
        "staleness p99 (s)": percentile(lag, 99),
    }
    target_rows = []
    for name, bound in TARGETS.items():
        ok = measured[name] < bound
        target_rows.append((name, f"< {bound:g}", measured[name], "PASS" if ok else "FAIL"))
        say(f"target {name} < {bound:g}: {measured[name]:.2f} {'PASS' if ok else 'FAIL'}")
    if codes[0] or set(codes) - {0, 200, 304}:
        say(f"note: answers other than 200/304: {dict(codes)}")

    md = ["# Polling at scale", "", f"Command: `{command}`", ""]
    if args.note:
        md += [args.note, ""]
    md += [
        f"{args.tabs} simulated dashboard tabs (asyncio + httpx, one keep-alive connection each) "
        f"poll `GET /v1/jobs/{{id}}` with `If-None-Match`, waiting {args.poll_period:g} s after "
        f"each answer, {args.tabs // max(len(job_ids), 1)} tabs on each of {len(job_ids)} RUNNING "
        f"jobs, for {args.duration:g} s. A writer process does what each job's supervisor does "
        f"when its trainer's progress changed, every {args.write_period:g} s per job: lock the "
        "job, set progress, epoch, step and metrics (and the heartbeat every "
        f"{args.heartbeat:g} s), commit. The API: uvicorn, {args.api_workers} process(es), no "
        "access log, on a fresh PostgreSQL database. Staleness: from a write's commit to the "
        "first answer a tab of that job got with that row version or a later one.",
        "",
        "## Machine",
        "",
        *table(("item", "value"), machine_rows(load)),
        "",
        "## Results",
        "",
        *table(("measurement", "value"), rows),
        "",
        "## Targets",
        "",
        *targets_table(target_rows),
        "",
    ]
    write_report(args.output, md, transcript)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
