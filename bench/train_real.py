"""Unsupervised training on real data, time-boxed on this machine: initial vs trained, and the ablation.

Each variant trains the same config (the preset ``cuhk03_cpu`` by default) from the same seed on
the train split without labels, then is evaluated on the query/gallery split (Market protocol):

    both         every loss term (the method)
    global       memory classifier + GSL only (the patch branch is not built; global feature)
    patch        PEDAL + IPFL only (no global losses; the global head stays at its initial state)
    instance     the memory classifier alone (L_E): plain instance discrimination, no neighbours
    cc_intra     loss.objective=cluster_contrast, the preset cuhk03_cc_cpu: clusters of each
                 camera, the camera proxies' intra-camera term
    cc_camera    the same config with clusters over both cameras, L_cc and CAP's inter-camera term
    cc_plain     cluster contrast without the camera proxies: clusters over both cameras, L_cc
    *_patch      a cluster-contrast variant with the patch branch (PEDAL + IPFL) beside it,
                 and last stride 1 (the patch generation module needs a feature map of 3x3)

The references in the same run: each variant's own initial model (evaluated before its first
step), and the descriptor that needs no training at all, camera-centred colour stripes
(``bench/diag_features.py hsv``). With ``--seeds 0,1`` every variant trains once per seed and
the summary gives the mean and spread.
After each variant, its final memories are checked against the hidden train labels
(``bench/diag_memory.py``: neighbour precision, credible-set precision, mean pairwise cosine); this is
analysis after the fact, training never reads the labels.
The data folder comes from ``--data`` or ``REID_BENCH_DATA``; nothing is copied.

    python bench/train_real.py --data ../shared/data/cuhk03-pair1
    python bench/train_real.py --data ... --variants both --set schedule.epochs=4
    python bench/train_real.py --data ... --variants cc_intra,cc_intra_patch --seeds 0,1

A table too long for one sitting is built across invocations with ``--records DIR``: each
finished run is kept there as ``<variant>-seed<k>.json`` (its result, the machine, the date and
a fingerprint of what it trained: reid_core's sources and presets, the config, the overrides, the
data folder's name), and a later invocation with the same arguments takes the runs whose
fingerprint still matches instead of training them again; a run whose fingerprint changed is
trained again. The report names each run's machine and date.

    python bench/train_real.py --data ... --records bench/results/train_real_runs \\
        --variants both,global,cc_plain,cc_plain_patch,cc_intra,cc_intra_patch --seeds 0,1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the root is not
    sys.path.insert(0, str(ROOT))

from reid_core.atomic_write import write_atomic  # noqa: E402
from reid_core.presets import preset_path  # noqa: E402
from reid_core.run_dir import RunDir  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "both": [],
    "global": ["loss.pedal.enabled=false", "loss.ipfl.enabled=false", "eval.feature=global"],
    "patch": ["loss.instance.enabled=false", "loss.gsl.enabled=false"],
    "instance": [
        # no term left to read a neighbour prior (the config refuses an unread one)
        "loss.prior.kind=none",
        "loss.gsl.enabled=false",
        "loss.pedal.enabled=false",
        "loss.ipfl.enabled=false",
        "eval.feature=global",
    ],
}


#: Variants that train another config than ``--config`` (the cluster-contrast objective).
VARIANT_CONFIGS: dict[str, Path] = {
    "cc_intra": preset_path("cuhk03_cc_cpu"),
    "cc_camera": preset_path("cuhk03_cc_cpu"),
    "cc_plain": preset_path("cuhk03_cc_cpu"),
}
VARIANTS.update(
    {
        # the preset cuhk03_cc_cpu: per-camera clusters, the intra-camera proxy term alone
        "cc_intra": [],
        # clusters over both cameras, L_cc + L_intra + 0.5 L_inter (CAP) from epoch 2
        "cc_camera": [
            "cluster.scope=global",
            "loss.cluster.weight=1.0",
            "loss.camera.inter_weight=0.5",
            "loss.camera.inter_from_epoch=2",
        ],
        # Cluster Contrast itself: clusters over both cameras, L_cc alone
        "cc_plain": [
            "cluster.scope=global",
            "loss.cluster.weight=1.0",
            "loss.camera.enabled=false",
        ],
    }
)
# The patch generation module needs a feature map of at least 3x3: last stride 1 (8x4 at 128x64,
# as the paper's preset has it) where the cluster-contrast preset has 2 (4x2).
PATCH_BRANCH = [
    "loss.pedal.enabled=true",
    "loss.ipfl.enabled=true",
    "eval.feature=concat",
    "model.last_stride=1",
]
for _name in ("cc_intra", "cc_camera", "cc_plain"):
    VARIANTS[f"{_name}_patch"] = [*VARIANTS[_name], *PATCH_BRANCH]
    VARIANT_CONFIGS[f"{_name}_patch"] = VARIANT_CONFIGS[_name]


DIAG_KEYS = ("p@1", "p@10", "xcam p@10", "cos", "|C|", "covered %", "precision %")


def run_variant(
    name: str, config: Path, data: Path, out: Path, overrides: list[str], seed: int
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "reid_core.train",
        "--config",
        str(config),
        "--set",
        f"data.root={data}",
        "--set",
        f"runtime.output_dir={out}",
        "--set",
        "checkpoint.resume=none",
        "--set",
        "eval.at_start=true",
        "--set",
        "runtime.progress_bar=false",
    ]
    for item in [*VARIANTS[name], f"runtime.seed={seed}", *overrides]:
        cmd += ["--set", item]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with (out / "stdout.log").open("w") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[{name}] training failed with exit code {code}; see {out}/train.log")
    return collect_variant(name, out, minutes=(time.perf_counter() - start) / 60, seed=seed)


def collect_variant(
    name: str, out: Path, minutes: float | None = None, seed: int | None = None
) -> dict[str, Any]:
    """The result of a finished run in ``out`` (``minutes``: wall-clock; default: from the log's
    first and last timestamps); ``seed``: the run's, named in its label."""
    if minutes is None:
        minutes = _log_minutes(out / "train.log")
    records = RunDir(out).read_metrics()
    epochs = [r for r in records if r.trained]  # not the evaluation before training (epoch 0)
    evaluated = [r for r in epochs if "mAP" in r.evaluation()]
    before = [r.evaluation() for r in records if not r.trained]
    # a run older than the epoch-0 line in metrics.jsonl has its initial evaluation in the log
    initial = before[0] if before else _initial_metrics(out / "train.log")
    speeds = [r.images_per_second for r in epochs if r.images_per_second is not None]
    result = {
        "variant": name if seed is None else f"{name} (seed {seed})",
        "name": name,
        "seed": seed,
        "minutes": minutes,
        "epochs": len(epochs),
        "initial": initial,
        "final": evaluated[-1].evaluation(),
        "curve": [(r.epoch, r.evaluation()["mAP"]) for r in evaluated],
        "images_per_second": sum(speeds) / len(speeds),
        "memory": diagnose_run(out),
        "camera_centred": camera_centred_metrics(out, initial),
    }
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def camera_centred_metrics(out: Path, logged_initial: dict[str, float]) -> dict[str, Any]:
    """mAP/R1 of the run's initial and final models with ``eval.camera_centred`` (each camera's
    mean feature removed). The initial model is rebuilt from the run's config and seed as the
    trainer built it; its plain mAP is checked against the one the run logged."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    from reid_core.config import load_config
    from reid_core.data import build_splits
    from reid_core.model_io import load_model
    from reid_core.train import (
        build_camera_calibration,
        build_evaluator,
        build_model,
        seed_everything,
    )

    cfg = load_config(out / "config.yaml")
    torch.set_num_threads(cfg.runtime.num_threads or torch.get_num_threads())
    splits = build_splits(cfg.data)
    seed_everything(cfg.runtime.seed, False)
    initial = build_model(cfg, splits.train).eval()
    if cfg.model.camera_norm:  # as the run's first evaluation saw it
        build_camera_calibration(cfg, splits.train, torch.device("cpu"))(initial)
    final, _ = load_model(out / "model_final.pt")
    result: dict[str, Any] = {}
    for centred in (False, True):
        cfg.eval.camera_centred = centred
        evaluate = build_evaluator(cfg, splits, torch.device("cpu"))
        key = "centred" if centred else "plain"
        result[key] = {"initial": evaluate(initial), "final": evaluate(final)}
    if cfg.model.camera_norm:  # what the camera statistics add: the same weights without them
        cfg.eval.camera_centred = False
        evaluate = build_evaluator(cfg, splits, torch.device("cpu"))
        result["ordinary"] = {
            "initial": evaluate(_WithoutCameras(initial)),
            "final": evaluate(_WithoutCameras(final)),
        }
    rebuilt = result["plain"]["initial"]["mAP"]
    result["initial_rebuilt_exactly"] = abs(rebuilt - logged_initial["mAP"]) < 5e-3
    if not result["initial_rebuilt_exactly"]:
        print(
            f"{out}: the rebuilt initial model has mAP {rebuilt:.2f}, the run logged "
            f"{logged_initial['mAP']:.2f}: its camera-centred figure is not the run's",
            flush=True,
        )
    return result


class _WithoutCameras:
    """A model with ``model.camera_norm`` evaluated with its ordinary BatchNorm statistics only
    (the cameras it is given are dropped)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.training = model.training

    def extract(self, images: Any, feature: str = "concat", cameras: Any = None) -> Any:
        return self.model.extract(images, feature)

    def eval(self) -> _WithoutCameras:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> _WithoutCameras:
        self.model.train(mode)
        return self


def diagnose_run(out: Path) -> dict[str, dict[str, float]]:
    """Label-based diagnostics of the run's final memories (see ``bench/diag_memory.py``)."""
    if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the root is not
        sys.path.insert(0, str(ROOT))
    from bench.diag_memory import diagnose

    try:
        return diagnose(out)
    except (OSError, KeyError, ValueError) as exc:
        print(f"memory diagnostics skipped for {out}: {exc}", flush=True)
        return {}


def _log_minutes(log_file: Path) -> float:
    from datetime import datetime

    stamps = [line[:23] for line in log_file.read_text().splitlines() if line[:4].isdigit()]
    first, last = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (stamps[0], stamps[-1]))
    return (last - first).total_seconds() / 60


def _initial_metrics(log_file: Path) -> dict[str, float]:
    for line in log_file.read_text().splitlines():
        if "initial model:" in line:
            pairs = line.split("initial model:", 1)[1].split()
            return {k: float(v) for k, v in (p.split("=") for p in pairs)}
    raise SystemExit(f"no initial evaluation in {log_file}")


def fingerprint(config: Path, data: Path, overrides: list[str]) -> str:
    """A digest of what a run trains: reid_core's Python sources and presets, ``config``, the
    overrides (the variant's and the invocation's) and the data folder's name."""
    digest = hashlib.sha256()
    sources = sorted(
        p for p in (ROOT / "reid_core").rglob("*") if p.suffix in (".py", ".yaml") and p.is_file()
    )
    for path in [*sources, config]:
        digest.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps([data.name, *overrides]).encode())
    return digest.hexdigest()


def machine() -> str:
    """The CPU's model name and core count (as the report names where a run trained)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


#: What a record holds and how its run was made (this script's fixed overrides in
#: :func:`run_variant`, the fields of :func:`collect_variant`'s result): one more when either
#: changes, so that older records are trained again rather than read wrongly.
RECORD_FORMAT = 1


def load_record(path: Path, expected: str) -> dict[str, Any] | None:
    """The result kept at ``path`` when its fingerprint is ``expected`` and its format this
    script's; None (and a line saying why) when there is none or it trained something else."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != expected or record.get("format", 1) != RECORD_FORMAT:
        print(f"{path}: recorded for other sources, config or overrides; trained again", flush=True)
        return None
    result: dict[str, Any] = record["result"]
    result["recorded"] = {"machine": record["machine"], "date": record["date"]}
    return result


def save_record(path: Path, result: dict[str, Any], expected: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": RECORD_FORMAT,
        "fingerprint": expected,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "result": {k: v for k, v in result.items() if k != "recorded"},
    }
    write_atomic(path, json.dumps(record, indent=1) + "\n")


def _initial_final_table(results: list[dict[str, Any]], key: str) -> list[str]:
    """Markdown rows of the initial and final metrics under ``result["camera_centred"][key]``."""
    lines = [
        "",
        "| variant | initial mAP | initial R1 | mAP | R1 | R5 | R10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        i, f = r["camera_centred"][key]["initial"], r["camera_centred"][key]["final"]
        lines.append(
            f"| {r['variant']} | {i['mAP']:.2f} | {i['r1']:.2f} | {f['mAP']:.2f} "
            f"| {f['r1']:.2f} | {f['r5']:.2f} | {f['r10']:.2f} |"
        )
    return lines


def colour_reference(data: Path) -> dict[str, dict[str, float]]:
    """mAP/R1 of the colour stripes (no training), plain and camera-centred, on ``data``'s
    query/gallery: the descriptor a trained model has to beat."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import numpy as np

    from reid_core.data import read_market_layout
    from reid_core.data.colour import stripe_colour_histograms
    from reid_core.evaluation import evaluate_features

    splits = read_market_layout(data)
    q, g = splits.query, splits.gallery
    qf = stripe_colour_histograms([r.path for r in q], stripes=4)
    gf = stripe_colour_histograms([r.path for r in g], stripes=4)
    columns = [np.array([getattr(r, a) for r in rs]) for a in ("pid", "camid") for rs in (q, g)]
    return {
        key: evaluate_features(qf, gf, *columns, camera_centred=centred).as_dict(percent=True)
        for key, centred in (("plain", False), ("centred", True))
    }


def _summary(results: list[dict[str, Any]], reference: dict[str, Any] | None) -> list[str]:
    """Rows of each variant's mean and spread over its seeds (plain and camera-centred mAP)."""
    names = list(dict.fromkeys(r.get("name", r["variant"]) for r in results))
    lines = [
        "| variant | seeds | minutes (mean) | mAP mean | mAP min - max | camera-centred mAP mean "
        "| x no-training reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        runs = [r for r in results if r.get("name", r["variant"]) == name]
        maps = [r["final"]["mAP"] for r in runs]
        centred = [
            r["camera_centred"]["centred"]["final"]["mAP"] for r in runs if r.get("camera_centred")
        ]
        mean = sum(maps) / len(maps)
        ratio = f"{mean / reference['centred']['mAP']:.2f}" if reference else "-"
        lines.append(
            f"| {name} | {', '.join(str(r.get('seed', '-')) for r in runs)} "
            f"| {sum(r['minutes'] for r in runs) / len(runs):.1f} | {mean:.2f} "
            f"| {min(maps):.2f} - {max(maps):.2f} "
            f"| {sum(centred) / len(centred) if centred else float('nan'):.2f} | {ratio} |"
        )
    return [*lines, ""]


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Unsupervised training on real data",
        "",
        f"`python bench/train_real.py {' '.join(sys.argv[1:])}`",
        "",
        f"Data: `{args.data.name}` (train split without labels; query/gallery, Market protocol). "
        f"Config: `{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}`"
        " (the cc_* variants: the preset `cuhk03_cc_cpu`)"
        + (f" with `{' '.join(args.overrides)}`" if args.overrides else "")
        + f". Machine: {machine()}, CPU only.",
        "",
    ]
    reference = getattr(args, "reference", None)
    if reference:
        lines += [
            "No training (`bench/diag_features.py hsv`, the same query/gallery): colour stripes "
            f"mAP {reference['plain']['mAP']:.2f} (R1 {reference['plain']['r1']:.2f}), "
            f"camera-centred **{reference['centred']['mAP']:.2f}** "
            f"(R1 {reference['centred']['r1']:.2f}).",
            "",
        ]
    lines += _summary(results, reference)
    missing = getattr(args, "missing", [])
    if missing:
        lines += [f"Not trained yet: {', '.join(missing)}.", ""]
    lines += [
        "| run | epochs | minutes | img/s | initial mAP | initial R1 | mAP | R1 | R5 | R10 | mINP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        i, f = r["initial"], r["final"]
        lines.append(
            f"| {r['variant']} | {r['epochs']} | {r['minutes']:.1f} | {r['images_per_second']:.0f} "
            f"| {i['mAP']:.2f} | {i['r1']:.2f} | {f['mAP']:.2f} | {f['r1']:.2f} | {f['r5']:.2f} "
            f"| {f['r10']:.2f} | {f['mINP']:.2f} |"
        )
    centred = [r for r in results if r.get("camera_centred")]
    if centred:
        lines += [
            "",
            "The same models with each camera's mean feature removed before the distances "
            "(`eval.camera_centred=true`, over query + gallery); the initial model is rebuilt "
            "from the run's config and seed (its plain mAP matches the logged one: "
            + ", ".join(
                f"{r['variant']} {'yes' if r['camera_centred']['initial_rebuilt_exactly'] else 'NO'}"
                for r in centred
            )
            + "):",
            *_initial_final_table(centred, "centred"),
        ]
    ordinary = [r for r in centred if r["camera_centred"].get("ordinary")]
    if ordinary:
        lines += [
            "",
            "The same models evaluated without their per-camera BatchNorm statistics "
            "(`model.camera_norm`: the ordinary running statistics for every image), plain:",
            *_initial_final_table(ordinary, "ordinary"),
        ]
    recorded = [r for r in results if r.get("recorded")]
    if recorded:
        lines += [
            "",
            "Runs taken from `--records` (trained by an earlier invocation of the same "
            "sources, config and overrides):",
            "",
            *(
                f"- {r['variant']}: {r['recorded']['date']} UTC on {r['recorded']['machine']}"
                for r in recorded
            ),
        ]
    lines += ["", "mAP during training (epoch: mAP):", ""]
    for r in results:
        curve = ", ".join(f"{e}: {m:.2f}" for e, m in r["curve"])
        lines.append(f"- {r['variant']}: {curve}")
    diag_rows = [
        (r["variant"], kind, stats) for r in results for kind, stats in r.get("memory", {}).items()
    ]
    if diag_rows:
        lines += [
            "",
            "Final memories against the hidden train labels (analysis only; chance p@10 ~0.13%): "
            "p@k = share of the k nearest memory slots with the same identity, xcam = among the "
            "other camera's slots, size of C / covered / prec = GSL credible sets (size, share of images "
            "with one, precision), cos = mean pairwise cosine.",
            "",
            "| variant | memory | p@1 % | p@10 % | xcam p@10 % | cos | size of C | covered % | prec % |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, kind, st in diag_rows:
            cells = [f"{st[k]:.2f}" if k in st else "-" for k in DIAG_KEYS]
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    by_name = {r.get("name", r["variant"]): r for r in reversed(results)}
    if "both" in by_name:
        b = by_name["both"]
        lines += [
            "",
            f"Trained vs initial (both): mAP x{b['final']['mAP'] / max(1e-9, b['initial']['mAP']):.2f}, "
            f"+{b['final']['mAP'] - b['initial']['mAP']:.2f} points; "
            f"R1 +{b['final']['r1'] - b['initial']['r1']:.2f} points.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data", type=Path, default=os.environ.get("REID_BENCH_DATA"), help="Market-layout folder"
    )
    p.add_argument("--config", type=Path, default=preset_path("cuhk03_cpu"))
    p.add_argument("--variants", default="both,global,patch")
    p.add_argument("--seeds", default="0", help="runtime.seed of each run, comma-separated")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: report the finished runs of --variants found in --work-dir",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="variants trained at once (each with runtime.num_threads=1 when > 1); the minutes "
        "column is then wall-clock under sharing",
    )
    p.add_argument(
        "--records",
        type=Path,
        help="keep each finished run's result here and take, instead of training it, a run "
        "already kept for the same sources, config and overrides",
    )
    p.add_argument(
        "--kept-only",
        action="store_true",
        help="with --records: train nothing; report the kept runs and name the ones not kept yet",
    )
    p.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "bench_train_real")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "train_real.md")
    args = p.parse_args()
    if args.kept_only and args.records is None:
        raise SystemExit("--kept-only reports the runs kept in --records: name that folder")
    if args.data is None or not Path(args.data).is_dir():
        raise SystemExit(f"--data (or REID_BENCH_DATA) must name a dataset folder, got {args.data}")
    args.data = Path(args.data).resolve()
    args.config = args.config.resolve()
    names = args.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    overrides = list(args.overrides)
    if args.jobs > 1:
        overrides.append("runtime.num_threads=1")
    args.reference = colour_reference(args.data)
    runs = [(name, seed) for name in names for seed in seeds]
    done: dict[tuple[str, int], dict[str, Any]] = {}

    def folder(name: str, seed: int) -> Path:
        return args.work_dir / f"{name}-seed{seed}"

    def write_report() -> None:
        # with --kept-only: the runs asked for that no record holds
        args.missing = [f"{n} (seed {k})" for n, k in runs if (n, k) not in done]
        text = report([done[r] for r in runs if r in done], args)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)

    def one(name: str, seed: int) -> None:
        config = VARIANT_CONFIGS.get(name, args.config)
        if args.records is not None:
            expected = fingerprint(config, args.data, [*VARIANTS[name], *overrides, f"seed={seed}"])
            record = args.records / f"{name}-seed{seed}.json"
            kept = load_record(record, expected)
            if kept is not None:
                print(f"[{name}] seed {seed}: kept in {record}", flush=True)
                done[name, seed] = kept
                return
            if args.kept_only:
                return
        done[name, seed] = run_variant(name, config, args.data, folder(name, seed), overrides, seed)
        if args.records is not None:
            save_record(record, done[name, seed], expected)
        write_report()  # after every run, in the order asked: partial results survive

    if args.collect:  # report runs already in --work-dir, train nothing
        for name, seed in runs:
            done[name, seed] = collect_variant(name, folder(name, seed), seed=seed)
        write_report()
        print(args.output.read_text())
        return
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(one, name, seed) for name, seed in runs]:
            future.result()
    write_report()
    print(args.output.read_text())


if __name__ == "__main__":
    main()
