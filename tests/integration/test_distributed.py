"""Two-process training on the CPU (torchrun, gloo): the entry point works, and the memories stay
identical on both ranks while holding what both ranks' shards contributed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from reid_core.config import ExperimentConfig
from reid_core.engine.checkpoint import Checkpointer
from reid_core.engine.exit_codes import ExitCode
from tests.integration.conftest import (
    IDENTITIES,
    IMAGES_PER_IDENTITY,
    free_port,
    subprocess_env,
    tiny_config,
    write_config,
)
from tests.integration.test_cluster_training import CLUSTER

pytestmark = pytest.mark.distributed

NUM_IMAGES = IDENTITIES * IMAGES_PER_IDENTITY

#: Trains through ``reid_core.train.run`` and saves what this rank holds at the end.
RANK_SCRIPT = """
import os, sys
from pathlib import Path

import torch

import reid_core.train as train

config, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = train.load_config(config)
built = []
build_trainer = train.build_trainer


def build_and_keep(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    built.append(trainer)
    return trainer


train.build_trainer = build_and_keep
code = train.run(cfg)
(trainer,) = built
sampler, state = trainer.sampler, trainer.state
indices = []  # what this rank trained on: the first steps_per_epoch batches of each epoch
for epoch in range(state.max_epochs):
    sampler.set_epoch(epoch)
    indices += sampler.indices()[: state.steps_per_epoch * cfg.data.batch_size]
model = trainer.model_without_ddp
torch.save(
    {
        "code": int(code),
        "world_size": int(os.environ["WORLD_SIZE"]),
        "indices": indices,
        "objective": trainer.objective.state_dict(),
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
    },
    out / f"rank{os.environ['RANK']}.pt",
)
sys.exit(int(code))
"""


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=300,
        check=False,
    )


def load_objective(output_dir: Path) -> dict[str, Any]:
    path = Checkpointer(output_dir / "checkpoints").last_checkpoint()
    assert path is not None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    objective: dict[str, Any] = payload["objective"]
    return objective


def assert_unit_rows(bank: torch.Tensor, filled: torch.Tensor, name: str) -> None:
    norms = bank[filled].norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), name


def test_torchrun_two_ranks_trains_and_saves(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(out, synthetic_root, epochs=2, steps=2)
    config = write_config(cfg, tmp_path / "tiny.yaml")
    result = torchrun(
        "-m",
        "reid_core.train",
        "--config",
        str(config),
        "--set",
        "distributed.backend=gloo",
        cwd=tmp_path,
    )
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    assert (out / "model_final.pt").is_file()
    log_text = (out / "train.log").read_text()
    # every image was embedded once, each rank taking its share
    assert f"memories initialised from {NUM_IMAGES} images (2 ranks)" in log_text

    objective = load_objective(out)
    memory, filled = objective["global_memory.bank"], objective["global_memory.filled"]
    assert memory.shape[0] == NUM_IMAGES
    assert bool(filled.all())
    assert_unit_rows(memory, filled, "global memory")
    patches = objective["patch_memory.bank"]
    assert_unit_rows(patches, objective["patch_memory.filled"], "patch memory")


def train_two_ranks(cfg: ExperimentConfig, tmp_path: Path) -> list[dict[str, Any]]:
    """Train ``cfg`` with torchrun on two ranks; what each rank held at the end."""
    config = write_config(cfg, tmp_path / "tiny.yaml")
    script = tmp_path / "rank_state.py"
    script.write_text(RANK_SCRIPT)
    result = torchrun(str(script), str(config), str(tmp_path), cwd=tmp_path)
    assert result.returncode == ExitCode.OK, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_memories_identical_on_both_ranks_and_fed_by_both(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """memory.init=zeros: a global-memory slot is written only by a training step, so its
    ``filled`` mask shows exactly which images the two ranks trained on together."""
    out = tmp_path / "run"
    cfg = tiny_config(
        out,
        synthetic_root,
        "memory.init=zeros",
        "distributed.backend=gloo",
        epochs=2,
        steps=1,
    )
    ranks = train_two_ranks(cfg, tmp_path)
    assert [s["code"] for s in ranks] == [0, 0]
    assert [s["world_size"] for s in ranks] == [2, 2]

    # the same memories, bit for bit, on both ranks ...
    a, b = ranks[0]["objective"], ranks[1]["objective"]
    assert set(a) == set(b)
    assert {"global_memory.bank", "patch_memory.bank", "agents.bank"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # ... and the same trained weights (DDP averages the gradients)
    pa, pb = ranks[0]["parameters"], ranks[1]["parameters"]
    assert set(pa) == set(pb)
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key
    # what rank 0 checkpointed is what both hold
    saved = load_objective(out)
    for key in a:
        assert torch.equal(saved[key], a[key]), key

    # both shards fed the global memory: the written slots are the union of both ranks' batches
    shards = [set(s["indices"]) for s in ranks]
    assert shards[0] and shards[1]
    assert len(ranks[0]["indices"]) == len(ranks[1]["indices"]) == 2 * cfg.data.batch_size
    filled = a["global_memory.filled"]
    written = set(torch.nonzero(filled).flatten().tolist())
    assert written == shards[0] | shards[1]
    assert not written <= shards[0] and not written <= shards[1]
    assert_unit_rows(a["global_memory.bank"], filled, "global memory")
    assert bool((a["global_memory.bank"][~filled] == 0).all())
    # patch memory and agents were initialised from every image (both ranks' shares)
    assert bool(a["patch_memory.filled"].all()) and bool(a["agents.filled"].all())


def test_cluster_contrast_labels_and_memories_identical_on_both_ranks(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """``loss.objective=cluster_contrast`` with camera proxies: rank 0 clusters, both ranks hold
    the same pseudo labels, centroids and proxies (updated from both ranks' batches) and
    weights; the ranks trained on different P x K batches."""
    out = tmp_path / "run"
    cfg = tiny_config(
        out,
        synthetic_root,
        "distributed.backend=gloo",
        *CLUSTER,
        epochs=2,
        steps=2,
    )
    ranks = train_two_ranks(cfg, tmp_path)
    a, b = ranks[0]["objective"], ranks[1]["objective"]
    assert {"clusters.labels", "clusters.memory.centroids", "clusters.proxies.proxies"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ranks[0]["parameters"]:
        assert torch.equal(ranks[0]["parameters"][key], ranks[1]["parameters"][key]), key
    assert bool((a["clusters.labels"] >= 0).any())
    assert ranks[0]["indices"] != ranks[1]["indices"]
    saved = load_objective(out)
    for key in a:
        assert torch.equal(saved[key], a[key]), key
