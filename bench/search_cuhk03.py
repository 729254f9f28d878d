"""Acceptance check: gallery search through the service ranks as ``reid eval`` does.

With a model trained by the service on real data, the rank-1 accuracy of the query split computed
from ``POST /v1/galleries/{id}/search`` answers must equal the rank-1 that ``reid eval`` reports
for the same model (Market-1501 protocol). The whole path runs as a user would:

1. ``python -m service serve --with-worker`` (the embedded setup: SQLite, the SQLite broker, a
   SQLite MLflow store) in a fresh data folder, the dataset's parent as the dataset root, no GPU;
2. ``python -m service create-key --owner bench``; the dataset registered by its path;
3. a short training job from the preset ``cuhk03_cpu`` (``"preset"`` in the job); its model is
   registered as ``reid-bench`` version 1;
4. a gallery of the dataset (its ``bounding_box_test``) with that version, built by the worker;
5. every query image searched through the API with ``k`` = the whole gallery and its camera
   (``camera=``, from its file name: a model trained with ``model.camera_norm`` normalises the
   query with that camera's statistics, as ``reid eval`` does); rank-1 (and
   rank-5/10, mAP, mINP) computed here from the hits' file names alone
   (:func:`ranking_from_hits`: hits with the query's identity *and* camera are ignored);
6. the version's weights downloaded from the API and evaluated with ``reid eval --checkpoint
   ... --data market_folder:<data>``; both sets of figures printed and written to
   ``bench/results/search_cuhk03.md``. Exit code 1 when the rank-1 values differ. Equal mAP and
   mINP as well mean the two rankings agree at every correct match, not only the first.

The data folder comes from ``--data`` or ``REID_BENCH_DATA``; nothing is copied::

    python bench/search_cuhk03.py --data ../shared/data/cuhk03-pair1
    python bench/search_cuhk03.py --data ... --epochs 1 --max-steps-per-epoch 30   # quicker
    python bench/search_cuhk03.py --data ... --work-dir W --reuse-version 1  # W's model again
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
from reid_core.presets import preset_names  # noqa: E402

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


def job_overrides(epochs: int, max_steps: int | None, extra: list[str]) -> dict[str, Any]:
    """The job's overrides of its preset: the run's length, then ``extra`` (``KEY=VALUE``,
    values read as YAML)."""
    flat: dict[str, Any] = {"schedule.epochs": epochs}
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


def _labels(name: str) -> tuple[int, int]:
    parsed = parse_market_name(Path(name).name)
    if parsed is None:
        raise SystemExit(f"{name!r} is not named PPPP_cC...: cannot read its identity and camera")
    return parsed


@dataclass
class Ranking:
    """Market-protocol metrics of the query split, from search hits (percent, as ``reid eval``)."""

    metrics: dict[str, float]
    valid: int
    skipped: int
    correct_at_1: int


def ranking_from_hits(results: dict[str, list[dict[str, Any]]]) -> Ranking:
    """``results``: query file name -> its hits, best first, over the whole gallery.

    For query ``i`` (identity ``p``, camera ``c``, read from the file names), hits with identity
    ``p`` *and* camera ``c`` are ignored; the query is valid when a remaining hit has identity
    ``p``. With ``r_1 < ... < r_P`` the ranks of those correct hits among the remaining ones:
    ``CMC_k`` counts ``r_1 <= k``, ``AP = (1/P) sum_j j / r_j``, ``INP = P / r_P``; each is
    averaged over the valid queries.
    """
    valid = skipped = 0
    cmc = {1: 0, 5: 0, 10: 0}
    ap_sum = inp_sum = 0.0
    for query, hits in results.items():
        pid, cam = _labels(query)
        kept = [_labels(h["path"]) for h in hits]
        kept = [(p, c) for p, c in kept if not (p == pid and c == cam)]
        ranks = [r for r, (p, _) in enumerate(kept, start=1) if p == pid]
        if not ranks:
            skipped += 1
            continue
        valid += 1
        for k in cmc:
            cmc[k] += ranks[0] <= k
        ap_sum += sum(j / r for j, r in enumerate(ranks, start=1)) / len(ranks)
        inp_sum += len(ranks) / ranks[-1]
    scale = 100.0 / max(1, valid)
    metrics = {
        "mAP": ap_sum * scale,
        "mINP": inp_sum * scale,
        **{f"r{k}": hits * scale for k, hits in cmc.items()},
    }
    return Ranking(metrics, valid, skipped, cmc[1])


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


#: Compared metrics; ``reid eval`` prints them (percent) rounded to 4 decimals.
COMPARED = ("r1", "r5", "r10", "mAP", "mINP")
TOLERANCE = 5e-5


def report(facts: dict[str, Any]) -> str:
    searched, evaluated, job = facts["searched"], facts["evaluated"], facts["job"]
    schedule = job["resolved_config"]["schedule"]
    steps = schedule.get("max_steps_per_epoch")
    training = (
        f"job `{job['id']}` trained it for {schedule['epochs']} epoch(s)"
        + (f" of at most {steps} steps" if steps is not None else "")
        + f" ({_job_minutes(job):.1f} min"
        + (
            ", in an earlier run of this script in the same work folder)"
            if facts["reused"]
            else ")"
        )
    )
    overrides = job["config_overrides"]
    run_name = job["resolved_config"]["name"]
    lines = [
        "# Search through the service vs `reid eval` (CUHK03, camera pair 1)",
        "",
        f"`python bench/search_cuhk03.py {' '.join(sys.argv[1:])}`",
        "",
        f"Data: `{facts['data_name']}` ({facts['query_images']} query images, "
        f"{facts['gallery_images']} gallery images). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, CPU only, shared with other work. In the embedded service "
        "(`python -m service serve --with-worker`: SQLite, the SQLite broker, a SQLite MLflow "
        f"store), {training} and registered it as `{MODEL_NAME}` version {facts['version']}; "
        f"a worker built the gallery in {facts['gallery_seconds']:.0f} s; "
        f"{facts['query_images']} searches through the API took {facts['search_seconds']:.0f} s "
        f"(k = {facts['k']}, the whole gallery).",
        "",
        "Query split, Market protocol (%): from the hits of `POST /v1/galleries/{id}/search` "
        f"({searched.valid} valid queries, {searched.skipped} without a match in another "
        f"camera; rank-1: {searched.correct_at_1} correct), and from `reid eval` of the weights "
        "downloaded from `GET /v1/models/.../weights`:",
        "",
        "| metric | search hits | `reid eval` | job's own evaluation | equal |",
        "|---|---|---|---|---|",
    ]
    for name in COMPARED:
        job = facts["job_metrics"].get(name)
        lines.append(
            f"| {name} | {searched.metrics[name]:.4f} | {evaluated[name]:.4f} | "
            + (f"{job:.4f}" if job is not None else "-")
            + f" | {'yes' if abs(searched.metrics[name] - evaluated[name]) <= TOLERANCE else 'NO'} |"
        )
    lines += [
        "",
        f"Rank-1 equal: **{'yes' if facts['r1_equal'] else 'NO'}**; every metric equal: "
        f"**{'yes' if facts['all_equal'] else 'NO'}** (`reid eval` prints 4 decimals; equal means "
        f"within {TOLERANCE}). Equal mAP and mINP mean the two rankings agree at every correct "
        "match, not only at the first.",
        "",
        f"The job's configuration: the preset of run `{run_name}`, then the overrides "
        f"`{json.dumps(overrides, separators=(',', ':'))}`.",
        "",
        "The model is trained from scratch for minutes on 2 CPU cores, so its accuracy is near "
        "chance (see `train_real.md`); what this checks is that the service's gallery (features "
        "from the worker, faiss inner-product search, hits relative to the dataset) ranks the "
        "query split as the evaluation does.",
    ]
    return "\n".join(lines) + "\n"


def _dataset(client: httpx.Client, data: Path) -> dict[str, Any]:
    """The dataset registered by its path (the one already registered, in a reused folder)."""
    response = client.post("/v1/datasets", json={"name": data.name, "path": str(data)})
    if response.status_code == 409:
        items = _check(client.get("/v1/datasets", params={"limit": 200}), 200)["items"]
        return next(d for d in items if d["name"] == data.name)
    created: dict[str, Any] = _check(response, 201)
    return created


def _train(
    client: httpx.Client, dataset: dict[str, Any], preset: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """A job trained to SUCCEEDED (its model registered)."""
    body = {"dataset_id": dataset["id"], "preset": preset, "config": overrides, "gpus": 0}
    job = _check(client.post("/v1/jobs", json=body), 201)
    job = _wait(client, f"/v1/jobs/{job['id']}", {"SUCCEEDED", "FAILED", "CANCELLED"},
                3 * 3600, "job")  # fmt: skip
    if job["state"] != "SUCCEEDED":
        raise SystemExit(f"the job ended {job['state']}: {job['reason']}")
    return job


def _job_minutes(job: dict[str, Any]) -> float:
    from datetime import datetime

    started = datetime.fromisoformat(job["started_at"])
    finished = datetime.fromisoformat(job["finished_at"])
    return (finished - started).total_seconds() / 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--data", type=Path, default=os.environ.get("REID_BENCH_DATA"), help="Market-layout folder"
    )
    parser.add_argument("--preset", default="cuhk03_cpu", choices=preset_names())
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more job overrides (after the preset's)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument(
        "--reuse-version",
        default=None,
        help=f"search with this version of {MODEL_NAME}, trained by an earlier run in --work-dir, "
        "instead of training a new one",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "bench" / "results" / "search_cuhk03.md"
    )
    args = parser.parse_args()
    if args.data is None or not Path(args.data).is_dir():
        raise SystemExit(f"--data (or REID_BENCH_DATA) must name a dataset folder, got {args.data}")
    if args.reuse_version is not None and args.work_dir is None:
        raise SystemExit("--reuse-version needs the --work-dir of the run that trained it")
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
        dataset = _dataset(client, data)
        if args.reuse_version is None:
            overrides = job_overrides(args.epochs, args.max_steps_per_epoch, args.overrides)
            job = _train(client, dataset, args.preset, overrides)
        else:
            jobs = _check(client.get("/v1/jobs", params={"state": "SUCCEEDED"}), 200)["items"]
            job = next((j for j in jobs if j["model_version"] == args.reuse_version), None)
            if job is None:
                raise SystemExit(f"no job of {work} registered version {args.reuse_version}")
        version = str(job["model_version"])
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
        k = gallery["image_count"]
        if k > MAX_K:
            raise SystemExit(f"the gallery has {k} images, above the API's k <= {MAX_K}")

        started = time.monotonic()
        results: dict[str, list[dict[str, Any]]] = {}
        for query in queries:
            files = {"image": (query.name, query.read_bytes(), "image/jpeg")}
            _, camera = parse_market_name(query.name) or (-1, -1)
            params = {"k": k} if camera < 0 else {"k": k, "camera": camera}
            answer = _check(
                client.post(f"/v1/galleries/{gallery['id']}/search", params=params, files=files),
                200,
            )
            results[query.name] = answer["hits"]
        search_seconds = time.monotonic() - started
        searched = ranking_from_hits(results)

        weights = work / f"{MODEL_NAME}-v{version}.pt"
        response = client.get(f"/v1/models/{MODEL_NAME}/versions/{version}/weights")
        if response.status_code != 200:
            raise SystemExit(f"weights download answered {response.status_code}: {response.text}")
        weights.write_bytes(response.content)

    evaluated = reid_eval(weights, data)
    differences = {n: abs(searched.metrics[n] - evaluated[n]) for n in COMPARED}
    facts = {
        "data_name": data.name,
        "query_images": len(queries),
        "gallery_images": gallery["image_count"],
        "job": job,
        "reused": args.reuse_version is not None,
        "version": version,
        "gallery_seconds": gallery_seconds,
        "search_seconds": search_seconds,
        "k": k,
        "searched": searched,
        "evaluated": evaluated,
        "job_metrics": model["metrics"],
        "r1_equal": differences["r1"] <= TOLERANCE,
        "all_equal": all(d <= TOLERANCE for d in differences.values()),
    }
    for name in COMPARED:
        print(
            f"{name:>5}: search {searched.metrics[name]:.4f}  reid eval {evaluated[name]:.4f}",
            flush=True,
        )
    print(f"rank-1 equal: {facts['r1_equal']}; every metric equal: {facts['all_equal']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(facts))
    print(f"wrote {args.output}", flush=True)
    return 0 if facts["r1_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
