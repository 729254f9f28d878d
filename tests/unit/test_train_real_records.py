"""bench/train_real.py ``--records``: a finished run is kept with a fingerprint of what it
trained, taken back only while that fingerprint holds, and named with its machine in the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from bench import train_real


def _result(name: str, seed: int, map_: float) -> dict[str, Any]:
    scores = {"mAP": map_, "r1": 1.0, "r5": 2.0, "r10": 3.0, "mINP": 0.5}
    return {
        "variant": f"{name} (seed {seed})",
        "name": name,
        "seed": seed,
        "minutes": 20.5,
        "epochs": 4,
        "initial": {**scores, "mAP": 1.5},
        "final": scores,
        "curve": [[2, map_ - 1], [4, map_]],
        "images_per_second": 60.0,
        "memory": {},
        "camera_centred": {},
    }


def test_a_kept_run_comes_back_only_for_the_same_fingerprint(tmp_path: Path) -> None:
    config = tmp_path / "preset.yaml"
    config.write_text("schedule: {epochs: 4}\n")
    data = tmp_path / "cuhk03-pair1"
    expected = train_real.fingerprint(config, data, ["loss.gsl.enabled=false", "seed=0"])
    record = tmp_path / "records" / "global-seed0.json"
    train_real.save_record(record, _result("global", 0, 9.5), expected)

    kept = train_real.load_record(record, expected)
    assert kept is not None
    assert kept["final"]["mAP"] == 9.5 and kept["curve"] == [[2, 8.5], [4, 9.5]]
    assert kept["recorded"]["machine"] == train_real.machine()
    stored = json.loads(record.read_text())
    assert "recorded" not in stored["result"] and stored["fingerprint"] == expected

    # another seed, another override, another config text or another data folder: trained again
    for other in (
        train_real.fingerprint(config, data, ["loss.gsl.enabled=false", "seed=1"]),
        train_real.fingerprint(config, data, ["seed=0"]),
        train_real.fingerprint(
            config, tmp_path / "market1501", ["loss.gsl.enabled=false", "seed=0"]
        ),
    ):
        assert other != expected
        assert train_real.load_record(record, other) is None
    config.write_text("schedule: {epochs: 5}\n")
    changed = train_real.fingerprint(config, data, ["loss.gsl.enabled=false", "seed=0"])
    assert changed != expected and train_real.load_record(record, changed) is None
    assert train_real.load_record(tmp_path / "records" / "none-seed0.json", expected) is None

    # a record of another format (this script's overrides or result fields changed)
    config.write_text("schedule: {epochs: 4}\n")
    assert train_real.load_record(record, expected) is not None
    record.write_text(json.dumps({**stored, "format": train_real.RECORD_FORMAT + 1}))
    assert train_real.load_record(record, expected) is None


def test_the_report_names_where_kept_runs_trained(tmp_path: Path) -> None:
    fresh = _result("global", 0, 9.5)
    kept = {
        **_result("global", 1, 8.5),
        "recorded": {"machine": "CPU X, 2 cores", "date": "2026-12-05 18:00"},
    }
    args = argparse.Namespace(
        data=tmp_path / "cuhk03-pair1", config=tmp_path / "preset.yaml", overrides=[]
    )
    text = train_real.report([fresh, kept], args)
    assert "| global | 0, 1 | 20.5 | 9.00 | 8.50 - 9.50 |" in text
    assert "- global (seed 1): 2026-12-05 18:00 UTC on CPU X, 2 cores" in text
    assert "global (seed 0): 2026-" not in text


def test_kept_only_reports_the_kept_runs_and_names_the_others(
    tmp_path: Path, monkeypatch: Any
) -> None:
    data = tmp_path / "cuhk03-pair1"
    data.mkdir()
    records = tmp_path / "records"
    config = train_real.VARIANT_CONFIGS.get("global", train_real.preset_path("cuhk03_cpu"))
    expected = train_real.fingerprint(
        config.resolve(), data.resolve(), [*train_real.VARIANTS["global"], "seed=1"]
    )
    train_real.save_record(records / "global-seed1.json", _result("global", 1, 8.5), expected)

    def no_training(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("--kept-only trained a run")

    monkeypatch.setattr(train_real, "run_variant", no_training)
    monkeypatch.setattr(train_real, "colour_reference", lambda _data: None)
    output = tmp_path / "report.md"
    argv = ["train_real.py", "--data", str(data), "--records", str(records), "--kept-only"]
    argv += ["--variants", "global,both", "--seeds", "0,1", "--output", str(output)]
    monkeypatch.setattr("sys.argv", argv)
    train_real.main()

    text = output.read_text()
    assert "| global | 1 | 20.5 | 8.50 | 8.50 - 8.50 |" in text
    assert "Not trained yet: global (seed 0), both (seed 0), both (seed 1)." in text

    monkeypatch.setattr("sys.argv", [a for a in argv if a not in ("--records", str(records))])
    with pytest.raises(SystemExit, match="--records"):
        train_real.main()
