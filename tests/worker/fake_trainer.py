"""A stand-in for ``python -m reid_core.train`` in the supervisor's unit tests (no torch).

Reads ``--config`` (the job's YAML) and its ``fake`` section: ``exit_codes`` (one per attempt,
the last repeats; a negative one: killed by that signal), ``steps``, ``step_s``, ``error`` (a line logged before a non-zero exit) and
``ignore_sigterm``. Writes ``progress.json`` (:class:`reid_core.run_dir.Progress`) and, on SIGTERM, a
``checkpoints/step_*.pt`` before exiting 75.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import yaml

from reid_core.run_dir import Progress, RunDir, RunStatus


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    fake = cfg.get("fake", {})
    out = Path(cfg["runtime"]["output_dir"])
    attempts_file = out / "attempts"
    attempt = int(attempts_file.read_text()) if attempts_file.exists() else 0
    attempts_file.write_text(str(attempt + 1))
    codes = fake.get("exit_codes", [0])
    code = codes[min(attempt, len(codes) - 1)]
    steps = int(fake.get("steps", 3))
    print(f"attempt {attempt + 1} resume={cfg.get('checkpoint', {}).get('resume')}", flush=True)
    step = 0

    def write(status: RunStatus) -> None:
        progress = Progress(
            status=status,
            epoch=step // 2,
            epochs=(steps + 1) // 2,
            step_in_epoch=step % 2,
            steps_per_epoch=2,
            global_step=step,
            progress=step / steps,
            losses={"total": 1.0 / (step + 1)},
            metrics={"mAP": 10.0 * step},
            images_per_second=100.0,
            eta_seconds=float(steps - step),
        )
        RunDir(out).write_progress(progress)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        if fake.get("ignore_sigterm"):
            print("SIGTERM ignored", flush=True)
            return
        RunDir(out).checkpoints.mkdir(exist_ok=True)
        (RunDir(out).checkpoints / f"step_{step:08d}.pt").write_bytes(b"checkpoint")
        write("interrupted")
        print("interrupted: checkpoint saved", flush=True)
        sys.exit(75)

    signal.signal(signal.SIGTERM, on_term)
    write("running")
    while step < steps:
        time.sleep(float(fake.get("step_s", 0.02)))
        step += 1
        write("running")
    if code < 0:  # killed by that signal, as the OOM killer kills (SIGKILL)
        os.kill(os.getpid(), -int(code))
    if code != 0:
        error = fake.get("error", "something broke")
        print(f"2026-01-01 00:00:00,000 ERROR [rank0] reid_core.train: {error}", flush=True)
        print("a last line that is not the error", flush=True)
        return int(code)
    write("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
