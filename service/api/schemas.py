"""Request and response bodies of the API (pydantic). Job configs are reid_core's own models, as
are a job's per-epoch metrics (:class:`reid_core.run_dir.EpochMetrics`)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from reid_core.config import ExperimentConfig
from service.core.job_progress import JobMetrics
from service.core.models import (
    DatasetKind,
    DatasetStatus,
    GalleryState,
    JobState,
    PairAnswerValue,
)
from service.core.owned import OwnedPage
from service.core.pair_checks import DEFAULT_QUERIES, MAX_QUERIES, MAX_SEED
from service.core.settings import MODEL_NAME_PATTERN

DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _integral_number(value: Any) -> Any:
    """An integer as JSON Schema (and so the API's OpenAPI schema) defines it: a number with no
    fractional part, ``2`` or ``2.0`` (a client's JSON library may write either). An integral
    float becomes the int it is; anything else is left for the field's strict int check to refuse
    (``2.5``, ``true``, ``"2"``: pydantic's lax int would read the last two as numbers)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Page(_Out, Generic[T]):
    """One page of a list, newest first. Go on with ``offset`` or, cheaper on long lists and
    stable while new items arrive, with ``after=<next_after>``."""

    items: list[T]
    total: int = Field(
        description="Items matching the filters, counted up to 1,000: exact when `total_exact`, "
        "otherwise there are more than that."
    )
    total_exact: bool = True
    limit: int
    offset: int
    next_after: str | None = Field(
        None,
        description="The cursor of the next page (`?after=`); null on a page shorter than "
        "`limit`, which is the last.",
    )

    @classmethod
    def of(cls, items: list[T], page: OwnedPage[Any], limit: int, offset: int) -> Page[T]:
        """The answer for ``page`` (rows read by the core), its rows shown as ``items``."""
        return cls(
            items=items,
            total=page.total,
            total_exact=page.total_exact,
            limit=limit,
            offset=offset,
            next_after=page.next_after,
        )

    @classmethod
    def json_of(cls, items: list[bytes], page: OwnedPage[Any], limit: int, offset: int) -> bytes:
        """The answer for ``page`` as JSON, its items given as JSON already (what
        ``cls.of(...).model_dump_json()`` writes, without decoding and encoding them again)."""
        envelope = cls.of([], page, limit, offset).model_dump_json().encode("utf-8")
        empty = b'{"items":[]'
        if not envelope.startswith(empty):  # the field order above is the JSON's
            raise AssertionError(f"a page's JSON starts with its items, not {envelope[:20]!r}")
        return b'{"items":[' + b",".join(items) + b"]" + envelope[len(empty) :]


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    field: str = Field(examples=["body.config.loss.gls"])
    message: str
    value: Any = Field(None, description="The offending value, when there is one.")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable, machine-readable.", examples=["validation_error"])
    message: str = Field(description="What was wrong and what to do.")
    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """Every error the API answers: ``{"error": {"code", "message", "details"?}}``."""

    error: ErrorInfo


def error_responses(**descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses: ``error_responses(e404="Unknown job")``."""
    return {
        int(status.removeprefix("e")): {"model": ErrorResponse, "description": text}
        for status, text in descriptions.items()
    }


#: Errors any authenticated route may answer.
COMMON_ERRORS = error_responses(
    e401="Missing, invalid or revoked API key",
    e422="Invalid request: `details` names each field and value",
    e500="Unexpected error (logged; no stack trace is returned)",
    e503="A dependency (the database; for /v1/models, MLflow) is unreachable: retry later",
)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


class DatasetFromPath(_In):
    """Register a folder on the server; it must lie under one of the configured dataset roots."""

    name: str = Field(pattern=DATASET_NAME_PATTERN, examples=["cams-2024"])
    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Absolute path of the folder on the server.",
        examples=["/data/reid/cams-2024"],
    )


class DatasetOut(_Out):
    id: uuid.UUID
    name: str
    kind: DatasetKind
    path: str
    format: str = Field(
        description="reid_core dataset used to read it: market_folder or image_folder."
    )
    status: DatasetStatus
    image_count: int = Field(description="Readable images over all splits.")
    identity_count: int = Field(description="Labelled identities (0 for an unlabeled folder).")
    camera_count: int = Field(description="Cameras found (0 when unknown).")
    splits: dict[str, dict[str, int]] = Field(
        description="Per split (train/query/gallery): readable images, identities, cameras."
    )
    unreadable_count: int
    unreadable_sample: list[str] = Field(
        description="Some unreadable files, relative to the dataset folder."
    )
    size_bytes: int | None = Field(None, description="Extracted size of an upload.")
    created_at: datetime


# ----------------------------------------------------------------------------------------------
# jobs
# ----------------------------------------------------------------------------------------------


#: Deepest nesting of a job's ``config`` (ExperimentConfig keys are at most 3 levels deep).
MAX_CONFIG_DEPTH = 8


def _depth(config: dict[str, Any]) -> int:
    """Levels of dicts below ``config`` (iterative: the input may be deeper than the stack)."""
    depth, level = 0, [config]
    while level := [v for d in level for v in d.values() if isinstance(v, dict)]:
        depth += 1
    return depth


class JobCreate(_In):
    """A training job on one of your datasets."""

    dataset_id: uuid.UUID
    preset: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="A preset to start from (GET /v1/presets): its settings apply first, then "
        "`config`; the keys it sets that the service sets itself are ignored. An unknown name "
        "is a 404 listing the presets.",
        examples=["cuhk03_cpu"],
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the training configuration (the ExperimentConfig schema), "
        "nested or with dotted keys, over the preset's settings when one is named; unknown keys "
        "are refused. The dataset, its folder and the output folder are set by the service.",
        examples=[{"schedule.epochs": 30, "loss": {"gsl": {"threshold": 0.55}}}],
    )
    # Integers as JSON Schema's (2 or 2.0); 2.5, `true` or "2" GPUs are refused, not read as 2.
    gpus: StrictInt | None = Field(
        None,
        ge=0,
        description="GPUs for the job (0: CPU); default: the service's job_bounds.default_gpus "
        "(1 where GPUs are allowed; 0 under `serve --with-worker` with its CPU worker).",
    )
    priority: StrictInt = Field(0, ge=0, description="0 (lowest) up to the service's max_priority.")
    queue: str | None = Field(None, description="Queue to run on; default: the first queue.")
    max_retries: StrictInt = Field(
        0,
        ge=0,
        description="Retries (resuming from the last checkpoint) after the trainer failed by "
        "itself: it crashed (exit code 1 or another unexpected one, a fault such as SIGSEGV) or "
        "its worker shut down under it.",
    )
    max_restarts: StrictInt | None = Field(
        None,
        ge=0,
        description="Restarts (resuming from the last checkpoint) after the trainer or its worker "
        "was killed from outside: the kernel's OOM killer (SIGKILL), a signal nobody of the "
        "service sent, a worker that stopped heartbeating. A cancel or the timeout never "
        "restarts. Default: the service's job_bounds.default_restarts "
        "(REID_JOB_BOUNDS__DEFAULT_RESTARTS, 3 unless configured).",
    )
    timeout_minutes: StrictInt | None = Field(
        None, ge=1, description="Stop the job after this long; default from the service."
    )
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Repeating a request with the same key returns the job it created.",
    )
    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="Registered model (MLflow) the final model becomes a new version of; "
        "default: the service's (REID_MLFLOW__MODEL_NAME, e.g. reid-<owner>). A model name "
        "belongs to the owner whose job registered it first.",
    )

    _integral = field_validator(
        "gpus", "priority", "max_retries", "max_restarts", "timeout_minutes", mode="before"
    )(_integral_number)

    @field_validator("config")
    @classmethod
    def _not_too_deep(cls, config: dict[str, Any]) -> dict[str, Any]:
        depth = _depth(config)
        if depth > MAX_CONFIG_DEPTH:
            raise ValueError(
                f"config is nested {depth} levels deep, at most {MAX_CONFIG_DEPTH} are "
                "accepted; use dotted keys such as loss.gsl.threshold"
            )
        return config


class JobPreviewOut(_Out):
    """What a job of the request would run with; nothing was created."""

    config: ExperimentConfig = Field(
        description="The resolved configuration: defaults, the preset, your overrides, then what "
        "the service sets. `runtime.output_dir` names a new id each time: a job gets its own."
    )
    gpus: int
    queue: str


class PresetOut(_Out):
    """A preset: a shipped training recipe a job may start from (`"preset": "<name>"`)."""

    name: str = Field(examples=["cuhk03_cpu"])
    purpose: str = Field(description="One line: what it is for.")
    measured: str = Field(description="One line: what it was measured to give, and where.")
    overrides: dict[str, Any] = Field(
        description="Its settings as dotted keys, without those the service sets (the dataset, "
        "its folder, the output folder): what it applies before a job's `config`."
    )
    config: ExperimentConfig = Field(
        description="The defaults with `overrides` applied; a job's dataset, its folder and "
        "output folder are set when it is submitted."
    )


class JobSummary(_Out):
    """A job as a list shows it: everything but its configuration (``GET /v1/jobs/{id}`` or
    ``?view=full`` has that)."""

    id: uuid.UUID
    dataset_id: uuid.UUID | None = Field(description="None once the dataset was deleted.")
    state: JobState
    reason: str | None = Field(description="Why the job reached its current state.")
    gpus: int
    priority: int
    queue: str
    max_retries: int = Field(description="Retries allowed after the trainer failed by itself.")
    retries: int = Field(description="Retries made since the job started (or its owner's retry).")
    max_restarts: int = Field(description="Restarts allowed after a kill from outside (OOM).")
    restarts: int = Field(description="Restarts made since the job started (or its owner's retry).")
    timeout_minutes: int
    idempotency_key: str | None
    progress: float = Field(description="0 to 1.")
    epoch: int | None
    step: int | None
    metrics: JobMetrics = Field(description="Latest losses and evaluation (mAP, R1, ...).")
    mlflow_run_id: str | None
    mlflow_run_url: str | None = Field(None, description="The run in the MLflow UI, if known.")
    model_name: str | None = Field(description="Registered model the job's model goes to.")
    model_version: str | None = Field(description="Its version, once registered.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Problems that did not stop the job (e.g. MLflow unreachable for a while).",
    )
    cancel_requested: bool
    worker_id: str | None
    heartbeat_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobOut(JobSummary):
    """A job with its configuration."""

    config_overrides: dict[str, Any]
    resolved_config: ExperimentConfig | dict[str, Any] = Field(
        description="The whole configuration the trainer runs with."
    )


class ModelOut(BaseModel):
    """A registered model (MLflow) of yours."""

    name: str
    description: str | None
    latest_version: str | None
    aliases: dict[str, str] = Field(description="alias -> version, e.g. {'best': '3'}")
    created_at: datetime | None
    updated_at: datetime | None
    mlflow_url: str | None = Field(description="The model in the MLflow UI, if configured.")


class ModelVersionOut(BaseModel):
    """One version of a registered model: what made it and how good it is."""

    name: str
    version: str
    status: str
    run_id: str | None = Field(description="The MLflow run of the job that trained it.")
    job_id: str | None = Field(description="The job that trained it.")
    metrics: dict[str, float] = Field(description="Its last evaluation: mAP, r1, r5, ... (%).")
    aliases: list[str]
    created_at: datetime | None
    best_rule: str | None = Field(
        description="On the version holding the alias best: the rule that chose it, 'mAP' "
        "(evaluated on labels), 'human precision@1' (the human pair check), 'label-free "
        "<signal>' (e.g. 'label-free mutual_nn_rate'), 'newest' (no version has any of those) "
        "or 'set by hand'; null on the other versions.",
        examples=["mAP", "label-free mutual_nn_rate"],
    )
    best_value: float | None = Field(
        description="The value it won with under best_rule (mAP in %, precision 0..1, the "
        "signal's value); null for 'newest', 'set by hand' and the other versions."
    )
    load_uri: str = Field(description="For mlflow.pytorch.load_model(): an embedder.")
    download_url: str = Field(description="The weights (model_final.pt) from this API.")
    mlflow_url: str | None


class AliasUpdate(_In):
    version: str = Field(pattern=r"^[0-9]+$", description="The version the alias points to.")


class JobEventOut(_Out):
    id: int
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: datetime


# ----------------------------------------------------------------------------------------------
# API keys (admin)
# ----------------------------------------------------------------------------------------------


class ApiKeyCreate(_In):
    owner: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, max_length=128, description="A label, e.g. the client.")

    @field_validator("owner")
    @classmethod
    def _owner_not_blank(cls, owner: str) -> str:
        if not owner.strip():  # create_api_key strips it: "   " would be no owner at all
            raise ValueError("owner must have a character that is not whitespace")
        return owner


class ApiKeyOut(_Out):
    prefix: str
    owner: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key. Shown once: only its hash is stored.")


# ----------------------------------------------------------------------------------------------
# model use: embeddings and galleries
# ----------------------------------------------------------------------------------------------

#: A model version as the routes take it: a number, or an alias (``best``, ``production``).
VERSION_REF_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ImageFeatureOut(BaseModel):
    name: str = Field(description="The uploaded file's name.")
    feature: list[float] = Field(description="L2-normalised feature (norm 1), feature_dim long.")


class EmbedOut(BaseModel):
    """Features of uploaded images, in the order they were sent."""

    model_name: str
    model_version: str = Field(description="The version number (an alias is resolved).")
    feature_dim: int
    items: list[ImageFeatureOut]


class GalleryCreate(_In):
    """Index a dataset's gallery images with one of your registered model versions."""

    dataset_id: uuid.UUID
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, examples=["reid-alice"])
    model_version: str = Field(
        pattern=VERSION_REF_PATTERN,
        description='A version number (3 or "3") or an alias (best); resolved to a number '
        "when the gallery is created.",
        examples=["best", "3"],
    )
    name: str | None = Field(None, min_length=1, max_length=128, examples=["cams-2024 v3"])
    gpus: StrictInt | None = Field(
        None,
        ge=0,
        le=1,
        description="1: built by a GPU worker (queue gpu1), 0: by a CPU worker (queue cpu); "
        "default as for jobs (at most 1).",
    )
    queue: str | None = Field(
        None, description="Queue to build on, as for jobs; default: the first queue."
    )

    _integral = field_validator("gpus", mode="before")(_integral_number)

    @field_validator("model_version", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


class GalleryOut(_Out):
    """A gallery: its build state and what it indexes."""

    id: uuid.UUID
    name: str | None
    dataset_id: uuid.UUID | None = Field(description="None once the dataset was deleted.")
    model_name: str
    model_version: str = Field(description="The version number the features come from.")
    gpus: int
    queue: str
    state: GalleryState
    reason: str | None = Field(description="Why the gallery is in its current state.")
    error: str | None = Field(None, description="What went wrong, when FAILED.")
    progress: float = Field(description="0 to 1: share of the images embedded.")
    image_count: int | None = Field(
        description="Images to index: the dataset's gallery split (bounding_box_test) for a "
        "Market-layout dataset, every image of an image folder. Exact once BUILDING."
    )
    images_done: int = Field(description="Images embedded so far.")
    skipped_count: int = Field(description="Unreadable images left out of the index.")
    feature_dim: int | None
    worker_id: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @model_validator(mode="after")
    def _error_when_failed(self) -> GalleryOut:
        self.error = self.reason if self.state is GalleryState.FAILED else None
        return self


class GalleryEventOut(_Out):
    """One state change of a gallery, with its reason."""

    id: int
    from_state: GalleryState | None = Field(description="None for the gallery's creation.")
    to_state: GalleryState
    reason: str
    at: datetime


class SearchHitOut(BaseModel):
    rank: int = Field(description="1 for the closest image.")
    path: str = Field(description="The gallery image, relative to the dataset's folder.")
    score: float = Field(description="Cosine similarity to the query (larger = closer).")
    camera_id: int | None = Field(
        description="0-based camera index (c1 in a Market file name is 0); None when unknown."
    )
    person_id: int | None = Field(
        description="Identity label of a labelled dataset (0: a distractor); None when unknown."
    )
    position: int = Field(
        description="The image's row in the gallery index (0-based): "
        "GET /v1/galleries/{gallery_id}/images/{position} answers the image file."
    )


class GallerySearchOut(BaseModel):
    gallery_id: uuid.UUID
    model_name: str
    model_version: str
    query: str = Field(description="The uploaded query file's name.")
    k: int = Field(description="Hits asked for (fewer when the gallery is smaller).")
    hits: list[SearchHitOut]


# ----------------------------------------------------------------------------------------------
# pair checks: a person's answers on sampled pairs estimate a version's precision
# ----------------------------------------------------------------------------------------------


class CheckCreate(_In):
    """Check a READY gallery's model version by hand: pairs of its crops to judge."""

    gallery_id: uuid.UUID
    queries: StrictInt | None = Field(
        None,
        ge=1,
        le=MAX_QUERIES,
        description="Queries to sample (each gives one or two pairs). Default: as the owner's "
        f"first check of the dataset, else {DEFAULT_QUERIES}.",
    )
    seed: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="The sample's seed: the same seed, images and cameras give the same "
        "queries and drawn ranks. Default: the seed of the owner's first check of the "
        "dataset (so a retrained version is asked about the same queries and reuses the "
        "answers), else a random one.",
    )

    _integral = field_validator("queries", "seed", mode="before")(_integral_number)


class PrecisionOut(BaseModel):
    """A precision estimated from answers: ``same / (same + different)`` with Wilson's 95%
    score interval; unsure answers are left out and counted apart."""

    estimate: float | None = Field(description="Between 0 and 1; null before any answer.")
    low: float = Field(description="95% interval, lower end (0 before any answer).")
    high: float = Field(description="95% interval, upper end (1 before any answer).")
    same: int
    different: int
    unsure: int
    answers: int = Field(description="same + different: the sample the estimate is made of.")


class CheckOut(BaseModel):
    """A pair check of a gallery's model version, with the estimates its answers make so far."""

    id: uuid.UUID
    gallery_id: uuid.UUID
    dataset_id: uuid.UUID
    model_name: str
    model_version: str = Field(description="The version number the gallery was built with.")
    seed: int
    queries: int = Field(description="Queries asked for (fewer when fewer images qualify).")
    pairs: int = Field(description="Pairs to judge: one or two per query.")
    answered: int = Field(description="Pairs with an answer, yours from any check of the dataset.")
    min_answers: int = Field(description="Answers after which the estimate is worth reading.")
    precision_at_1: PrecisionOut = Field(
        description="From each query's rank-1 pair (its nearest crop from another camera)."
    )
    precision_at_5: PrecisionOut = Field(
        description="From each query's pair at a rank drawn uniformly from 1 to 5: the mean "
        "precision over ranks 1 to 5."
    )
    created_at: datetime


class CheckAnsweredOut(CheckOut):
    """The check after an answer changed, and whether its estimate reached MLflow."""

    mlflow_run_id: str | None = Field(
        description="The version's run the estimate was logged to (metrics human/...); null "
        "when it was not: mlflow_error says why, and the next answer logs it again."
    )
    mlflow_error: str | None


class PairImageOut(BaseModel):
    position: int = Field(
        description="Row in the gallery's index: GET /v1/galleries/{gallery_id}/images/"
        "{position} answers the image file."
    )
    path: str = Field(description="Relative to the dataset's folder.")
    camera_id: int | None = Field(description="0-based camera index; null when unknown.")


class PairOut(BaseModel):
    """A pair to judge: does ``candidate`` show the person of ``query``?"""

    index: int = Field(description="The pair's number in the check, from 0, in asking order.")
    query: PairImageOut
    candidate: PairImageOut
    rank: int = Field(
        description="The candidate's rank among the query's crops from other cameras."
    )
    score: float = Field(description="Cosine similarity of the two crops' features.")
    at_rank_1: bool = Field(description="Its answer counts in precision at rank 1.")
    at_rank_5: bool = Field(description="Its answer counts in precision at rank 5.")
    answer: PairAnswerValue | None = Field(description="Your answer on these two images, if any.")


class PairList(BaseModel):
    items: list[PairOut]


class PairAnswerIn(_In):
    answer: PairAnswerValue = Field(
        description="same: one person; different: two people; unsure: cannot tell (left out "
        "of the estimates, counted apart)."
    )
