"""How well the label-free signals follow the true mAP (analysis; labels only here).

Every evaluation of a run with ``eval.label_free`` (the default) writes, beside ``eval/mAP``,
the signals of the same model that read no label (``label_free/*`` in ``metrics.jsonl``:
cross-camera mutual nearest neighbours, similarity margin, neighbour stability;
``reid_core/evaluation/label_free.py``). Each evaluated model of the runs given, the one before
training (epoch 0) included, is a point (its signals, its mAP); the tables show Spearman's rank
correlation of each signal with mAP over all of them pooled and within each run, with the
number of models (a signal that only tracks the epoch count agrees within runs and may not
across them). Printed; written to ``bench/results/label_free.md`` (or a file named) with
``--output``.

    python bench/label_free.py outputs/bench_train_real/cc_intra-seed0 outputs/bench_train_real/both-seed0
    python bench/label_free.py outputs/bench_train_real/* --output
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the root is not
    sys.path.insert(0, str(ROOT))

from bench.signal_agreement import Point, agreement_tables  # noqa: E402
from reid_core.evaluation.label_free import LabelFreeSignals  # noqa: E402
from reid_core.run_dir import RunDir  # noqa: E402

#: The signals, in the order of LabelFreeSignals.
SIGNALS = tuple(field.name for field in dataclasses.fields(LabelFreeSignals))
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "label_free.md"


def points(run: Path) -> list[Point]:
    """(label-free signals, mAP) of every model of one run folder evaluated with both."""
    out = []
    for record in RunDir(run).read_metrics():
        signals, evaluation = record.family("label_free"), record.evaluation()
        if signals and "mAP" in evaluation:
            out.append((signals, evaluation["mAP"]))
    return out


def report(runs: list[Path], command: str) -> str:
    per_run = {str(run): points(run) for run in runs}
    pooled = [point for run_points in per_run.values() for point in run_points]
    if not pooled:
        raise SystemExit(
            "no run has an evaluation with both eval/mAP and label_free/* in its metrics.jsonl "
            "(train with eval.label_free=true on data with a query/gallery split)"
        )
    lines = [
        "# Label-free signals against the true mAP",
        "",
        f"`{command}`",
        "",
        f"{len(pooled)} evaluated models from {len(per_run)} runs (every evaluation, the one "
        "before training included). Spearman's rank correlation of each signal with mAP, over "
        "all models pooled and the mean of the runs', then within each run (`-`: fewer than 3 "
        "models, or a constant):",
        "",
        *agreement_tables(per_run, SIGNALS),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    p.add_argument(
        "--output",
        type=Path,
        nargs="?",
        const=DEFAULT_OUTPUT,
        help=f"also write the report to this file (alone: {DEFAULT_OUTPUT})",
    )
    args = p.parse_args(argv)
    command = "python bench/label_free.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(args.runs, command)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
