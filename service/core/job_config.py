"""A job's training configuration: a preset and the user's overrides, validated by reid_core's
own models.

Layers, each overriding the one before: reid_core's defaults, the preset's settings (when the job
names one) without the keys the service sets, the user's overrides (nested or dotted keys,
checked key by key by :func:`reid_core.config.apply_overrides`), then what the service decides
(the dataset and its folder, the output folder, the device). Keys that name server paths cannot
be overridden by the user (a preset's are dropped: it was written for ``reid train``), and the
result must stay inside the service's :class:`JobBounds`.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reid_core.config import ConfigError, ExperimentConfig, apply_overrides
from service.core.settings import JobBounds

#: Keys the service sets itself, besides every key typed as a path.
_SERVICE_OWNED = frozenset({"data.dataset", "data.eval_dataset"})
_RESUME_CHOICES = ("auto", "none")


class JobConfigError(ValueError):
    """A config the service refuses. ``details`` holds one ``{"field": "config.a.b", "message",
    "value"?}`` per problem; ``field`` is the first one's key."""

    def __init__(self, field: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.field = field
        self.message = message
        self.details = details or [{"field": field, "message": message}]


def _is_path_annotation(annotation: Any) -> bool:
    if annotation is Path:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_path_annotation(a) for a in typing.get_args(annotation))
    return False


def _path_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _path_keys(annotation, f"{prefix}{name}.")
        elif _is_path_annotation(annotation):
            yield f"{prefix}{name}"


@functools.cache
def service_owned_keys() -> frozenset[str]:
    """Dotted keys users may not set: server paths (data.root, runtime.output_dir, ...) and the
    dataset choice, which comes from the job's ``dataset_id``. Read from the config's schema
    once (every submission asks)."""
    return _SERVICE_OWNED | frozenset(_path_keys(ExperimentConfig))


def _is_service_owned(key: str, owned: frozenset[str]) -> bool:
    return key in owned or any(key.startswith(k + ".") for k in owned)


def preset_overrides(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's settings as a job's overrides: dotted keys, without those the service sets."""
    owned = service_owned_keys()
    return {k: v for k, v in flatten_overrides(settings).items() if not _is_service_owned(k, owned)}


def flatten_overrides(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"gsl": {"threshold": 0.5}}, "schedule.epochs": 3}`` ->
    ``{"loss.gsl.threshold": 0.5, "schedule.epochs": 3}``; a later key wins."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not key.strip() or key.startswith(".") or key.endswith("."):
            raise JobConfigError(
                f"config.{prefix}{key}", f"config key {prefix}{key!r} is not a dotted name"
            )
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_overrides(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _validation_details(err: ValidationError) -> list[dict[str, Any]]:
    details = []
    for e in err.errors(include_url=False):
        key = ".".join(str(p) for p in e["loc"])
        item: dict[str, Any] = {
            "field": f"config.{key}" if key else "config",
            "message": "unknown key" if e["type"] == "extra_forbidden" else e["msg"],
        }
        if e["type"] not in ("missing", "extra_forbidden"):
            item["value"] = e.get("input")
        details.append(item)
    return details


def resolve_job_config(
    overrides: Mapping[str, Any],
    *,
    preset: Mapping[str, Any] | None = None,
    dataset_format: str,
    dataset_root: Path,
    output_dir: Path,
    gpus: int,
    bounds: JobBounds,
    weights_path: Path | None = None,
    num_train_images: int | None = None,
) -> ExperimentConfig:
    """The whole configuration of a job: ``preset``'s settings (a preset file's, see
    :func:`preset_overrides`), then ``overrides``; raises :class:`JobConfigError` naming the bad
    key."""
    flat = flatten_overrides(overrides)
    owned = service_owned_keys()
    for key in flat:
        if _is_service_owned(key, owned):
            raise JobConfigError(
                f"config.{key}",
                f"config key {key} is set by the service (from the dataset and the job's output "
                "folder); remove it",
            )
    if preset is not None:
        flat = preset_overrides(preset) | flat
    resume = flat.get("checkpoint.resume")
    if resume is not None and resume not in _RESUME_CHOICES:
        raise JobConfigError(
            "config.checkpoint.resume",
            f"config.checkpoint.resume must be one of {', '.join(_RESUME_CHOICES)} in a job "
            f"(got {resume!r}); a job only resumes from its own checkpoints",
        )
    device = flat.get("runtime.device")
    if gpus == 0 and device == "cuda":
        raise JobConfigError(
            "config.runtime.device", "config.runtime.device=cuda needs gpus >= 1 (got gpus=0)"
        )
    if gpus > 0 and device == "cpu":
        raise JobConfigError(
            "config.runtime.device",
            f"config.runtime.device=cpu with gpus={gpus}: set gpus=0 for a CPU job",
        )
    try:
        raw = apply_overrides({}, flat)
    except ConfigError as exc:
        field = f"config.{exc.key}" if exc.key else "config"
        raise JobConfigError(field, f"{field}: {exc.problem}") from None
    service_values: dict[str, Any] = {
        "data.dataset": dataset_format,
        "data.root": str(dataset_root),
        "runtime.output_dir": str(output_dir),
        "runtime.progress_bar": False,
    }
    if device is None:
        service_values["runtime.device"] = "cuda" if gpus > 0 else "cpu"
    if weights_path is not None:
        service_values["model.weights_path"] = str(weights_path)
    raw = apply_overrides(raw, service_values)
    try:
        # The same validation as reid_core.config.validate_config, with structured errors.
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        details = _validation_details(err)
        message = "; ".join(
            f"{d['field']}: {d['message']}" + (f" (got {d['value']!r})" if "value" in d else "")
            for d in details
        )
        raise JobConfigError(details[0]["field"], message, details) from None
    check_bounds(cfg, bounds, num_train_images)
    return cfg


def memory_bank_bytes(cfg: ExperimentConfig, num_images: int) -> int:
    """Host memory of the job's memory banks (see ``reid_core.objective.dual_branch``): the global memory
    (``num_images x C``), the patch memory (``num_images x P x patch_dim``) and the IPFL agents
    (``num_images x P x ipfl_dim``), float32, plus a batch of similarities (both views) to every
    memory entry. ``C`` is the backbone's channel count."""
    from reid_core.models.backbones import backbone_channels

    m, loss = cfg.model, cfg.loss
    per_image = 0
    if loss.global_branch:
        per_image += backbone_channels(m.backbone, m.last_stride) + 2 * cfg.data.batch_size
    if loss.pedal.enabled:
        per_image += m.num_patches * m.patch_dim + 2 * cfg.data.batch_size * m.num_patches
    if loss.ipfl.enabled:
        per_image += m.num_patches * m.ipfl_dim
    return 4 * per_image * num_images


def check_bounds(
    cfg: ExperimentConfig, bounds: JobBounds, num_train_images: int | None = None
) -> None:
    """Refuse a configuration above the service's limits, naming the key and the limit.

    With ``num_train_images``, the estimated size of the memory banks is bounded too."""
    checks = (
        ("schedule.epochs", cfg.schedule.epochs, bounds.max_epochs),
        ("data.batch_size", cfg.data.batch_size, bounds.max_batch_size),
        ("data.height", cfg.data.height, bounds.max_image_height),
        ("data.width", cfg.data.width, bounds.max_image_width),
        ("data.num_workers", cfg.data.num_workers, bounds.max_data_workers),
        ("runtime.num_threads", cfg.runtime.num_threads or 0, bounds.max_threads),
    )
    for key, value, limit in checks:
        if value > limit:
            raise JobConfigError(
                f"config.{key}",
                f"config.{key}={value} is above this service's limit of {limit}",
            )
    if num_train_images is not None:
        need = memory_bank_bytes(cfg, num_train_images) / 2**30
        if need > bounds.max_memory_bank_gib:
            raise JobConfigError(
                "config.model",
                f"the memory banks of {num_train_images} training images with "
                f"model.backbone={cfg.model.backbone}, model.patch_dim={cfg.model.patch_dim}, "
                f"model.ipfl_dim={cfg.model.ipfl_dim} need about {need:.1f} GiB, above this "
                f"service's limit of {bounds.max_memory_bank_gib:g} GiB: use a smaller "
                "backbone or feature sizes, or fewer images",
            )
