"""The arithmetic of bench/label_free.py (and bench/signal_agreement.py, which
bench/cluster_signals.py shares): Spearman's rank correlation of each label-free signal with mAP
over hand-made runs, pooled and within each run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import bench.label_free as label_free_bench
from bench.signal_agreement import spearman


def write_run(folder: Path, lines: list[dict[str, float]]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def evaluated(
    epoch: int, map_: float, mutual: float, margin: float, stability: float | None
) -> dict[str, float]:
    line = {
        "epoch": epoch,
        "eval/mAP": map_,
        "label_free/mutual_nn_rate": mutual,
        "label_free/similarity_margin": margin,
    }
    if stability is not None:
        line["label_free/neighbour_stability"] = stability
    if epoch:
        line["loss/total"] = 1.0 / epoch
    return line


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    a = write_run(
        tmp_path / "a",
        [
            evaluated(0, 2.0, 0.10, 0.30, None),  # before training: no stability
            evaluated(1, 5.0, 0.20, 0.20, 0.5),
            evaluated(2, 7.0, 0.30, 0.25, 0.7),
            evaluated(3, 9.0, 0.40, 0.10, 0.6),
        ],
    )
    b = write_run(
        tmp_path / "b",
        [
            evaluated(0, 1.0, 0.05, 0.40, None),
            {"epoch": 1, "loss/total": 2.0},  # not evaluated: no model to rank
            evaluated(2, 3.0, 0.15, 0.35, 0.4),
            evaluated(3, 4.0, 0.12, 0.30, 0.45),
        ],
    )
    return [a, b]


def test_every_evaluated_model_is_a_point(runs: list[Path]) -> None:
    a, b = (label_free_bench.points(run) for run in runs)
    assert [m for _, m in a] == [2.0, 5.0, 7.0, 9.0] and [m for _, m in b] == [1.0, 3.0, 4.0]
    assert a[0][0] == {"mutual_nn_rate": 0.10, "similarity_margin": 0.30}
    assert a[1][0]["neighbour_stability"] == 0.5


def test_spearman_pooled_and_within_runs(runs: list[Path]) -> None:
    """By hand (ranks of the signal against ranks of mAP):

    run a: mutual 1 2 3 4 vs 1 2 3 4 -> +1; margin 4 2 3 1 -> 1 - 6*18/(4*15) = -0.8;
           stability (3 models) 1 3 2 vs 1 2 3 -> 1 - 6*2/(3*8) = +0.5
    run b: mutual 1 3 2 -> +0.5; margin 3 2 1 -> -1; stability: 2 models, none
    pooled: mutual, 7 models: d = 0 0 1 -1 0 0 0 -> 1 - 6*2/(7*48) = +0.96;
            stability, 5 models: 1 2 3 5 4 vs 1 2 3 4 5 -> 1 - 6*2/(5*24) = +0.90
    """
    a, b = (label_free_bench.points(run) for run in runs)
    assert spearman(a, "mutual_nn_rate") == pytest.approx(1.0)
    assert spearman(a, "similarity_margin") == pytest.approx(-0.8)
    assert spearman(a, "neighbour_stability") == pytest.approx(0.5)
    assert spearman(b, "mutual_nn_rate") == pytest.approx(0.5)
    assert math.isnan(spearman(b, "neighbour_stability"))  # 2 models rank nothing
    assert spearman(a + b, "mutual_nn_rate") == pytest.approx(1 - 12 / 336)
    assert spearman(a + b, "neighbour_stability") == pytest.approx(0.9)
    text = label_free_bench.report(runs, "python bench/label_free.py a b")
    assert "7 evaluated models from 2 runs" in text
    assert "| mutual_nn_rate | 7 | +0.96 | +0.75 | 0.05 - 0.4 |" in text
    assert "| similarity_margin | 7 | " in text and "| -0.90 | 0.1 - 0.4 |" in text
    assert "| neighbour_stability | 5 | +0.90 | +0.50 | 0.4 - 0.7 |" in text
    assert f"| `{runs[0]}` | 4 | +1.00 | -0.80 | +0.50 |" in text
    assert f"| `{runs[1]}` | 3 | +0.50 | -1.00 | - |" in text


def test_a_constant_signal_or_map_ranks_nothing() -> None:
    flat = [({"s": 1.0}, 1.0), ({"s": 1.0}, 2.0), ({"s": 1.0}, 3.0)]
    assert math.isnan(spearman(flat, "s"))
    assert math.isnan(spearman([({"s": float(i)}, 5.0) for i in range(4)], "s"))


def test_the_report_is_written_only_when_asked(
    runs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    default = tmp_path / "results" / "label_free.md"
    monkeypatch.setattr(label_free_bench, "DEFAULT_OUTPUT", default)
    label_free_bench.main([str(run) for run in runs])
    assert "| mutual_nn_rate | 7 |" in capsys.readouterr().out
    assert not default.exists()
    label_free_bench.main([*map(str, runs), "--output"])
    assert "| mutual_nn_rate | 7 |" in default.read_text()
    named = tmp_path / "elsewhere.md"
    label_free_bench.main([*map(str, runs), "--output", str(named)])
    assert named.read_text().startswith("# Label-free signals against the true mAP")


def test_runs_without_both_signals_and_map_are_refused(tmp_path: Path) -> None:
    unlabelled = write_run(tmp_path / "u", [{"epoch": 0, "label_free/mutual_nn_rate": 0.1}])
    with pytest.raises(SystemExit, match="no run has an evaluation with both eval/mAP"):
        label_free_bench.report([unlabelled], "python bench/label_free.py u")
