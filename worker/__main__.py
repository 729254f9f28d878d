"""``python -m worker``: run | dispatcher.

::

    python -m worker run --queues cpu --gpus none      # a CPU worker
    python -m worker run --queues gpu1 --gpus 0        # one worker per GPU set, pinned
    python -m worker run --queues gpu2 --gpus 2,3
    python -m worker dispatcher                        # re-send lost jobs, reap dead workers
    python -m worker dispatcher --once

Settings come from ``REID_*`` variables (``REID_DATABASE_URL``, ``REID_WORKER__BROKER_URL``, ...),
the same as the API's.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from collections.abc import Sequence
from types import FrameType

from service.core.db import make_engine, make_session_factory
from service.core.settings import get_settings

log = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Workers of the re-ID training service. Settings: REID_* variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="start a solo-pool Celery worker (one job at a time)")
    r.add_argument(
        "--gpus",
        default=None,
        help="the devices its trainers see (CUDA_VISIBLE_DEVICES), e.g. 0 or 0,1; 'none' for "
        "a CPU worker; default: REID_WORKER__GPUS, else inherited",
    )
    r.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues (cpu, gpu1, gpu2, ...); default: cpu without GPUs, "
        "gpu<N> with N GPUs",
    )
    r.add_argument("--hostname", default=None, help="worker name (default: reid-<queues>@<host>)")
    r.add_argument("--loglevel", default=None, help="default: REID_LOG_LEVEL")

    d = sub.add_parser("dispatcher", help="re-send lost jobs and reap dead workers' jobs")
    d.add_argument("--once", action="store_true", help="one pass, then exit")
    d.add_argument("--interval", type=float, default=None, help="seconds between passes")
    return parser


def _normalise_gpus(value: str) -> str:
    if value.strip().lower() in ("", "none", "cpu", "-1"):
        return ""
    devices = [d.strip() for d in value.split(",") if d.strip()]
    return ",".join(devices)


def _run_worker(args: argparse.Namespace) -> int:
    if args.gpus is not None:
        gpus = _normalise_gpus(args.gpus)
        # Read by the settings (the supervisor pins its trainers) and by anything in this process.
        os.environ["REID_WORKER__GPUS"] = gpus
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        get_settings.cache_clear()
    settings = get_settings()
    pinned = settings.worker.gpus
    if args.queues:
        queues = args.queues
    else:
        count = len([d for d in (pinned or "").split(",") if d.strip()])
        queues = f"gpu{count}" if count else "cpu"
    from worker.celery_app import worker_app

    app = worker_app(settings)
    hostname = args.hostname or f"reid-{queues.replace(',', '-')}@{socket.gethostname()}"
    argv = [
        "worker",
        "--pool",
        "solo",  # never prefork: the supervisor's children run torch, the task none
        "--concurrency",
        "1",
        "--queues",
        queues,
        "--hostname",
        hostname,
        "--loglevel",
        (args.loglevel or settings.log_level).upper(),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    log.info("worker %s on queues %s, CUDA_VISIBLE_DEVICES=%r", hostname, queues, pinned)
    app.worker_main(argv)
    return 0


def _run_dispatcher(args: argparse.Namespace) -> int:
    from worker.dispatcher import Dispatcher

    settings = get_settings()
    if args.interval is not None:
        settings.worker.dispatcher_interval_s = args.interval
    factory = make_session_factory(make_engine(settings.database_url))
    dispatcher = Dispatcher(settings, factory)
    if args.once:
        report = dispatcher.run_once()
        print(f"reaped {len(report.reaped)} job(s), re-sent {len(report.requeued)} waiting job(s)")
        return 0
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        log.info("dispatcher stopping (%s)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    dispatcher.run_forever(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "run":
        return _run_worker(args)
    return _run_dispatcher(args)


if __name__ == "__main__":
    raise SystemExit(main())
