"""A job's training process: ``python -m worker.train_job --config <output_dir>/job_config.yaml``.

:func:`reid_core.train.run` with the job's MLflow tracking added: when ``tracking.json`` (written
by the supervisor, see :mod:`worker.tracking`) lies next to the config, an
:class:`worker.mlflow_hook.MLflowHook` joins the trainer's hooks. Same exit codes, signals and
outputs as ``python -m reid_core.train``; works under torchrun (the hook acts on rank 0 only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from reid_core.config import ConfigError, load_config
from reid_core.engine.exit_codes import ExitCode, exit_process
from reid_core.engine.trainer import HookBase
from reid_core.train import run
from service.core.folders import JobDir
from worker.tracking import TrackingSpec


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.train_job", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="the job's resolved config")
    parser.add_argument(
        "--tracking",
        type=Path,
        default=None,
        help=f"tracking spec (default: {JobDir.tracking_spec} next to the config, when present)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.BAD_CONFIG)
    spec_path = args.tracking or JobDir(args.config.parent).tracking_spec
    hooks: list[HookBase] = []
    if spec_path.is_file():
        from worker.mlflow_hook import MLflowHook

        hooks.append(MLflowHook(TrackingSpec.read(spec_path), cfg.runtime.output_dir))
    return int(run(cfg, hooks))


if __name__ == "__main__":
    exit_process(main())
