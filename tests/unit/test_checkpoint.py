import random
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_core.engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    restore_rng_state,
)


def _objects() -> dict[str, object]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt}


def test_save_load_round_trip(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    objs = _objects()
    path = ckpt.save("epoch_0001", objs, {"note": 1})
    assert ckpt.last_checkpoint() == path
    fresh = _objects()
    extra = ckpt.load(path, fresh)
    assert extra == {"note": 1}
    assert torch.equal(fresh["model"].weight, objs["model"].weight)  # type: ignore[attr-defined]
    assert (
        fresh["optimizer"]
        .state_dict()["state"][0]["momentum_buffer"]
        .equal(  # type: ignore[attr-defined]
            objs["optimizer"].state_dict()["state"][0]["momentum_buffer"]  # type: ignore[attr-defined]
        )
    )


def test_keep_last_prunes_rolling_checkpoints(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for e in range(1, 5):
        ckpt.save(f"epoch_{e:04d}", _objects(), {})
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]


def test_failed_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpointer(tmp_path)
    good = ckpt.save("epoch_0001", _objects(), {"n": 1})

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left") as info:
        ckpt.save("epoch_0002", _objects(), {"n": 2})
    assert "epoch_0001.pt" in str(info.value)
    monkeypatch.undo()
    assert ckpt.last_checkpoint() == good
    assert not list(tmp_path.glob("*.tmp"))
    assert ckpt.load(good, _objects()) == {"n": 1}


def test_corrupt_or_missing_checkpoint_is_named(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="missing.pt"):
        ckpt.load(tmp_path / "missing.pt", _objects())
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        ckpt.load(bad, _objects())
    path = ckpt.save("x", {"model": torch.nn.Linear(3, 2)}, {})
    with pytest.raises(CheckpointError, match="no 'optimizer' state"):
        ckpt.load(path, _objects())


def test_rng_state_round_trip() -> None:
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
