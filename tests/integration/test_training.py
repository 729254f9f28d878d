"""End-to-end training on the tiny synthetic data set: outputs, resume determinism, SIGTERM,
exit codes for bad input, a full disk."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import reid_core.engine.checkpoint as checkpoint_module
import reid_core.engine.trainer as trainer_module
from reid_core.config import ExperimentConfig, dump_config, load_config
from reid_core.data import build_eval_loader, build_splits
from reid_core.engine.checkpoint import LAST_TAG, Checkpointer
from reid_core.engine.exit_codes import ExitCode
from reid_core.engine.hooks import EvaluationHook
from reid_core.engine.trainer import HookBase, Trainer
from reid_core.model_io import load_model
from reid_core.models.camera_norm import CameraBatchNorm
from reid_core.run_dir import RunDir
from reid_core.train import build_trainer, main, run, seed_everything
from tests.integration.conftest import (
    TrainedRun,
    capture_trainers,
    preserved_process_state,
    subprocess_env,
    tiny_config,
    write_config,
)

#: Per-epoch record fields that measure time, not training.
TIMING_KEYS = {"images_per_second", "epoch_seconds"}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


class StopAfterStep(HookBase):
    """Asks the trainer to stop once ``global_step`` reaches ``step`` (as SIGTERM would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self) -> None:
        if self.trainer.state.global_step == self.step:
            self.trainer.request_stop()


def build(cfg: ExperimentConfig) -> Trainer:
    """What ``run`` does before ``trainer.train()`` (seed, config.yaml, build + resume)."""
    seed_everything(cfg.runtime.seed, cfg.runtime.deterministic)
    dump_config(cfg, cfg.runtime.output_dir / "config.yaml")
    return build_trainer(cfg)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-for-bit equality of nested checkpoint data (tensors, arrays, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.shape} vs {b.shape}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else None
            raise AssertionError(f"{where}: tensors differ (max abs diff {diff})")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load_payload(path: Path) -> dict[str, Any]:
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    payload["trainer"]["history"] = without_timing(payload["trainer"]["history"])
    return payload


def assert_same_checkpoints(a: Path, b: Path) -> None:
    pa, pb = load_payload(a), load_payload(b)
    # most telling first: weights, memories, then the rest of the resumable state
    for key in ("model", "objective", "optimizer", "scheduler", "scaler", "trainer", "extra"):
        assert_same(pa[key], pb[key], key)
    assert set(pa) == set(pb)


def last_checkpoint(output_dir: Path) -> Path:
    path = Checkpointer(output_dir / "checkpoints").last_checkpoint()
    assert path is not None, f"no {LAST_TAG} in {output_dir / 'checkpoints'}"
    return path


def some_images(cfg: ExperimentConfig, n: int = 5) -> torch.Tensor:
    splits = build_splits(cfg.data)
    images, _ = next(iter(build_eval_loader(splits.query[:n], cfg.data, batch_size=n)))
    return images


# ----------------------------------------------------------------------------------------------
# a plain run
# ----------------------------------------------------------------------------------------------


def test_run_writes_every_output(trained_run: TrainedRun) -> None:
    cfg, out = trained_run.cfg, trained_run.output_dir
    epochs, steps = cfg.schedule.epochs, cfg.schedule.max_steps_per_epoch
    assert steps is not None
    assert trained_run.code == ExitCode.OK

    assert load_config(out / "config.yaml") == cfg
    assert "final model saved" in (out / "train.log").read_text()

    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "finished"
    assert progress["progress"] == 1.0
    assert progress["global_step"] == epochs * steps
    assert progress["epochs"] == epochs

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert [r["global_step"] for r in records] == [steps * (e + 1) for e in range(epochs)]
    for r in records:
        losses = {k for k in r if k.startswith("loss/")}
        assert {"loss/total", "loss/instance", "loss/gsl", "loss/pedal", "loss/ipfl"} <= losses
        assert all(np.isfinite(r[k]) for k in losses)
        assert {"eval/mAP", "eval/r1", "eval/r5", "eval/r10", "eval/mINP"} <= set(r)
        assert 0.0 <= r["eval/mAP"] <= 100.0
        assert {"lr/group0", "lr/group1"} <= set(r)
        assert {"label_free/mutual_nn_rate", "label_free/similarity_margin"} <= set(r)
    assert "label_free/neighbour_stability" in records[1]  # against epoch 1's neighbours
    # schedule.milestones=[1]: the second epoch runs at a tenth of the first's learning rate
    assert records[1]["lr/group1"] == pytest.approx(records[0]["lr/group1"] * cfg.schedule.gamma)

    ckpt = last_checkpoint(out)
    assert ckpt.name == f"epoch_{epochs:04d}.pt"
    assert (out / "checkpoints" / LAST_TAG).read_text().strip() == ckpt.name
    assert not list((out / "checkpoints").glob("*.tmp"))

    final = torch.load(trained_run.model_final, map_location="cpu", weights_only=True)
    assert final["metrics"]["epoch"] == epochs
    assert final["metrics"]["mAP"] == pytest.approx(records[-1]["eval/mAP"])


def test_run_folder_reads_through_its_models(trained_run: TrainedRun) -> None:
    run = RunDir(trained_run.output_dir)
    epochs = trained_run.cfg.schedule.epochs
    records = run.read_metrics()
    assert [r.epoch for r in records] == list(range(1, epochs + 1))
    # each line is the model's own JSON, and the trainer's history holds the same records
    assert run.metrics_file.read_text().splitlines() == [r.model_dump_json() for r in records]
    assert [r.model_dump() for r in records] == trained_run.trainer.state.history
    assert {"loss/total", "lr/group0", "eval/mAP", "images_per_second"} <= set(
        records[-1].metric_values()
    )
    progress = run.read_progress()
    assert progress is not None
    assert (progress.status, progress.epoch, progress.epochs) == ("finished", epochs, epochs)
    assert progress.metrics["mAP"] == records[-1].metric_values()["eval/mAP"]


def test_the_evaluation_before_training_is_the_first_metrics_line(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """eval.at_start: metrics.jsonl begins with epoch 0, the initial model's evaluation (and
    its label-free signals) and nothing else; a run stopped in its first epoch and resumed does
    not write it again, and compares its next label-free neighbours with those of epoch 0."""
    cfg = tiny_config(tmp_path / "run", synthetic_root, "eval.at_start=true", epochs=1)
    run = RunDir(cfg.runtime.output_dir)
    first = build(cfg)
    first.register_hooks([StopAfterStep(1)])  # in the middle of epoch 1
    assert first.train() == ExitCode.INTERRUPTED
    (before,) = run.read_metrics()
    evaluation = next(h for h in first.hooks if isinstance(h, EvaluationHook))
    assert (before.epoch, before.global_step, before.trained) == (0, 0, False)
    assert before.evaluation() == evaluation.initial_metrics
    assert {"eval/mAP", "eval/r1", "eval/r5", "eval/mINP"} <= set(before.metric_values())
    assert before.images_per_second is None and before.epoch_seconds is None
    assert first.state.history == [before.model_dump()]
    progress = run.read_progress()
    signals = {f"label_free/{k}": v for k, v in before.family("label_free").items()}
    assert set(signals) == {"label_free/mutual_nn_rate", "label_free/similarity_margin"}
    assert progress is not None
    assert progress.metrics == {"epoch": 0, **before.evaluation(), **signals}

    second = build(cfg)
    assert second.resumed
    assert second.train() == ExitCode.OK
    records = run.read_metrics()
    assert [r.epoch for r in records] == [0, 1]
    assert records[0] == before
    assert second.state.history == [r.model_dump() for r in records]
    assert {"loss/total", "lr/group0", "eval/mAP"} <= set(records[1].metric_values())
    # the neighbours of epoch 0 came back with the checkpoint
    assert 0.0 <= records[1].family("label_free")["neighbour_stability"] <= 1.0


def test_saved_model_and_checkpoint_reload_the_trained_weights(trained_run: TrainedRun) -> None:
    trained = trained_run.trainer.model_without_ddp.eval()
    images = some_images(trained_run.cfg)
    expected = trained.extract(images)
    expected_state = trained.state_dict()
    for path in (trained_run.model_final, last_checkpoint(trained_run.output_dir)):
        model, cfg = load_model(path)
        assert cfg == trained_run.cfg, path
        assert not model.training
        assert_same(model.state_dict(), expected_state, path.name)
        assert torch.equal(model.extract(images), expected), path


# ----------------------------------------------------------------------------------------------
# resume determinism
# ----------------------------------------------------------------------------------------------

EPOCHS, STEPS = 3, 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> TrainedRun:
    """Run A: 3 epochs x 3 steps through ``run``, never stopped."""
    cfg = tiny_config(
        tmp_path_factory.mktemp("resume") / "a", synthetic_root, epochs=EPOCHS, steps=STEPS
    )
    with preserved_process_state(), capture_trainers() as built:
        code = run(cfg)
    assert code == ExitCode.OK
    return TrainedRun(cfg=cfg, code=code, trainer=built[0])


def _stop_and_resume(
    cfg: ExperimentConfig, stop_at: int, check_resumed: Callable[[Trainer], None]
) -> Trainer:
    out = cfg.runtime.output_dir
    first = build(cfg)
    assert not first.resumed
    first.register_hooks([StopAfterStep(stop_at)])
    assert first.train() == ExitCode.INTERRUPTED

    ckpt = last_checkpoint(out)
    assert ckpt.name == f"step_{stop_at:08d}.pt"
    assert json.loads((out / "progress.json").read_text())["status"] == "interrupted"
    assert not (out / "model_final.pt").exists()

    second = build(cfg)
    assert second.resumed
    check_resumed(second)
    assert second.train() == ExitCode.OK
    return second


def _assert_same_run(a: TrainedRun, b: Trainer) -> None:
    out_a, out_b = a.output_dir, b.cfg.runtime.output_dir
    assert_same(b.model_without_ddp.state_dict(), a.trainer.model_without_ddp.state_dict(), "model")
    assert_same(b.objective.state_dict(), a.trainer.objective.state_dict(), "objective")
    assert_same_checkpoints(last_checkpoint(out_a), last_checkpoint(out_b))
    assert without_timing(read_jsonl(out_b / "metrics.jsonl")) == without_timing(
        read_jsonl(out_a / "metrics.jsonl")
    )


def test_resume_mid_epoch_ends_bit_identical(
    uninterrupted: TrainedRun, synthetic_root: Path, tmp_path: Path
) -> None:
    """Stopped after global step 4 (epoch 1, step 1 of 3) and resumed: same weights and memories
    as the uninterrupted run, to the bit."""
    cfg = tiny_config(tmp_path / "b", synthetic_root, epochs=EPOCHS, steps=STEPS)

    def resumed_at_epoch_1_step_1(trainer: Trainer) -> None:
        state = trainer.state
        assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 1, STEPS + 1)
        assert len(state.history) == 1

    resumed = _stop_and_resume(cfg, STEPS + 1, resumed_at_epoch_1_step_1)
    _assert_same_run(uninterrupted, resumed)


def test_resume_from_epoch_end_ends_bit_identical(
    uninterrupted: TrainedRun, synthetic_root: Path, tmp_path: Path
) -> None:
    """Stopped after global step 3, the last step of epoch 0, and resumed."""
    cfg = tiny_config(tmp_path / "b", synthetic_root, epochs=EPOCHS, steps=STEPS)

    def resumed_at_epoch_1_step_0(trainer: Trainer) -> None:
        state = trainer.state
        assert (state.epoch, state.step_in_epoch, state.global_step) == (1, 0, STEPS)

    resumed = _stop_and_resume(cfg, STEPS, resumed_at_epoch_1_step_0)
    _assert_same_run(uninterrupted, resumed)


def _train_stopping_at(cfg: ExperimentConfig, stop_at: int | None) -> Trainer:
    """A run to the end; with ``stop_at``, stopped after that global step and resumed."""
    trainer = build(cfg)
    if stop_at is not None:
        trainer.register_hooks([StopAfterStep(stop_at)])
        assert trainer.train() == ExitCode.INTERRUPTED
        trainer = build(cfg)
        assert trainer.resumed
    assert trainer.train() == ExitCode.OK
    return trainer


def test_resume_with_loader_workers_ends_bit_identical(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The same mid-epoch resume with one DataLoader worker process (the default is 4)."""
    a, b = (
        _train_stopping_at(
            tiny_config(
                tmp_path / name, synthetic_root, "data.num_workers=1", epochs=2, steps=STEPS
            ),
            stop_at,
        )
        for name, stop_at in (("a", None), ("b", STEPS + 1))
    )
    assert_same(b.model_without_ddp.state_dict(), a.model_without_ddp.state_dict(), "model")
    assert_same(b.objective.state_dict(), a.objective.state_dict(), "objective")


def test_camera_norm_run_trains_like_a_plain_run_and_saves_calibrated_cameras(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``model.camera_norm=true`` leaves training as it is (the same weights and ordinary
    statistics as a plain run, through a mid-epoch resume too); the per-camera statistics are
    estimated before each evaluation (once per step: not again for the final model), evaluation
    reads them, and ``model_final.pt`` loads with them."""
    plain = _train_stopping_at(tiny_config(tmp_path / "plain", synthetic_root, steps=STEPS), None)
    caplog.set_level(logging.INFO, logger="reid_core.engine.hooks")
    runs = {
        name: _train_stopping_at(
            tiny_config(tmp_path / name, synthetic_root, "model.camera_norm=true", steps=STEPS),
            stop_at,
        )
        for name, stop_at in (("a", None), ("b", STEPS + 1))
    }
    a = runs["a"]
    model = a.model_without_ddp
    assert_same(runs["b"].model_without_ddp.state_dict(), model.state_dict(), "resumed")
    ordinary = {k: v for k, v in model.state_dict().items() if "camera_" not in k}
    assert_same(ordinary, plain.model_without_ddp.state_dict(), "plain run")

    train_cameras = sorted({r.camid for r in build_splits(a.cfg.data).train})
    assert model.camera_ids is not None and model.camera_ids.tolist() == train_cameras
    norm = next(m for m in model.modules() if isinstance(m, CameraBatchNorm))
    assert (norm.camera_batches > 0).all()
    assert not torch.allclose(norm.camera_mean[0], norm.camera_mean[1])
    calibrations = [r for r in caplog.records if r.getMessage().startswith("camera statistics")]
    # run a: one per evaluation (after epochs 1 and 2), none more for the final model; run b
    # resumed in epoch 2: the same two (its first part calibrated after epoch 1)
    assert len(calibrations) == 2 + 2
    assert a.state.metrics["mAP"] != plain.state.metrics["mAP"]  # evaluation reads the cameras
    loaded, _ = load_model(a.cfg.runtime.output_dir / "model_final.pt")
    assert_same(loaded.state_dict(), model.state_dict(), "model_final.pt")


def test_per_camera_training_run_resumes_bit_identical_and_differs_from_plain_training(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """``model.camera_norm_train=true``: the training steps read each image's camera (the
    weights differ from a ``model.camera_norm`` run's), a mid-epoch resume ends like the
    uninterrupted run, and ``model_final.pt`` loads with the per-camera training flag."""
    test_only = _train_stopping_at(
        tiny_config(tmp_path / "test_only", synthetic_root, "model.camera_norm=true", steps=STEPS),
        None,
    )
    runs = {
        name: _train_stopping_at(
            tiny_config(
                tmp_path / name,
                synthetic_root,
                "model.camera_norm=true",
                "model.camera_norm_train=true",
                steps=STEPS,
            ),
            stop_at,
        )
        for name, stop_at in (("a", None), ("b", STEPS + 1))
    }
    model = runs["a"].model_without_ddp
    assert_same(runs["b"].model_without_ddp.state_dict(), model.state_dict(), "resumed")
    trained = model.state_dict()
    assert any(
        not torch.equal(value, trained[key])
        for key, value in test_only.model_without_ddp.state_dict().items()
        if key.endswith("weight")
    ), "per-camera training gave the same weights as training without cameras"
    loaded, cfg = load_model(runs["a"].cfg.runtime.output_dir / "model_final.pt")
    assert cfg.model.camera_norm_train and loaded.per_camera_training
    assert_same(loaded.state_dict(), model.state_dict(), "model_final.pt")


def test_colour_prior_run_resumes_in_and_after_the_prior_epochs_bit_identical(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """``loss.prior.kind=colour`` for epoch 0 (the memory warm-ups are 2 epochs): GSL and PEDAL
    are on in epoch 0 only, from the colour prior, which a resume recomputes while prior epochs are
    left (stop in epoch 0) and skips after them (stop in epoch 1); both end like the
    uninterrupted run, to the bit."""
    prior = (
        "loss.prior.kind=colour",
        "loss.prior.threshold=-1.0",
        "loss.gsl.prior_epochs=1",
        "loss.gsl.warmup_epochs=2",
        "loss.pedal.prior_epochs=1",
        "loss.pedal.warmup_epochs=2",
    )
    runs = {
        name: _train_stopping_at(
            tiny_config(tmp_path / name, synthetic_root, *prior, epochs=2, steps=STEPS), stop_at
        )
        for name, stop_at in (("a", None), ("in_prior", 2), ("after_prior", STEPS + 1))
    }
    a = runs["a"]
    for term in ("gsl", "pedal"):
        losses = [epoch[f"loss/{term}"] for epoch in a.state.history]
        assert losses[0] > 0.0 and losses[1] == 0.0, (term, losses)
    assert (a.objective.prior_neighbours >= 0).any()
    assert (a.objective.prior_patch_neighbours >= 0).all()
    # the run resumed after the prior epochs never computed the prior
    assert runs["after_prior"].objective.prior_neighbours.numel() == 0
    assert runs["after_prior"].objective.prior_patch_neighbours.numel() == 0
    for name in ("in_prior", "after_prior"):
        b = runs[name]
        assert_same(b.model_without_ddp.state_dict(), a.model_without_ddp.state_dict(), name)
        assert_same(b.objective.state_dict(), a.objective.state_dict(), name)


def test_cpu_bf16_run_steps_in_bfloat16_evaluates_in_float32_and_resumes_bit_identical(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``runtime.cpu_bf16``: training forwards run in bfloat16 autocast on channels_last weights,
    evaluation in float32; weights, memories and checkpoints stay float32, and a mid-epoch resume
    ends like the uninterrupted run, to the bit. On a CPU without native bfloat16 (pretended
    for the resumed part) a warning says so."""
    seen: list[tuple[bool, torch.dtype]] = []

    def record(module: torch.nn.Module, _: Any, output: torch.Tensor) -> None:
        seen.append((module.training, output.dtype))

    runs = {}
    # native bfloat16 until the resumed part, whatever this machine's CPU has
    monkeypatch.setattr(trainer_module, "_cpu_has_native_bf16", lambda: True)
    for name, stop_at in (("a", None), ("b", STEPS + 1)):
        cfg = tiny_config(tmp_path / name, synthetic_root, "runtime.cpu_bf16=true", steps=STEPS)
        trainer = build(cfg)
        trainer.model_without_ddp.backbone.register_forward_hook(record)
        if stop_at is not None:
            trainer.register_hooks([StopAfterStep(stop_at)])
            assert trainer.train() == ExitCode.INTERRUPTED
            monkeypatch.setattr(trainer_module, "_cpu_has_native_bf16", lambda: False)
            caplog.set_level(logging.WARNING, logger=trainer_module.__name__)
            trainer = build(cfg)
        assert trainer.train() == ExitCode.OK
        runs[name] = trainer
    messages = [r.getMessage() for r in caplog.records]
    assert sum("without AMX or AVX512-BF16" in m for m in messages) == 1, messages
    a = runs["a"]
    assert (True, torch.bfloat16) in seen and (False, torch.float32) in seen
    assert set(seen) == {(True, torch.bfloat16), (False, torch.float32)}
    conv = next(m for m in a.model_without_ddp.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in {**a.model_without_ddp.state_dict(), **a.objective.state_dict()}.items():
        assert not value.is_floating_point() or value.dtype == torch.float32, key
    assert_same(runs["b"].model_without_ddp.state_dict(), a.model_without_ddp.state_dict(), "model")
    assert_same(runs["b"].objective.state_dict(), a.objective.state_dict(), "objective")
    assert math.isfinite(a.state.metrics["mAP"])


# ----------------------------------------------------------------------------------------------
# SIGTERM in a real process
# ----------------------------------------------------------------------------------------------


def _wait_for_step(proc: subprocess.Popen[bytes], progress: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before its first step")
        try:
            step = int(json.loads(progress.read_text())["global_step"])
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 1:
            return step
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no training step within {timeout} s")


def test_sigterm_checkpoints_exits_75_and_resumes(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(out, synthetic_root, epochs=3, steps=4)
    config = write_config(cfg, tmp_path / "tiny.yaml")
    command = [sys.executable, "-m", "reid_core.train", "--config", str(config)]
    total = 3 * 4

    with (tmp_path / "first.log").open("wb") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path
        )
        try:
            _wait_for_step(proc, out / "progress.json", timeout=120)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    first_log = (tmp_path / "first.log").read_text()
    assert code == ExitCode.INTERRUPTED == 75, first_log
    assert "received SIGTERM" in first_log

    ckpt = last_checkpoint(out)
    assert ckpt.name.startswith("step_"), ckpt
    stopped_at = int(ckpt.stem.removeprefix("step_"))
    assert 1 <= stopped_at < total
    payload = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert payload["trainer"]["global_step"] == stopped_at
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "interrupted"
    assert progress["global_step"] == stopped_at
    assert not (out / "model_final.pt").exists()

    again = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert again.returncode == ExitCode.OK, again.stderr[-3000:]
    log_text = (out / "train.log").read_text()
    assert f"resumed from {ckpt}" in log_text
    progress = json.loads((out / "progress.json").read_text())
    assert (progress["status"], progress["global_step"]) == ("finished", total)
    assert (out / "model_final.pt").is_file()


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


def test_unknown_override_key_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--set", "loss.gls.threshold=0.5"]) == ExitCode.BAD_CONFIG == 2
    err = capsys.readouterr().err
    assert "loss.gls.threshold" in err
    assert "'gls'" in err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["--config", str(missing)]) == ExitCode.BAD_CONFIG
    assert str(missing) in capsys.readouterr().err


def test_missing_dataset_root_exits_3_naming_the_path(synthetic_root: Path, tmp_path: Path) -> None:
    nope = tmp_path / "nope"
    cfg = tiny_config(
        tmp_path / "run", synthetic_root, "data.dataset=market_folder", f"data.root={nope}"
    )
    config = write_config(cfg, tmp_path / "bad.yaml")
    assert main(["--config", str(config)]) == ExitCode.BAD_DATA == 3
    assert str(nope) in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "model_final.pt").exists()


def test_missing_imagenet_weights_exit_2_naming_the_path(
    synthetic_root: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "no-such-weights.pth"
    cfg = tiny_config(
        tmp_path / "run",
        synthetic_root,
        "model.pretrained=imagenet",
        f"model.weights_path={weights}",
    )
    config = write_config(cfg, tmp_path / "bad.yaml")
    assert main(["--config", str(config)]) == ExitCode.BAD_CONFIG == 2
    assert str(weights) in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------------------------
# full disk
# ----------------------------------------------------------------------------------------------


class _TorchWithSave:
    """``torch`` as seen by reid_core.engine.checkpoint, with ``save`` replaced."""

    def __init__(self, save: Callable[..., None]) -> None:
        self.save = save

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def test_full_disk_exits_4_and_keeps_the_previous_checkpoint(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(out, synthetic_root, epochs=2, steps=2)
    saved: list[Path] = []
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saved.append(Path(f.name))
        if len(saved) == 2:  # the disk fills up while the second checkpoint is written
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "torch", _TorchWithSave(save))
    code = run(cfg)

    assert code == ExitCode.NO_SPACE == 4
    assert len(saved) == 2
    ckpts = out / "checkpoints"
    assert (ckpts / LAST_TAG).read_text().strip() == "epoch_0001.pt"
    assert {p.name for p in ckpts.iterdir()} == {LAST_TAG, "epoch_0001.pt"}
    assert not (out / "model_final.pt").exists()
    log_text = (out / "train.log").read_text()
    assert "epoch_0002.pt" in log_text
    assert os.strerror(errno.ENOSPC) in log_text

    monkeypatch.undo()
    payload = torch.load(ckpts / "epoch_0001.pt", map_location="cpu", weights_only=False)
    assert payload["trainer"]["global_step"] == 2
    model, _ = load_model(ckpts / "epoch_0001.pt")
    assert_same(model.state_dict(), payload["model"], "model")
