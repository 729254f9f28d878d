"""Diagnose a training run's memories against the hidden train labels (analysis only).

Training never reads identity labels; this script does, after the fact, to say whether the
neighbour-based terms have anything credible to pull together. For the last checkpoint of a run
(``runtime.output_dir``) it prints, for the global memory M and the patch memory m (patches
concatenated):

* ``p@1`` / ``p@10``: share of the 1 / 10 nearest memory slots (j != i) with the same identity
  (chance ~ 1/743 on cuhk03-pair1); ``xcam p@10``: the same among other-camera slots only;
* ``credible``: for the GSL rule of the run's config (S_ij >= t, top-k, mutual), the mean size of
  C_i, the share of images with a non-empty C_i, and the precision of the pairs in C_i;
* ``cos``: mean pairwise cosine of the memory rows (1.0 = collapsed features).

    python bench/diag_memory.py outputs/cuhk03_cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_core.config import load_config  # noqa: E402
from reid_core.data import build_splits, scan_images  # noqa: E402
from reid_core.objective.losses.memory_classifier import credible_neighbours  # noqa: E402


def neighbour_stats(
    bank: torch.Tensor, pids: torch.Tensor, cams: torch.Tensor, k: int = 10
) -> dict[str, float]:
    """p@1, p@10, cross-camera p@10 and mean pairwise cosine of the rows of ``bank`` (N, d)."""
    x = F.normalize(bank.float(), dim=1)
    n = x.shape[0]
    hits1 = hits_k = hits_x = 0.0
    cos_sum = 0.0
    for start in range(0, n, 1024):
        rows = torch.arange(start, min(n, start + 1024))
        s = x[rows] @ x.T
        cos_sum += float(s.sum() - s[torch.arange(len(rows)), rows].sum())
        s[torch.arange(len(rows)), rows] = float("-inf")
        top = s.topk(k, dim=1).indices
        same = pids[top] == pids[rows, None]
        hits1 += float(same[:, 0].sum())
        hits_k += float(same.float().mean(dim=1).sum())
        sx = s.masked_fill(cams[None, :] == cams[rows, None], float("-inf"))
        topx = sx.topk(k, dim=1).indices
        hits_x += float((pids[topx] == pids[rows, None]).float().mean(dim=1).sum())
    return {
        "p@1": 100 * hits1 / n,
        f"p@{k}": 100 * hits_k / n,
        f"xcam p@{k}": 100 * hits_x / n,
        "cos": cos_sum / (n * (n - 1)),
    }


def credible_stats(
    bank: torch.Tensor, pids: torch.Tensor, threshold: float, topk: int, mutual: bool
) -> dict[str, float]:
    """Size, coverage and precision of the GSL credible sets C_i over every image."""
    mem = F.normalize(bank.float(), dim=1)
    n = mem.shape[0]
    size = covered = correct = 0.0
    for start in range(0, n, 512):
        idx = torch.arange(start, min(n, start + 512))
        mask = credible_neighbours(mem, idx, threshold, topk, mutual)
        count = mask.sum(dim=1)
        size += float(count.sum())
        covered += float((count > 0).sum())
        correct += float((mask & (pids[None, :] == pids[idx, None])).sum())
    return {
        "|C|": size / n,
        "covered %": 100 * covered / n,
        "precision %": 100 * correct / max(1.0, size),
    }


def diagnose(run_dir: Path, checkpoint: Path | None = None) -> dict[str, dict[str, float]]:
    """``{"global": stats, "patch": stats}`` for the memories a run's checkpoint holds."""
    cfg = load_config(run_dir / "config.yaml")
    if checkpoint is None:
        tag = run_dir / "checkpoints" / "last_checkpoint"
        checkpoint = run_dir / "checkpoints" / tag.read_text().strip()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["objective"]
    train, _ = scan_images(build_splits(cfg.data).train, 1.0)
    pids = torch.tensor([r.pid for r in train])
    cams = torch.tensor([r.camid for r in train])
    out: dict[str, dict[str, float]] = {}
    if "global_memory.bank" in state:
        bank = state["global_memory.bank"]
        g = cfg.loss.gsl
        out["global"] = neighbour_stats(bank, pids, cams) | credible_stats(
            bank, pids, g.threshold, g.topk, g.mutual
        )
    if "patch_memory.bank" in state:
        out["patch"] = neighbour_stats(state["patch_memory.bank"].flatten(1), pids, cams)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="runtime.output_dir of a training run")
    p.add_argument("--checkpoint", type=Path, help="default: the run's last checkpoint")
    args = p.parse_args()
    for kind, stats in diagnose(args.run_dir, args.checkpoint).items():
        print(f"{kind} memory: " + ", ".join(f"{k}={v:.3f}" for k, v in stats.items()))


if __name__ == "__main__":
    main()
