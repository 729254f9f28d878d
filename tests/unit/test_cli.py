"""The ``reid`` command's options, without a trained model (the integration tests have one)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import reid_core.cli
import reid_core.evaluation
import reid_core.model_io
from reid_core.cli import main
from reid_core.config import ExperimentConfig
from reid_core.data import ImageRecord
from reid_core.engine.exit_codes import ExitCode


class _FakeModel:
    def to(self, device: torch.device) -> _FakeModel:
        return self


@pytest.mark.parametrize(
    ("config_value", "flag", "want"),
    [
        (True, [], True),
        (False, [], False),
        (True, ["--no-camera-centred"], False),
        (False, ["--camera-centred"], True),
    ],
)
def test_eval_camera_centred_flag_overrides_the_config_both_ways(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    config_value: bool,
    flag: list[str],
    want: bool,
) -> None:
    cfg = ExperimentConfig.model_validate({"eval": {"camera_centred": config_value}})
    records = [ImageRecord(tmp_path / f"{i}.jpg", pid=i % 2, camid=i % 2) for i in range(4)]
    splits = SimpleNamespace(has_eval=True, query=records[:2], gallery=records[2:])
    seen: dict[str, Any] = {}

    def evaluate_features(*args: Any, **kwargs: Any) -> SimpleNamespace:
        seen.update(kwargs)
        return SimpleNamespace(as_dict=lambda percent: {"mAP": 0.0})

    monkeypatch.setattr(reid_core.model_io, "load_model", lambda path: (_FakeModel(), cfg))
    monkeypatch.setattr(reid_core.cli, "build_dataset", lambda name, root: splits)
    monkeypatch.setattr(reid_core.cli, "EvalSet", lambda records, *a, **k: list(records))
    monkeypatch.setattr(reid_core.evaluation, "extract_features", lambda *a, **k: torch.zeros(2, 4))
    monkeypatch.setattr(reid_core.evaluation, "evaluate_features", evaluate_features)
    argv = ["eval", "--checkpoint", str(tmp_path / "m.pt"), "--device", "cpu"]
    assert main([*argv, "--data", f"market_folder:{tmp_path}", *flag]) == ExitCode.OK
    assert seen["camera_centred"] is want


def test_train_takes_a_preset_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import reid_core.train

    ran: list[ExperimentConfig] = []
    monkeypatch.setattr(reid_core.train, "run", lambda cfg: ran.append(cfg) or ExitCode.OK)
    assert main(["train", "--preset", "smoke", "--set", "schedule.epochs=1"]) == ExitCode.OK
    assert (ran[0].name, ran[0].schedule.epochs) == ("smoke", 1)


def test_train_with_an_unknown_preset_lists_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "smoek"]) == ExitCode.BAD_CONFIG
    assert "unknown preset 'smoek'; the presets are: " in capsys.readouterr().err
