"""How well the label-free clustering signals follow the true mAP (analysis; labels only here).

Every clustering of a ``loss.objective=cluster_contrast`` run writes label-free signals
(``cluster/*`` in ``metrics.jsonl``: clusters, outlier share, mean size, largest share, adjusted
Rand against the previous labels). The clustering at the start of epoch ``e + 1`` reads the model
that was evaluated at the end of epoch ``e``, so each signal of record ``e + 1`` is paired with
``eval/mAP`` of record ``e``; record 0, the evaluation before training (``eval.at_start``), pairs
the initial model with the first clustering, made from that model too. Over every such pair of
the runs given, the tables show Spearman's rank correlation of each signal with mAP, pooled and
within each run (a signal that only tracks the epoch count agrees within runs and may not across
them; ``bench/signal_agreement.py``).

    python bench/cluster_signals.py outputs/bench_train_real/cc_intra outputs/seed1/cc_intra
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the root is not
    sys.path.insert(0, str(ROOT))

from bench.signal_agreement import Point, agreement_tables  # noqa: E402

SIGNALS = ("clusters", "outlier_fraction", "mean_size", "largest_fraction", "adjusted_rand")


def pairs(run: Path) -> list[Point]:
    """(signals of the clustering made from a model, that model's mAP) for one run folder."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_epoch = {r["epoch"]: r for r in records}
    out = []
    for epoch, record in sorted(by_epoch.items()):
        following = by_epoch.get(epoch + 1)
        if "eval/mAP" not in record or following is None or "cluster/clusters" not in following:
            continue
        signals = {s: following[f"cluster/{s}"] for s in SIGNALS if f"cluster/{s}" in following}
        out.append((signals, float(record["eval/mAP"])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "cluster_signals.md")
    args = p.parse_args()
    per_run = {str(run): pairs(run) for run in args.runs}
    pooled = [x for points in per_run.values() for x in points]
    if not pooled:
        raise SystemExit("no run has an evaluation followed by a clustering from its model")
    lines = [
        "# Label-free clustering signals against the true mAP",
        "",
        f"`python bench/cluster_signals.py {' '.join(sys.argv[1:])}`",
        "",
        f"{len(pooled)} (clustering, evaluated model) pairs from {len(per_run)} runs: "
        + ", ".join(f"`{run}` ({len(points)})" for run, points in per_run.items())
        + ". Spearman's rank correlation with mAP, pooled and the mean within runs:",
        "",
        *agreement_tables(per_run, SIGNALS),
    ]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
