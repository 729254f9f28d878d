"""Load on the job API, each route as a ratio of the bare framework route: uvicorn on a fresh
PostgreSQL database, driven by wrk from a second process.

The reference is measured in the same run: ``bench/bare_app.py``, one FastAPI route that answers
a fixed 3.3 KB JSON body with no work of its own, served by the same uvicorn command (same
settings, same number of processes) on its own port and loaded by the same wrk settings. Every
route is printed as ``x bare``: its req/s over the bare route's and its p99 over the bare
route's, and its server CPU per request over the bare route's (``CPU x bare``: the least moved
by other load on the machine). A ratio says what the service adds to the framework, and moves
far less with the machine and its load than absolute figures do.

Measured (with ``--jobs`` = 10,000 jobs of the key's owner in the table unless said):

a. ``GET /v1/jobs/{id}`` with ``If-None-Match: <its ETag>`` (304: the row version alone is read)
   and plain (200), with 1 and 2 API processes (``--api-workers``: uvicorn's ``--workers``, what
   ``REID_API_WORKERS`` gives ``python -m service serve``), each against the bare route served
   with as many processes;
b. ``GET /v1/jobs?limit=50`` (the first page of summaries, newest first) with 1,000, 10,000 and
   100,000 jobs of the owner (``--list-sizes``; the rows bulk-inserted with SQL between the runs):
   req/s at each size and their max/min, and at each size the EXPLAIN (ANALYZE, BUFFERS) of the two
   statements the route sends, captured from ``service.core.jobs.list_jobs`` (the bounded count,
   the page: an index scan is expected); the page filtered by ``state=RUNNING`` at ``--jobs``;
c. ``POST /v1/jobs`` bursts (200 requests, 8 connections, each with its own idempotency key and
   its own configuration, ``config.name`` = the key, so that no request takes the resolved
   configuration of an earlier one, ``service.core.jobs.ResolvedConfigs``):
   once with ``REID_WORKER__ENQUEUE_ON_SUBMIT=false`` and once publishing to a real Redis broker
   (a redis-server of our own on a free port); afterwards exactly that many jobs must exist (and
   messages be in Redis): no job lost. Their jobs are deleted then, so that the first page
   shows the same rows at every size.

Per run: requests/s, latency p50/p99 (wrk's, from the Lua ``done`` hook), the server's CPU
time per request (``/proc``, uvicorn's processes together: less sensitive to other load on the
machine than wall-clock figures) and the status codes (a run that answered anything but its
expected status is a failed check: its figures are not the route's). The targets (``TARGETS``,
the issue's, one API process) are printed PASS or FAIL; the exit code does not depend on them (0
unless the benchmark itself broke). The polling scale test (many dashboards polling running jobs
whose progress changes) is ``bench/poll_scale.py``.

Also the helpers of the other service benchmarks (``bench/scheduling.py``,
``bench/poll_scale.py``): a temporary PostgreSQL database, a redis-server of our own, uvicorn
processes, free ports, machine information.

    python bench/api_load.py                      # needs PostgreSQL on 127.0.0.1:5432 and wrk
    python bench/api_load.py --duration 3 --warmup 1 --list-sizes 1000,10000 --output /tmp/a.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import Transcript, command_line, table, write_report  # noqa: E402

#: The PostgreSQL server: a maintenance database to create and drop ours from.
DEFAULT_PG_URL = os.environ.get(
    "REID_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)

#: The service and the reference, as uvicorn imports them (``--factory``).
SERVICE_APP = "service.app:create_app"
BARE_APP = "bench.bare_app:create_app"

#: A job of seconds (as tests/helpers.py TINY_JOB_CONFIG), one step of one epoch, no evaluation.
TINY_JOB = {
    "data.height": 96,
    "data.width": 48,
    "data.batch_size": 8,
    "data.num_workers": 0,
    "model.backbone": "mobilenet_v3_small",
    "model.pretrained": "none",
    "model.pgm_channels": 32,
    "model.pgm_hidden": 16,
    "model.patch_dim": 16,
    "model.ipfl_dim": 8,
    "loss.pedal.neighbours": 3,
    "loss.gsl.warmup_epochs": 1,
    "eval.batch_size": 32,
    "eval.enabled": False,
    "schedule.epochs": 1,
    "schedule.max_steps_per_epoch": 1,
    "runtime.num_threads": 1,
    "runtime.log_every_n_steps": 1,
    "runtime.progress_bar": False,
}


@dataclass(frozen=True)
class Target:
    """``run`` (one API process, ``--jobs`` jobs in the table) against the bare route: its
    req/s (``rps``) or p99 (``p99``) over the bare route's, ``rule`` ``bound``."""

    run: str
    metric: Literal["rps", "p99"]
    rule: Literal[">=", "<="]
    bound: float

    def label(self) -> str:
        what = "req/s" if self.metric == "rps" else "p99"
        return f"{self.run} {what} x bare {self.rule} {self.bound:g}"


#: The issue's targets, as ratios of the bare route (``list_jobs`` is the first page at
#: ``--jobs``). Also targets, checked apart: the list flat over the sizes (:data:`FLAT_MAX`,
#: an index scan at each) and no job lost in the bursts.
TARGETS = (
    Target("get_job_304", "rps", ">=", 0.5),
    Target("get_job_304", "p99", "<=", 2.0),
    Target("get_job", "rps", ">=", 0.33),
    Target("list_jobs", "rps", ">=", 0.1),
    Target("submit_redis", "rps", ">=", 0.1),
)
#: "Flat from 1,000 to 100,000 jobs": the list's largest req/s over its smallest at most this
#: (the statements read the same 50 rows and count to at most 1,001 at every size: what is
#: left is the drift of the machine over the run, which the bare route's two runs show).
FLAT_MAX = 1.25


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by bench/scheduling.py and bench/poll_scale.py)
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new database on the server of ``admin_url`` (dropped afterwards, even if still in
    use); yields its URL."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the process group we started (``start_new_session``), SIGKILL after
    ``timeout``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A redis-server of our own on a free loopback port (no persistence); yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install -y redis-server)")
    port = free_port()
    log = folder / f"redis_{port}.log"
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"redis-server did not start:\n{log.read_text()}") from None
                time.sleep(0.1)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Until ``url`` answers 200; exits with the server's log when it dies or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def clean_env(**reid: str) -> dict[str, str]:
    """This process's environment without the developer's ``REID_*`` variables, plus ``reid``
    (names without the ``REID_`` prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env.update({f"REID_{k}": v for k, v in reid.items()})
    return env


def machine_rows(load: tuple[float, float, float]) -> list[tuple[str, str]]:
    """What the results were measured on, the load average at the start included."""
    return [
        ("platform", platform.platform()),
        ("os.cpu_count()", str(os.cpu_count())),
        (
            "os.getloadavg() at start (1/5/15 min)",
            " / ".join(f"{x:.2f}" for x in load),
        ),
        ("python", platform.python_version()),
    ]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc), 0 where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc: every process's parent, read once)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tree


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (uvicorn's worker processes)."""
    return sum(process_cpu_s(p) for p in process_tree(pid))


# ----------------------------------------------------------------------------------------------
# wrk
# ----------------------------------------------------------------------------------------------

_LUA_COMMON = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  codes = {}
  answered = 0
  sent = 0
  first_us = -1
  last_us = -1
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  answered = answered + 1
  last_us = now_us()
  if QUOTA > 0 and answered >= QUOTA then
    io.write("THREAD_DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local all, first, last = {}, -1, -1
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("codes")) do all[tostring(k)] = (all[tostring(k)] or 0) + v end
    local f, l = t:get("first_us"), t:get("last_us")
    if f >= 0 and (first < 0 or f < first) then first = f end
    if l > last then last = l end
  end
  local parts = {}
  for k, v in pairs(all) do table.insert(parts, string.format('"%s":%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"first_us":%.0f,"last_us":%.0f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,"codes":{%s}}\n',
    summary.requests, summary.duration, summary.bytes, first, last,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max, table.concat(parts, ",")))
end
"""

_LUA_STATIC = r"""
function request()
  if first_us < 0 then first_us = now_us() end
  sent = sent + 1
  return wrk.format()
end
"""

# Each POST gets its own key, <tag>-t<thread>-<n>, between the body's parts.
_LUA_KEYED = r"""
function request()
  if first_us < 0 then first_us = now_us() end
  sent = sent + 1
  local key = KEY_TAG .. "-t" .. tid .. "-" .. sent
  return wrk.format(nil, nil, nil, table.concat(BODY_PARTS, key))
end
"""


def _lua_string(value: str) -> str:
    return "[==[" + value + "]==]"


def write_lua(
    folder: Path,
    name: str,
    *,
    method: str,
    headers: dict[str, str],
    quota: int = 0,
    keyed_body: tuple[list[str], str] | None = None,
) -> Path:
    """A wrk script: method and headers, status counting, JSON summary on stdout; with
    ``quota`` each thread stops after that many answers; with ``keyed_body`` =
    ``(parts, tag)`` every request's body is ``parts`` joined by its own key,
    ``<tag>-t<thread>-<n>``."""
    lines = [f"-- generated by bench/api_load.py ({name})", f'wrk.method = "{method}"']
    lines += [f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in headers.items()]
    lines.append(f"QUOTA = {quota}")
    if keyed_body is not None:
        parts, tag = keyed_body
        lines += [
            "BODY_PARTS = { " + ", ".join(_lua_string(part) for part in parts) + " }",
            f"KEY_TAG = {_lua_string(tag)}",
        ]
    script = "\n".join(lines) + _LUA_COMMON + (_LUA_KEYED if keyed_body else _LUA_STATIC)
    path = folder / f"{name}.lua"
    path.write_text(script)
    return path


@dataclass
class LoadResult:
    """One wrk run: throughput, latency, status codes, the server's CPU time."""

    name: str
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    codes: dict[str, int]
    errors: dict[str, int]
    bytes_per_request: float
    server_cpu_s: float
    connections: int
    processes: int = 1
    jobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000.0 * self.server_cpu_s / max(self.requests, 1)

    @property
    def sessions_per_1k(self) -> float:
        """New PostgreSQL connections per 1,000 requests (``extra["pg_sessions"]``; NaN
        where not counted): a pool too small for the concurrency opens one per request."""
        opened = self.extra.get("pg_sessions", -1)
        return 1000.0 * opened / max(self.requests, 1) if opened >= 0 else float("nan")

    def line(self) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.codes.items()))
        errors = {k: v for k, v in self.errors.items() if v}
        where = f"{self.processes} process{'es' if self.processes > 1 else ''}, {self.jobs} jobs"
        return (
            f"{self.name} [{where}]: {self.rps:.1f} req/s ({self.requests} in {self.seconds:.1f} "
            f"s, {self.connections} connections), p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms "
            f"(max {self.max_ms:.0f}), server CPU {self.cpu_ms_per_request:.2f} ms/request, "
            f"{self.bytes_per_request:.0f} B/response"
            + (
                f", new PostgreSQL connections {self.sessions_per_1k:.0f}/1k requests"
                if self.sessions_per_1k == self.sessions_per_1k
                else ""
            )
            + f"; status {codes}"
            + (f"; errors {errors}" if errors else "")
        )


def run_wrk(
    name: str,
    url: str,
    script: Path,
    server_pid: int,
    *,
    threads: int,
    connections: int,
    duration_s: float,
    quota_threads: int = 0,
) -> LoadResult:
    """Run wrk (a second process) against ``url``; the server's CPU is that of ``server_pid``
    and its descendants. Duration-based unless ``quota_threads`` > 0: then wrk is interrupted
    once that many threads reached their quota, and throughput is requests over first request
    to last answer (measured in the Lua script)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    cpu0 = tree_cpu_s(server_pid)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out: list[str] = []
    finished = 0
    for line in proc.stdout:
        out.append(line)
        if line.startswith("THREAD_DONE"):
            finished += 1
            if quota_threads and finished >= quota_threads:
                proc.send_signal(signal.SIGINT)  # wrk prints its summary and exits
    proc.wait()
    server_cpu = tree_cpu_s(server_pid) - cpu0
    data = next((ln for ln in out if ln.startswith("WRKJSON ")), None)
    if data is None:
        raise RuntimeError(f"wrk gave no summary for {name}:\n{''.join(out)[-2000:]}")
    d = json.loads(data[len("WRKJSON ") :])
    seconds = d["duration_us"] / 1e6
    if quota_threads and d["first_us"] >= 0:
        seconds = (d["last_us"] - d["first_us"]) / 1e6
    return LoadResult(
        name=name,
        requests=d["requests"],
        seconds=seconds,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        mean_ms=d["mean_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        codes=d["codes"],
        errors=d["errors"],
        bytes_per_request=d["bytes"] / max(d["requests"], 1),
        server_cpu_s=server_cpu,
        connections=connections,
    )


# ----------------------------------------------------------------------------------------------
# the service under test
# ----------------------------------------------------------------------------------------------


@dataclass
class Api:
    """A uvicorn serving ``app`` with ``workers`` processes."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    workers: int


@contextlib.contextmanager
def api_server(
    folder: Path, env: dict[str, str], app: str = SERVICE_APP, workers: int = 1
) -> Iterator[Api]:
    """``uvicorn --factory <app> --workers <workers>`` on a free loopback port, no access log (its
    cost is not the service's): the bare route and the service are started by this same command.
    Returns once every process logged its start-up (with several, the first may answer long
    before the others)."""
    port = free_port()
    log = folder / f"uvicorn_{port}.log"
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", app,
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--no-access-log", "--log-level", "info",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc, log)
        deadline = time.monotonic() + 300
        while log.read_text(errors="replace").count("Application startup complete") < workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{app}: {workers} processes did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield Api(proc, base, log, workers)
    finally:
        stop_process(proc)


def http_json(
    method: str, url: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """One request with the API key; (status, JSON body, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("X-API-Key", key)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        # generous: the first request imports the dataset readers (a minute on a starved CPU)
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, json.loads(response.read() or b"{}"), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def header(headers: dict[str, str], name: str) -> str:
    """A response header, whatever the case of its name."""
    return next(v for k, v in headers.items() if k.lower() == name.lower())


def bulk_insert_jobs(engine: Engine, template_id: str, count: int, start: int = 0) -> float:
    """``count`` copies of job ``template_id`` in one INSERT ... SELECT over generate_series:
    new ids, one minute apart going back in time from ``start + 1`` minutes before the
    template, states 10% RUNNING, 5% QUEUED, 5% FAILED, 80% SUCCEEDED with finished-job
    metrics; then ANALYZE. Returns the seconds it took."""
    from service.core.job_progress import JobMetrics
    from service.core.models import Job

    metrics = JobMetrics(
        status="finished",
        losses={"instance": 3.1, "gsl": 0.21, "pedal": 2.3, "ipfl": 1.9, "total": 7.5},
        eval={"mAP": 41.2, "R1": 70.1, "R5": 85.0, "R10": 89.9, "mINP": 10.2, "epoch": 60},
        clustering={"clusters": 700, "outliers": 0.12},
        epochs=60,
        steps_per_epoch=400,
        step_in_epoch=400,
        images_per_second=120.5,
        eta_seconds=0,
    ).model_dump_json()
    overrides = {
        "id": "gen_random_uuid()",
        "state": "(ARRAY['RUNNING','RUNNING','QUEUED','FAILED','SUCCEEDED','SUCCEEDED',"
        "'SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED',"
        "'SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED','SUCCEEDED',"
        "'SUCCEEDED'])[1 + i % 20]",
        "idempotency_key": "NULL",
        "request_hash": "NULL",
        "metrics": "CAST(:metrics AS JSONB)",
        "progress": "1.0",
        "created_at": "t.created_at - i * interval '1 minute'",
        "updated_at": "t.created_at - i * interval '1 minute' + interval '30 seconds'",
    }
    columns = [c.name for c in Job.__table__.columns]
    select_list = ", ".join(overrides.get(c, f"t.{c}") for c in columns)
    sql = (
        f"INSERT INTO jobs ({', '.join(columns)}) SELECT {select_list} "
        "FROM jobs t, generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i "
        "WHERE t.id = :template"
    )
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(sql),
            {
                "first": start + 1,
                "last": start + count,
                "template": template_id,
                "metrics": metrics,
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE jobs"))
    return time.perf_counter() - t0


def pg_sessions(engine: Engine) -> int:
    """Sessions (connections) PostgreSQL has opened to the database so far
    (``pg_stat_database.sessions``, PostgreSQL >= 14; a backend's count shows once it flushed its
    statistics: at once when it exits); -1 where unknown."""
    with engine.connect() as conn:
        try:
            query = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            return int(conn.exec_driver_sql(query).scalar_one())
        except SQLAlchemyError:  # an older server: no such column
            return -1


def owner_jobs(engine: Engine, owner: str) -> int:
    """How many jobs ``owner`` has."""
    with engine.connect() as conn:
        query = text("SELECT count(*) FROM jobs WHERE owner = :owner")
        return int(conn.execute(query, {"owner": owner}).scalar_one())


def delete_newer_jobs(engine: Engine, template_id: str) -> int:
    """Delete the jobs created after job ``template_id`` (the bursts'); how many. The first page
    then shows the same rows as before them."""
    with engine.begin() as conn:
        deleted = conn.execute(
            text("DELETE FROM jobs WHERE created_at > (SELECT created_at FROM jobs WHERE id = :t)"),
            {"t": template_id},
        )
        return int(deleted.rowcount)


def list_plans(engine: Engine, owner: str, states: list[str] | None = None) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the statements ``GET /v1/jobs?limit=50`` sends for its first
    page of summaries: ``service.core.jobs.list_jobs`` runs here on ``engine`` and its SELECTs
    are captured as sent to PostgreSQL (``count``: bounded at 1,001 rows; ``page``), then
    explained with their parameters."""
    from sqlalchemy.orm import Session

    from service.core import jobs
    from service.core.models import JobState

    sent: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:  # conn, cursor, statement, parameters, context, many
        sent.append((args[2], args[3]))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            wanted = [JobState(s) for s in states] if states else None
            jobs.list_jobs(session, owner, states=wanted, dataset_id=None, limit=50)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    selects = [s for s in sent if s[0].lstrip().upper().startswith("SELECT")]
    if len(selects) != 2:
        raise RuntimeError(f"list_jobs sent {len(selects)} SELECTs, not count and page: {sent}")
    plans = {}
    with engine.connect() as conn:
        for kind, (statement, parameters) in zip(("count", "page"), selects, strict=True):
            explain = "EXPLAIN (ANALYZE, BUFFERS) " + statement
            rows = conn.exec_driver_sql(explain, parameters).scalars().all()
            plans[kind] = "\n".join(rows)
    return plans


def plan_nodes(plan: str) -> list[str]:
    """The node names of an EXPLAIN output, top down (``Limit``, ``Index Scan Backward using
    ix_jobs_owner_created_at on jobs``, ...)."""
    nodes = []
    for number, line in enumerate(plan.splitlines()):
        if number == 0 or line.lstrip().startswith("->"):
            nodes.append(line.lstrip().removeprefix("->").strip().split("  (")[0])
    return nodes


def reads_by_index(plan: str) -> bool:
    """The plan reads through an index, without a sequential scan or a sort of the rows."""
    nodes = plan_nodes(plan)
    avoided = ("Seq Scan", "Sort", "Incremental Sort", "Parallel Seq Scan")
    return any("Index" in n for n in nodes) and not any(n.startswith(avoided) for n in nodes)


def execution_ms(plan: str) -> float:
    """The ``Execution Time`` of an EXPLAIN ANALYZE output, in ms (NaN when absent)."""
    for line in plan.splitlines():
        if line.startswith("Execution Time:"):
            return float(line.split()[2])
    return float("nan")


def count_jobs(engine: Engine, tag: str) -> tuple[int, int, int]:
    """(jobs whose idempotency key starts with ``tag-``, distinct keys among them, how many of
    them were recorded as sent to the broker)."""
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT idempotency_key), count(heartbeat_at) "
                "FROM jobs WHERE idempotency_key LIKE :pattern"
            ),
            {"pattern": f"{tag}-%"},
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


def redis_messages(url: str, queue: str) -> int:
    """Messages waiting in the Redis lists of ``queue`` (one list per priority)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return sum(
            int(client.llen(k)) for k in client.scan_iter(f"{queue}*") if client.type(k) == b"list"
        )
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

#: The owner of the API key and of every job.
OWNER = "alice"


def find(
    results: list[LoadResult], name: str, processes: int = 1, jobs: int | None = None
) -> LoadResult | None:
    """The run ``name`` with ``processes`` API processes (and ``jobs`` jobs, when given)."""
    for res in results:
        if res.name == name and res.processes == processes and jobs in (None, res.jobs):
            return res
    return None


def cpu_x_bare(results: list[LoadResult], res: LoadResult) -> float:
    """Server CPU per request of ``res`` over the bare route's with as many processes: what
    the route costs, little moved by other load on the machine (NaN without a bare run)."""
    bare = [
        r.cpu_ms_per_request for r in results if r.name == "bare" and r.processes == res.processes
    ]
    mean = statistics.fmean(bare) if bare else 0.0
    return res.cpu_ms_per_request / mean if mean > 0 else float("nan")


def x_bare(results: list[LoadResult], res: LoadResult) -> tuple[float, float]:
    """(req/s, p99) of ``res`` over the bare route's with as many processes: the mean of its
    runs (one before and one after the routes measured against it); NaN without one."""
    bare = [r for r in results if r.name == "bare" and r.processes == res.processes]
    rps = statistics.fmean(r.rps for r in bare) if bare else 0.0
    p99 = statistics.fmean(r.p99_ms for r in bare) if bare else 0.0
    if rps == 0 or p99 == 0:
        return float("nan"), float("nan")
    return res.rps / rps, res.p99_ms / p99


def list_runs(results: list[LoadResult]) -> list[LoadResult]:
    """The first-page runs (one process), by number of jobs."""
    return sorted((r for r in results if r.name == "list_jobs"), key=lambda r: r.jobs)


def spread(values: list[float]) -> float:
    """Largest over smallest (NaN for none or a zero)."""
    return max(values) / min(values) if values and min(values) > 0 else float("nan")


def check_targets(
    results: list[LoadResult], jobs: int, page_plans: dict[int, str], checks: list[tuple[str, bool]]
) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL): :data:`TARGETS` at ``jobs`` jobs, the list flat over the
    sizes with an index scan at each, no job lost."""
    rows = []
    for target in TARGETS:
        res = find(results, target.run, 1, jobs)
        if res is None:
            continue
        rps_x, p99_x = x_bare(results, res)
        value = rps_x if target.metric == "rps" else p99_x
        ok = value >= target.bound if target.rule == ">=" else value <= target.bound
        rows.append((target.label(), f"{value:.2f}", "PASS" if ok else "FAIL"))
    lists = list_runs(results)
    if len(lists) > 1:
        flat = spread([r.rps for r in lists])
        indexed = all(reads_by_index(page_plans[r.jobs]) for r in lists)
        sizes = " / ".join(f"{r.jobs:,}" for r in lists)
        rows.append(
            (
                f"list_jobs flat over {sizes} jobs: max/min req/s <= {FLAT_MAX:g}, "
                "index scan at each",
                f"{flat:.2f}, index scan: {'yes' if indexed else 'NO'}",
                "PASS" if flat <= FLAT_MAX and indexed else "FAIL",
            )
        )
    bursts = [ok for line, ok in checks if "POSTs ->" in line]
    if bursts:
        lost = "none" if all(bursts) else "MISMATCH (see the checks)"
        rows.append(("no job lost in the bursts", lost, "PASS" if all(bursts) else "FAIL"))
    return rows


def findings(
    results: list[LoadResult],
    jobs: int,
    page_plans: dict[int, str],
    count_plans: dict[int, str],
    checks: list[tuple[str, bool]],
) -> list[str]:
    """What the figures say, in sentences for the report."""
    notes = []
    a, b = find(results, "get_job", 1, jobs), find(results, "get_job_304", 1, jobs)
    bare = find(results, "bare", 1)
    if a and b and bare:
        notes.append(
            f"A 304 costs the server {b.cpu_ms_per_request:.2f} ms of CPU, "
            f"{b.cpu_ms_per_request / a.cpu_ms_per_request:.0%} of a 200's "
            f"({a.cpu_ms_per_request:.2f} ms; the bare route {bare.cpu_ms_per_request:.2f} ms), "
            f"and runs at {b.rps / a.rps:.2f}x the 200's rate: it reads the row version alone "
            f"and sends {b.bytes_per_request:.0f} bytes instead of {a.bytes_per_request:.0f}."
        )
    for processes in sorted({r.processes for r in results}):
        bare_rps = [r.rps for r in results if r.name == "bare" and r.processes == processes]
        if len(bare_rps) > 1:
            notes.append(
                f"The bare route ({processes} process{'es' if processes > 1 else ''}) ran at "
                f"{' and '.join(f'{r:.0f}' for r in bare_rps)} req/s before and after the routes "
                f"compared with it ({spread(bare_rps):.2f}x): ratios that differ by less than "
                "that are within the machine's own drift."
            )
    for processes in sorted({r.processes for r in results} - {1}):
        parts = []
        for name in ("bare", "get_job_304", "get_job"):
            one = [r.rps for r in results if r.name == name and r.processes == 1]
            many = [r.rps for r in results if r.name == name and r.processes == processes]
            if one and many:
                parts.append(f"{name} {statistics.fmean(many) / statistics.fmean(one):.2f}x")
        if parts:
            notes.append(
                f"{processes} API processes against 1, req/s: {', '.join(parts)} (on "
                f"{os.cpu_count()} CPUs that wrk and PostgreSQL share with uvicorn)."
            )
    lists = list_runs(results)
    if lists and a:
        page_ms = [execution_ms(page_plans[r.jobs]) for r in lists]
        count_ms = [execution_ms(count_plans[r.jobs]) for r in lists]
        indexed = [r.jobs for r in lists if reads_by_index(page_plans[r.jobs])]
        sizes = f"{lists[0].jobs:,} to {lists[-1].jobs:,} jobs"
        mid = find(results, "list_jobs", 1, jobs) or lists[-1]
        notes.append(
            f"The first page of 50 summaries is {mid.bytes_per_request / 1024:.0f} KiB and costs "
            f"{mid.cpu_ms_per_request:.1f} ms of API CPU ({mid.cpu_ms_per_request / a.cpu_ms_per_request:.1f}x "
            f"one job). From {sizes} its req/s vary {spread([r.rps for r in lists]):.2f}x; "
            f"in PostgreSQL the page statement takes {min(page_ms):.2f}-{max(page_ms):.2f} ms and "
            f"the bounded count {min(count_ms):.2f}-{max(count_ms):.2f} ms; the page is read "
            f"through an index at {len(indexed)} of {len(lists)} sizes."
        )
    churn = [r for r in results if r.sessions_per_1k > 10]
    if churn:
        worst = max(churn, key=lambda r: r.sessions_per_1k)
        notes.append(
            f"The API opened new PostgreSQL connections while under load: up to "
            f"{worst.sessions_per_1k:.0f} per 1,000 requests ({worst.name}, {worst.connections} "
            "connections): the pool keeps REID_DATABASE_POOL_SIZE connections (10) and closes "
            "the ones opened above that (max_overflow) after each use, so a concurrency above it "
            "connects again and again (a PostgreSQL backend forked per connection)."
        )
    sub, red = find(results, "submit_no_broker", 1), find(results, "submit_redis", 1)
    if sub and red:
        notes.append(
            f"Publishing to Redis after the commit adds "
            f"{red.cpu_ms_per_request - sub.cpu_ms_per_request:.1f} ms of API CPU per submission "
            f"({red.rps / sub.rps:.2f}x the rate without a broker)."
        )
    if any(not ok for line, ok in checks if line.startswith("ETag")):
        notes.append(
            "The ETag of the POST /v1/jobs response is not the one GET answers for the same "
            "unchanged job: a client keeping the creation ETag gets one full 200."
        )
    return notes


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"


def results_table(results: list[LoadResult]) -> list[str]:
    """Every run as a Markdown table row, with its ratios to the bare route."""
    rows = [
        "| run | API processes | jobs of the owner | req/s | req/s x bare | p50 ms | p99 ms | "
        "p99 x bare | server CPU ms/request | CPU x bare | bytes/response | new PostgreSQL "
        "connections / 1k requests | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        rps_x, p99_x = x_bare(results, res)
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(res.codes.items()))
        jobs = f"{res.jobs:,}" if res.name != "bare" else "-"
        rows.append(
            f"| {res.name} | {res.processes} | {jobs} | {res.rps:.1f} | {rps_x:.2f} | "
            f"{res.p50_ms:.1f} | {res.p99_ms:.1f} | {p99_x:.2f} | {res.cpu_ms_per_request:.2f} | "
            f"{cpu_x_bare(results, res):.1f} | "
            f"{res.bytes_per_request:.0f} | {_number(res.sessions_per_1k)} | {codes} |"
        )
    return rows


def list_table(
    results: list[LoadResult], page_plans: dict[int, str], count_plans: dict[int, str]
) -> list[str]:
    """The first page by number of jobs: req/s, ratio, latency, statement times, page plan."""
    lists = list_runs(results)
    rows = [
        "| jobs of the owner | req/s | req/s x bare | p50 ms | p99 ms | count statement ms | "
        "page statement ms | page plan |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in lists:
        page = page_plans[res.jobs]
        rows.append(
            f"| {res.jobs:,} | {res.rps:.1f} | {x_bare(results, res)[0]:.2f} | "
            f"{res.p50_ms:.1f} | {res.p99_ms:.1f} | {execution_ms(count_plans[res.jobs]):.2f} | "
            f"{execution_ms(page):.2f} | {' > '.join(plan_nodes(page))} |"
        )
    rows += [
        "",
        f"max/min req/s over the sizes: {spread([r.rps for r in lists]):.2f} (flat: at most "
        f"{FLAT_MAX:g}); max/min p50: {spread([r.p50_ms for r in lists]):.2f}",
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return sorted({int(x.replace("_", "")) for x in text.split(",") if x.strip()})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pg-url", default=DEFAULT_PG_URL, help="maintenance database of the server")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of each GET run")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each")
    p.add_argument("--connections", type=int, default=8, help="connections of the GET runs")
    p.add_argument("--threads", type=int, default=1, help="wrk threads of the GET runs")
    p.add_argument(
        "--jobs", type=int, default=10_000, help="jobs of the owner for every run but the list's"
    )
    p.add_argument(
        "--list-sizes",
        type=_int_list,
        default=[1_000, 10_000, 100_000],
        help="jobs of the owner at which the list's first page is measured (comma-separated; "
        "--jobs is added)",
    )
    p.add_argument(
        "--api-workers",
        type=_int_list,
        default=[1, 2],
        help="API processes of the GET /v1/jobs/{id} runs (comma-separated, 1 included: the "
        "targets are for one process)",
    )
    p.add_argument("--burst", type=int, default=200, help="POST /v1/jobs requests per burst")
    p.add_argument("--burst-concurrency", type=int, default=8, help="connections of a burst")
    p.add_argument(
        "--note", default="", help="a line for the report (e.g. how quiet the machine was)"
    )
    p.add_argument("--output", type=Path, default=REPO_ROOT / "bench/results/api_load.md")
    args = p.parse_args(argv)
    if args.burst % args.burst_concurrency:
        p.error("--burst must be a multiple of --burst-concurrency (one quota per connection)")
    if 1 not in args.api_workers or min(args.api_workers) < 1:
        p.error(f"--api-workers {args.api_workers}: positive, with 1 (the targets' process)")
    if min(args.list_sizes, default=2) < 2:
        p.error(f"--list-sizes {args.list_sizes}: at least 2 jobs (a template and a copy)")
    args.list_sizes = sorted({*args.list_sizes, args.jobs})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install -y wrk)")
    load = os.getloadavg()
    command = command_line("api_load.py", argv)
    transcript = Transcript()
    say = transcript.say

    say(f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs")
    from reid_core.data import generate_synthetic_market
    from service.core import migrate
    from service.core.api_keys import create_api_key
    from service.core.db import make_session_factory, session_scope

    t_start = time.perf_counter()
    results: list[LoadResult] = []
    page_plans: dict[int, str] = {}
    count_plans: dict[int, str] = {}
    running_plans: dict[str, str] = {}
    checks: list[tuple[str, bool]] = []

    def check(line: str, ok: bool) -> None:
        checks.append((line, ok))
        say(line)

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="api_load_")))
        db_url = stack.enter_context(postgres_database(args.pg_url, "reid_bench_api"))
        t0 = time.perf_counter()
        migrate.upgrade(db_url)
        say(f"fresh PostgreSQL database migrated to head in {time.perf_counter() - t0:.1f} s")
        engine = create_engine(db_url)
        stack.callback(engine.dispose)
        with session_scope(make_session_factory(engine)) as session:
            _, key = create_api_key(session, OWNER, name="bench")
        roots = tmp / "roots"
        data = generate_synthetic_market(
            roots / "synthetic", num_identities=8, images_per_identity=4, height=96, width=48
        )
        queue = f"bench{uuid.uuid4().hex[:8]}"
        common = {
            "DATABASE_URL": db_url,
            "DATA_DIR": str(tmp / "var"),
            "DATASET_ROOTS": json.dumps([str(roots)]),
            "QUEUES": json.dumps(["default", queue]),
            "JOB_BOUNDS__MAX_GPUS": "0",
        }
        no_broker = clean_env(**common, WORKER__ENQUEUE_ON_SUBMIT="false")
        headers = {"X-API-Key": key}
        api = stack.enter_context(api_server(tmp, no_broker))
        bare = stack.enter_context(api_server(tmp, clean_env(), BARE_APP))
        say(f"API on {api.base}, bare route on {bare.base}/bare (1 uvicorn process each)")

        def answered(res: LoadResult, status: str) -> None:
            """Every answer of ``res`` had ``status``; else a failed check (the figures of a run
            that answered errors are not the route's)."""
            errors = {k: v for k, v in res.errors.items() if v and k != "status"}
            if set(res.codes) != {status} or errors:
                check(
                    f"{res.name} [{res.processes} process(es), {res.jobs} jobs]: answers "
                    f"{res.codes}, socket errors {errors}, expected only {status}",
                    False,
                )

        def measure(
            name: str, server: Api, path: str, hdrs: dict[str, str], jobs: int, status: str = "200"
        ) -> None:
            """``--warmup`` s of wrk, then ``--duration`` s measured; every answer ``status``."""
            script = write_lua(tmp, f"{name}_{server.workers}p", method="GET", headers=hdrs)
            wrk: dict[str, Any] = {"threads": args.threads, "connections": args.connections}
            url = server.base + path
            run_wrk(name, url, script, server.proc.pid, duration_s=args.warmup, **wrk)
            sessions = pg_sessions(engine)
            res = run_wrk(name, url, script, server.proc.pid, duration_s=args.duration, **wrk)
            res.processes, res.jobs = server.workers, jobs
            if name != "bare" and sessions >= 0:
                res.extra["pg_sessions"] = pg_sessions(engine) - sessions
            results.append(res)
            rps_x, p99_x = x_bare(results, res)
            ratio = f"  x bare: {rps_x:.2f} req/s, {p99_x:.2f} p99, " if rps_x == rps_x else ""
            ratio += f"{cpu_x_bare(results, res):.1f} CPU" if ratio else ""
            say(res.line() + ratio)
            answered(res, status)

        def burst(name: str, server: Api, dataset_id: str, tag: str, jobs: int) -> LoadResult:
            """``--burst`` POSTs over ``--burst-concurrency`` connections, each with its own
            key, as idempotency key and as ``config.name``."""
            marker = "@KEY@"
            body = {
                "dataset_id": dataset_id,
                "config": {**TINY_JOB, "name": marker},
                "gpus": 0,
                "queue": queue,
                "idempotency_key": marker,
            }
            script = write_lua(
                tmp,
                name,
                method="POST",
                headers={**headers, "Content-Type": "application/json"},
                quota=args.burst // args.burst_concurrency,
                keyed_body=(json.dumps(body).split(marker), tag),
            )
            sessions = pg_sessions(engine)
            res = run_wrk(
                name,
                server.base + "/v1/jobs",
                script,
                server.proc.pid,
                threads=args.burst_concurrency,
                connections=args.burst_concurrency,
                duration_s=300,
                quota_threads=args.burst_concurrency,
            )
            res.processes, res.jobs = server.workers, jobs
            if sessions >= 0:
                res.extra["pg_sessions"] = pg_sessions(engine) - sessions
            results.append(res)
            rps_x, p99_x = x_bare(results, res)
            cpu_x = cpu_x_bare(results, res)
            say(res.line() + f"  x bare: {rps_x:.2f} req/s, {p99_x:.2f} p99, {cpu_x:.1f} CPU")
            answered(res, "201")
            return res

        status, dataset, _ = http_json(
            "POST", api.base + "/v1/datasets", key, {"name": "synthetic", "path": str(data)}
        )
        assert status == 201, dataset
        new_job = {"dataset_id": dataset["id"], "config": TINY_JOB, "gpus": 0, "queue": queue}
        status, job, job_headers = http_json("POST", api.base + "/v1/jobs", key, new_job)
        assert status == 201, job
        job_path = f"/v1/jobs/{job['id']}"
        etags = [header(job_headers, "etag")]
        for _ in range(2):
            status, _, get_headers = http_json("GET", api.base + job_path, key)
            assert status == 200
            etags.append(header(get_headers, "etag"))
        etag = etags[-1]
        check(
            f"ETag of the unchanged job: POST {etags[0]}, GET {etags[1]}, GET {etags[2]}: "
            + (
                "all equal"
                if len(set(etags)) == 1
                else "the POST response's ETag differs from GET's"
                if etags[1] == etags[2]
                else "GET's ETag is not stable"
            ),
            len(set(etags)) == 1,
        )

        for size in args.list_sizes:
            # ---- the owner's jobs grow to `size`; the first page at each size ----------------
            have = owner_jobs(engine, OWNER)
            if size > have:
                seconds = bulk_insert_jobs(engine, job["id"], size - have, start=have)
                say(
                    f"bulk insert: {size - have:,} jobs in {seconds:.2f} s (one INSERT ... SELECT "
                    f"over generate_series, then ANALYZE): {size:,} jobs of the key's owner"
                )
            else:
                say(f"{have:,} jobs of the key's owner already (not {size:,})")
            measure("list_jobs", api, "/v1/jobs?limit=50", headers, size)
            plans = list_plans(engine, OWNER)
            count_plans[size], page_plans[size] = plans["count"], plans["page"]
            say(f"page plan at {size:,} jobs: {' > '.join(plan_nodes(plans['page']))}")
            if size != args.jobs:
                continue

            # ---- at --jobs: one job, the filtered list, the bursts, more API processes --------
            measure("bare", bare, "/bare", {}, 0)
            measure("get_job", api, job_path, headers, size)
            measure("get_job_304", api, job_path, {**headers, "If-None-Match": etag}, size, "304")
            measure("list_jobs_running", api, "/v1/jobs?state=RUNNING&limit=50", headers, size)
            running_plans = list_plans(engine, OWNER, ["RUNNING"])
            measure("bare", bare, "/bare", {}, 0)  # again: how much the machine moved meanwhile

            tag = f"burst-{uuid.uuid4().hex[:6]}"
            res = burst("submit_no_broker", api, dataset["id"], tag, size)
            total, distinct, _ = count_jobs(engine, tag)
            check(
                f"no broker: {args.burst} POSTs -> {total} jobs ({distinct} distinct keys), "
                f"{res.codes.get('201', 0)} answered 201",
                total == distinct == res.requests == args.burst,
            )
            with (
                redis_server(tmp) as broker,
                api_server(tmp, clean_env(**common, WORKER__BROKER_URL=broker)) as api_redis,
            ):
                # As many POSTs at once as the burst's connections: the first publish connects
                # to Redis, and the pool opens the database connections the burst will use.
                with ThreadPoolExecutor(max_workers=args.burst_concurrency) as warming:
                    warm = list(
                        warming.map(
                            lambda _: http_json("POST", api_redis.base + "/v1/jobs", key, new_job),
                            range(args.burst_concurrency),
                        )
                    )
                assert all(w[0] == 201 for w in warm), warm
                before = redis_messages(broker, f"{queue}.cpu")
                tag = f"burst-{uuid.uuid4().hex[:6]}"
                res = burst("submit_redis", api_redis, dataset["id"], tag, size)
                total, distinct, sent = count_jobs(engine, tag)
                messages = redis_messages(broker, f"{queue}.cpu") - before
                check(
                    f"Redis broker: {args.burst} POSTs -> {total} jobs ({distinct} distinct "
                    f"keys, {sent} recorded as sent), {messages} messages in Redis",
                    total == distinct == sent == messages == res.requests == args.burst,
                )

            deleted = delete_newer_jobs(engine, job["id"])
            say(f"{deleted} jobs of the bursts deleted: {owner_jobs(engine, OWNER):,} jobs again")

            for workers in args.api_workers:
                if workers == 1:
                    continue
                with (
                    api_server(tmp, no_broker, workers=workers) as api_n,
                    api_server(tmp, clean_env(), BARE_APP, workers=workers) as bare_n,
                ):
                    say(f"{workers} uvicorn processes each: API on {api_n.base}, bare route")
                    measure("bare", bare_n, "/bare", {}, 0)
                    measure("get_job", api_n, job_path, headers, size)
                    if_none_match = {**headers, "If-None-Match": etag}
                    measure("get_job_304", api_n, job_path, if_none_match, size, "304")
                    measure("bare", bare_n, "/bare", {}, 0)

    minutes = (time.perf_counter() - t_start) / 60
    say(f"run took {minutes:.1f} minutes")
    end = os.getloadavg()
    say(f"load average at the end {end[0]:.2f} / {end[1]:.2f} / {end[2]:.2f}")
    notes = findings(results, args.jobs, page_plans, count_plans, checks)
    for note in notes:
        say(f"note: {note}")
    target_rows = check_targets(results, args.jobs, page_plans, checks)
    for label, value, verdict in target_rows:
        say(f"target {label}: {value} {verdict}")

    md = ["# API load", "", f"Command: `{command}`", ""]
    if args.note:
        md += [args.note, ""]
    md += [
        "uvicorn (no access log) on 127.0.0.1, PostgreSQL (a fresh database migrated with "
        "`service.core.migrate.upgrade`), loaded by wrk from a second process with a generated "
        f"Lua script. GET runs: {args.threads} wrk thread, {args.connections} connections, "
        f"{args.warmup:g} s warm-up then {args.duration:g} s. Bursts: {args.burst} POSTs over "
        f"{args.burst_concurrency} connections (one wrk thread each, stopped at its quota), every "
        "request with its own idempotency key; throughput = requests / (first request to last "
        "answer). p50/p99 are wrk's latencies. Server CPU is uvicorn's processes' user + system "
        "time. `x bare`: the run's req/s (p99) over the bare route's (`bench/bare_app.py`: a "
        "fixed 3.3 KB JSON body, no work), served by the same uvicorn command with as many "
        f"processes in the same run. Jobs of the key's owner: {args.jobs:,} unless the row says "
        "(bulk-inserted copies of one submitted job: 10% RUNNING, 80% SUCCEEDED).",
        "",
        "## Machine",
        "",
        *table(("item", "value"), machine_rows(load)),
        "",
        "## Results",
        "",
        *results_table(results),
        "",
        "## The list's first page by number of jobs",
        "",
        *list_table(results, page_plans, count_plans),
        "",
        "## Checks",
        "",
        *[f"- {line}: {'OK' if ok else 'MISMATCH'}" for line, ok in checks],
        "",
        "## Findings",
        "",
        *[f"- {n}" for n in notes],
        "",
        "## Targets (one API process)",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
        *[f"| {label} | {value} | {verdict} |" for label, value, verdict in target_rows],
        "",
        "## Query plans of GET /v1/jobs?limit=50",
        "",
    ]
    explained = [
        *((f"{s:,} jobs", {"count": count_plans[s], "page": page_plans[s]}) for s in page_plans),
        (f"state=RUNNING, {args.jobs:,} jobs", running_plans),
    ]
    for label, plans in explained:
        for kind, plan in plans.items():
            md += [f"{kind}, {label}:", "", "```", plan, "```", ""]
    write_report(args.output, md, transcript)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
