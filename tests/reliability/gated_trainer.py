"""A stand-in for the trainer (no torch) that trains until the test says stop.

Reads ``--config`` (the job's YAML): writes ``progress.json`` (:class:`reid_core.run_dir.Progress`) every
``fake.step_s`` seconds until the file ``<output_dir>/release`` appears, then a last one with
``status: finished`` and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from reid_core.run_dir import Progress, RunDir, RunStatus

RELEASE_FILE = "release"


def _write_progress(out: Path, step: int, status: RunStatus) -> None:
    progress = Progress(
        status=status,
        epoch=step // 10,
        epochs=100,
        step_in_epoch=step % 10,
        steps_per_epoch=10,
        global_step=step,
        progress=1.0 if status == "finished" else min(step / 1000, 0.99),
        losses={"total": 1.0 / (step + 1)},
    )
    RunDir(out).write_progress(progress)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, required=True)
    cfg = yaml.safe_load(parser.parse_args().config.read_text())
    out = Path(cfg["runtime"]["output_dir"])
    step_s = float(cfg.get("fake", {}).get("step_s", 0.05))
    step = 0
    _write_progress(out, step, "running")
    while not (out / RELEASE_FILE).exists():
        time.sleep(step_s)
        step += 1
        _write_progress(out, step, "running")
    _write_progress(out, step, "finished")
    print(f"finished after {step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
