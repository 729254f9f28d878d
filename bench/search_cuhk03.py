"""Acceptance check: gallery search through the service ranks as ``reid eval`` does.

With a model trained by the service on real data, the rank-1 accuracy of the query split computed
from ``POST /v1/galleries/{id}/search`` answers must equal the rank-1 that ``reid eval`` reports
for the same model (Market-1501 protocol). The whole path runs as a user would:

1. ``python -m service serve --with-worker`` (the embedded setup: SQLite, the SQLite broker, a
   SQLite MLflow store) in a fresh data folder, the dataset's parent as the dataset root, no GPU;
2. ``python -m service create-key --owner bench``; the dataset registered by its path;
3. a short training job with ``configs/cuhk03_cpu.yaml``'s settings as overrides; its model is
   registered as ``reid-bench`` version 1;
4. a gallery of the dataset (its ``bounding_box_test``) with that version, built by the worker;
5. every query image searched through the API with ``k`` = the whole gallery; rank-1 computed
   here, from the hits' file names alone: hits with the query's identity *and* camera are
   ignored, a query counts when some hit has its identity in another camera, and it is correct
   when its first remaining hit has its identity;
6. the version's weights downloaded from the API and evaluated with ``reid eval --checkpoint
   ... --data market_folder:<data>``; both figures printed and written to
   ``bench/results/search_cuhk03.md``. Exit code 1 when they differ.

The data folder comes from ``--data`` or ``REID_BENCH_DATA``; nothing is copied::

    python bench/search_cuhk03.py --data ../shared/data/cuhk03-pair1
    python bench/search_cuhk03.py --data ... --epochs 1 --max-steps-per-epoch 30   # quicker
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_core.data import parse_market_name  # noqa: E402
from service.job_config import flatten_overrides, service_owned_keys  # noqa: E402

MODEL_NAME = "reid-bench"
#: ``k`` the API allows (service/routers/galleries.py MAX_K).
MAX_K = 1000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _service_env(data_dir: Path, dataset_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env.update(
        {
            "REID_DATA_DIR": str(data_dir),
            "REID_DATASET_ROOTS": json.dumps([str(dataset_root)]),
            "REID_MLFLOW__MODEL_NAME": MODEL_NAME,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextlib.contextmanager
def embedded_service(work: Path, env: dict[str, str], port: int) -> Iterator[str]:
    """``python -m service serve --with-worker`` on ``port`` (log: ``work/service.log``), stopped
    (SIGTERM: it stops its worker and dispatcher) on exit; its base URL."""
    log = work / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--with-worker", "--worker-gpus", "none",
             "--port", str(port)],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _check(response: httpx.Response, *expected: int) -> Any:
    if response.status_code not in expected:
        raise SystemExit(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code}: {response.text[:2000]}"
        )
    return response.json() if response.content else None


def _wait(
    client: httpx.Client, url: str, final: set[str], timeout_s: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    shown = ""
    while True:
        body: dict[str, Any] = _check(client.get(url), 200)
        line = f"{what}: {body['state']} {100 * body['progress']:.0f}%"
        if line != shown:
            print(line, flush=True)
            shown = line
        if body["state"] in final:
            return body
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} still {body['state']} after {timeout_s:.0f} s")
        time.sleep(2)


def job_overrides(
    config: Path, epochs: int, max_steps: int | None, extra: list[str]
) -> dict[str, Any]:
    """``config``'s settings as job overrides, without the keys the service sets itself, then
    ``extra`` (``KEY=VALUE``, values read as YAML)."""
    raw = yaml.safe_load(config.read_text())
    owned = service_owned_keys() | {"runtime.progress_bar"}
    flat = {
        key: value
        for key, value in flatten_overrides(raw).items()
        if key not in owned and value is not None
    }
    flat["schedule.epochs"] = epochs
    flat["eval.every_n_epochs"] = epochs  # the job's own evaluation of its final model
    flat["eval.at_start"] = False
    if max_steps is not None:
        flat["schedule.max_steps_per_epoch"] = max_steps
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r} must be KEY=VALUE")
        flat[key.strip()] = yaml.safe_load(value)
    return flat


@dataclass
class Rank1:
    """Rank-1 of the query split from search hits (Market protocol)."""

    correct: int
    valid: int
    skipped: int

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.valid if self.valid else 0.0


def _labels(name: str) -> tuple[int, int]:
    parsed = parse_market_name(Path(name).name)
    if parsed is None:
        raise SystemExit(f"{name!r} is not named PPPP_cC...: cannot read its identity and camera")
    return parsed


def rank1_from_hits(results: dict[str, list[dict[str, Any]]]) -> Rank1:
    """``results``: query file name -> its hits, best first, over the whole gallery.

    Hits with the query's identity and camera are ignored; a query is valid when a hit has its
    identity in another camera; it is correct when its first remaining hit has its identity.
    """
    correct = valid = skipped = 0
    for query, hits in results.items():
        pid, cam = _labels(query)
        kept = [_labels(h["path"]) for h in hits]
        kept = [(p, c) for p, c in kept if not (p == pid and c == cam)]
        if not any(p == pid for p, _ in kept):
            skipped += 1
            continue
        valid += 1
        correct += kept[0][0] == pid
    return Rank1(correct, valid, skipped)


def reid_eval(checkpoint: Path, data: Path) -> dict[str, float]:
    """``reid eval --checkpoint <it> --data market_folder:<data>`` on the CPU; its metrics (%)."""
    command = [
        sys.executable, "-m", "reid_core.cli", "eval", "--checkpoint", str(checkpoint),
        "--data", f"market_folder:{data}", "--device", "cpu",
    ]  # fmt: skip
    print(" ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"reid eval failed ({done.returncode}):\n{done.stderr[-3000:]}")
    metrics: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return metrics


def report(facts: dict[str, Any]) -> str:
    same = facts["equal"]
    lines = [
        "# Search through the service vs `reid eval` (CUHK03, camera pair 1)",
        "",
        f"`python bench/search_cuhk03.py {' '.join(sys.argv[1:])}`",
        "",
        f"Data: `{facts['data_name']}` ({facts['query_images']} query images, "
        f"{facts['gallery_images']} gallery images). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, CPU only. The embedded service (`python -m service serve "
        "--with-worker`: SQLite, the SQLite broker, a SQLite MLflow store) trained the model "
        f"with `{facts['config']}`'s settings"
        + (f" and `{' '.join(facts['overrides'])}`" if facts["overrides"] else "")
        + f" for {facts['epochs']} epoch(s)"
        + (f" of at most {facts['max_steps']} steps" if facts["max_steps"] is not None else "")
        + f" ({facts['train_minutes']:.1f} min) and registered it as "
        f"`{MODEL_NAME}` version {facts['version']}; a worker built the gallery in "
        f"{facts['gallery_seconds']:.0f} s; {facts['query_images']} searches through the API "
        f"took {facts['search_seconds']:.0f} s (k = {facts['k']}, the whole gallery).",
        "",
        "| rank-1 of the query split (Market protocol) | value | queries |",
        "|---|---|---|",
        f"| from `POST /v1/galleries/{{id}}/search` hits | {facts['search_r1']:.4f} | "
        f"{facts['correct']} correct of {facts['valid']} valid ({facts['skipped']} without a "
        "match in another camera) |",
        f"| `reid eval` of the downloaded weights | {facts['eval_r1']:.4f} | |",
        f"| the job's own evaluation (model version metrics) | {facts['job_r1']} | |",
        "",
        f"Equal: **{'yes' if same else 'NO'}** (|difference| = "
        f"{abs(facts['search_r1'] - facts['eval_r1']):.4f} points; `reid eval` prints 4 "
        f"decimals). `reid eval` also reports mAP {facts['eval_map']:.2f}.",
        "",
        "The model is trained from scratch for minutes on 2 CPU cores, so its accuracy is near "
        "chance (see `train_real.md`); what this checks is that the service's gallery (features "
        "from the worker, faiss inner-product search, hits relative to the dataset) ranks the "
        "query split exactly as the evaluation does.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--data", type=Path, default=os.environ.get("REID_BENCH_DATA"), help="Market-layout folder"
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cuhk03_cpu.yaml")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more job overrides (after the config's)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "search_cuhk03.md"
    )
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        raise SystemExit(f"--data (or REID_BENCH_DATA) must name a dataset folder, got {args.data}")
    data = Path(args.data).resolve()
    queries = sorted(p for p in (data / "query").iterdir() if p.suffix.lower() == ".jpg")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    env = _service_env(work / "var", data.parent)
    print(f"work folder: {work}", flush=True)
    # migrations first, so that create-key finds the schema before the server starts
    subprocess.run([sys.executable, "-m", "service", "migrate"], cwd=work, env=env, check=True)
    key = subprocess.run(
        [sys.executable, "-m", "service", "create-key", "--owner", "bench"],
        cwd=work, env=env, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    with (
        embedded_service(work, env, _free_port()) as url,
        httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=300) as client,
    ):
        dataset = _check(
            client.post("/v1/datasets", json={"name": data.name, "path": str(data)}), 201
        )
        overrides = job_overrides(
            args.config, args.epochs, args.max_steps_per_epoch, args.overrides
        )
        job = _check(
            client.post(
                "/v1/jobs", json={"dataset_id": dataset["id"], "config": overrides, "gpus": 0}
            ),
            201,
        )
        started = time.monotonic()
        job = _wait(client, f"/v1/jobs/{job['id']}", {"SUCCEEDED", "FAILED", "CANCELLED"},
                    3 * 3600, "job")  # fmt: skip
        train_minutes = (time.monotonic() - started) / 60
        if job["state"] != "SUCCEEDED":
            raise SystemExit(f"the job ended {job['state']}: {job['reason']}")
        version = job["model_version"]
        model = _check(client.get(f"/v1/models/{MODEL_NAME}/versions/{version}"), 200)

        started = time.monotonic()
        gallery = _check(
            client.post(
                "/v1/galleries",
                json={
                    "dataset_id": dataset["id"],
                    "model_name": MODEL_NAME,
                    "model_version": version,
                    "gpus": 0,
                },
            ),
            202,
        )
        gallery = _wait(client, f"/v1/galleries/{gallery['id']}", {"READY", "FAILED"}, 3600,
                        "gallery")  # fmt: skip
        gallery_seconds = time.monotonic() - started
        if gallery["state"] != "READY":
            raise SystemExit(f"the gallery ended {gallery['state']}: {gallery['reason']}")
        k = min(MAX_K, gallery["image_count"])
        if k < gallery["image_count"]:
            raise SystemExit(f"the gallery has {gallery['image_count']} images, above k={MAX_K}")

        started = time.monotonic()
        results: dict[str, list[dict[str, Any]]] = {}
        for query in queries:
            files = {"image": (query.name, query.read_bytes(), "image/jpeg")}
            answer = _check(
                client.post(f"/v1/galleries/{gallery['id']}/search", params={"k": k}, files=files),
                200,
            )
            results[query.name] = answer["hits"]
        search_seconds = time.monotonic() - started
        searched = rank1_from_hits(results)

        weights = work / f"{MODEL_NAME}-v{version}.pt"
        response = client.get(f"/v1/models/{MODEL_NAME}/versions/{version}/weights")
        if response.status_code != 200:
            raise SystemExit(f"weights download answered {response.status_code}: {response.text}")
        weights.write_bytes(response.content)

    evaluated = reid_eval(weights, data)
    job_r1 = model["metrics"].get("r1")
    facts = {
        "data_name": data.name,
        "query_images": len(queries),
        "gallery_images": gallery["image_count"],
        "epochs": args.epochs,
        "config": args.config.relative_to(ROOT)
        if args.config.is_relative_to(ROOT)
        else args.config,
        "overrides": args.overrides,
        "max_steps": args.max_steps_per_epoch,
        "train_minutes": train_minutes,
        "version": version,
        "gallery_seconds": gallery_seconds,
        "search_seconds": search_seconds,
        "k": k,
        "search_r1": searched.percent,
        "correct": searched.correct,
        "valid": searched.valid,
        "skipped": searched.skipped,
        "eval_r1": evaluated["r1"],
        "eval_map": evaluated["mAP"],
        "job_r1": f"{job_r1:.4f}" if job_r1 is not None else "-",
        # reid eval rounds to 4 decimals
        "equal": abs(searched.percent - evaluated["r1"]) <= 5e-5,
    }
    print(
        f"rank-1 from the service's search: {searched.percent:.4f} "
        f"({searched.correct}/{searched.valid}); reid eval: {evaluated['r1']:.4f}; "
        f"equal: {facts['equal']}",
        flush=True,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(facts))
    print(f"wrote {args.output}", flush=True)
    return 0 if facts["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
