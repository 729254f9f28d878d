"""Training throughput (images/s) of the method's step, against references measured in the same run.

Images are random tensors (no decoding), so this measures the network, the losses and the memory
updates, not the data pipeline. One "image" is one training image, i.e. both of its views.

References, same run, same shapes:
  * trunk only: a plain forward/backward of the backbone on the two views (what any CNN training
    would pay); the ratio says what the method's heads, losses and memories add;
  * the method's step in fp32 against the fast precision of the device (the ratio is the
    speed-up): on CUDA float16 AMP + channels_last, on the CPU bfloat16 autocast + channels_last
    (``runtime.cpu_bf16``; fast where the CPU has AMX or AVX512-BF16).

    python bench/train_throughput.py                         # ResNet-50, 256x128, batch 32
    python bench/train_throughput.py --backbone resnet18 --height 128 --width 64 --batch 64
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_core.config import ExperimentConfig, load_config  # noqa: E402
from reid_core.data.samplers import EpochShuffleSampler  # noqa: E402
from reid_core.engine.trainer import Precision, Trainer  # noqa: E402
from reid_core.objective.dual_branch import DualBranchObjective  # noqa: E402
from reid_core.train import build_model, build_optimizer, build_scheduler  # noqa: E402


def make_trainer(cfg: ExperimentConfig, num_images: int, device: torch.device) -> Trainer:
    model = Precision.for_device(cfg.runtime, device).prepare(build_model(cfg).to(device))
    objective = DualBranchObjective(cfg, num_images, model).to(device)
    with torch.no_grad():  # memories as after initialisation: random unit vectors
        for mem in (objective.global_memory, objective.patch_memory, objective.agents):
            if mem is not None:
                mem.set(torch.arange(num_images), torch.randn(num_images, *mem.feature_shape))
    optimizer = build_optimizer(cfg, model)
    sampler = EpochShuffleSampler(num_images, cfg.data.batch_size)
    return Trainer(
        cfg, model, objective, optimizer, build_scheduler(cfg, optimizer), [], sampler, device
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(cfg: ExperimentConfig, device: torch.device, steps: int, warmup: int) -> float:
    n = 4 * cfg.data.batch_size * (steps + warmup)
    trainer = make_trainer(cfg, n, device)
    trainer.state.epoch = cfg.loss.gsl.warmup_epochs  # GSL on, as in most of a run
    b, h, w = cfg.data.batch_size, cfg.data.height, cfg.data.width
    batches = [
        (torch.randn(b, 3, h, w), torch.randn(b, 3, h, w), torch.randperm(n)[:b]) for _ in range(2)
    ]
    for i in range(warmup):
        trainer.run_step(batches[i % 2])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        trainer.run_step(batches[i % 2])
    sync(device)
    return b * steps / (time.perf_counter() - start)


def time_trunk(cfg: ExperimentConfig, device: torch.device, steps: int, warmup: int) -> float:
    model = build_model(cfg).backbone.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    b, h, w = cfg.data.batch_size, cfg.data.height, cfg.data.width
    x = torch.randn(2 * b, 3, h, w, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        opt.zero_grad()
        model(x).mean().backward()
        opt.step()
    sync(device)
    return b * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "train_throughput.md"
    )
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = [
        f"model.backbone={args.backbone}",
        "model.pretrained=none",
        f"data.height={args.height}",
        f"data.width={args.width}",
        f"data.batch_size={args.batch}",
        *args.overrides,
    ]
    fp32 = load_config(
        overrides=[
            *base,
            "runtime.amp=false",
            "runtime.channels_last=false",
            "runtime.cpu_bf16=false",
        ]
    )
    rows: list[tuple[str, float]] = []
    trunk = time_trunk(fp32, device, args.steps, args.warmup)
    rows.append((f"trunk only, fp32 ({device.type})", trunk))
    method = time_method(fp32, device, args.steps, args.warmup)
    rows.append((f"full method step, fp32 ({device.type})", method))
    fast_name = "AMP float16 + channels_last" if cuda else "bfloat16 autocast + channels_last"
    fast = load_config(
        overrides=[*base, "runtime.amp=true", "runtime.channels_last=true", "runtime.cpu_bf16=true"]
    )
    fast_step = time_method(fast, device, args.steps, args.warmup)
    rows.append((f"full method step, {fast_name} ({device.type})", fast_step))

    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    lines = [
        "# Training throughput",
        "",
        f"`python bench/train_throughput.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"{args.backbone} at {args.height}x{args.width}, batch {args.batch} images (x2 views), "
        f"{args.steps} timed steps after {args.warmup} warm-up; device: {where}; torch {torch.__version__}",
        "",
        "| what | images/s |",
        "|---|---|",
        *[f"| {name} | {ips:.1f} |" for name, ips in rows],
        "",
        f"method / trunk-only: {method / trunk:.2f}x",
    ]
    lines.append(f"{fast_name} / fp32: {fast_step / method:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
