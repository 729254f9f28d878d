"""Every setting of the method, as pydantic models: the one source of configuration.

A run's configuration is built in three layers, each overriding the one before:

1. the defaults below (the paper's settings for Market-1501, ResNet-50 at 256x128);
2. a YAML file (a preset of ``reid_core/presets/`` or your own), validated strictly: an unknown key
   is an error;
3. dotted overrides from the command line or the API (``loss.gsl.threshold=0.55``), parsed as YAML
   scalars and validated against the same models.

The resolved configuration is written next to the outputs (``config.yaml`` in ``runtime.output_dir``)
so a run can always be reproduced. Choices that the reference design marks "(choice)" are options here.

A file may start with an ``about:`` header (:class:`ConfigAbout`: its one-line purpose and what it
was measured to give). It describes the file and is not a setting: :func:`read_config_file` returns
it apart and the configuration never holds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from reid_core.atomic_write import write_atomic

__all__ = [
    "CameraProxyConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ClusterLossConfig",
    "ConfigAbout",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "ExperimentConfig",
    "GSLConfig",
    "IPFLConfig",
    "InstanceLossConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelConfig",
    "NeighbourPriorConfig",
    "OptimConfig",
    "PEDALConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_override",
    "read_config_file",
]


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the bad key/value.

    An error about one override also carries it apart: ``key`` is its dotted key and ``problem``
    the message without the key (``"unknown key 'gls' in loss (known: ...)"``), so that a caller
    can name the key in its own terms without parsing the message.
    """

    def __init__(self, message: str, *, key: str | None = None, problem: str | None = None):
        super().__init__(message)
        self.key = key
        self.problem = problem if problem is not None else message


def _override_error(path: list[str], problem: str) -> ConfigError:
    key = ".".join(path)
    return ConfigError(f"override {key}: {problem}", key=key, problem=problem)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


class DataConfig(_Strict):
    """Where the images come from and how they are fed to the network."""

    dataset: str = Field(
        "market1501",
        description="Registry name: market1501, dukemtmc, msmt17, market_folder, image_folder, synthetic.",
    )
    root: Path | None = Field(
        None, description="Dataset root folder (layout depends on the dataset; see reid_core.data)."
    )
    eval_dataset: str | None = Field(
        None, description="Dataset used for evaluation (query/gallery); defaults to `dataset`."
    )
    eval_root: Path | None = Field(None, description="Root of `eval_dataset`; defaults to `root`.")
    synthetic_identities: int = Field(
        24, ge=2, le=10_000, description="synthetic dataset only: identities per split"
    )
    synthetic_images_per_identity: int = Field(
        8, ge=2, le=200, description="synthetic dataset only: images per identity"
    )
    synthetic_seed: int = 0
    height: int = Field(256, ge=32, le=1024)
    width: int = Field(128, ge=16, le=512)
    batch_size: int = Field(32, ge=2, le=1024, description="Images per step per process.")
    num_workers: int = Field(4, ge=0, le=64)
    max_bad_fraction: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="Unreadable images are skipped and logged; above this share the run fails.",
    )
    crop_area: tuple[float, float] = Field(
        (0.70, 0.95), description="View 1: random crop keeping this share of the area."
    )
    color_jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.1)
    rotation_degrees: float = Field(10.0, ge=0.0, le=180.0)
    flip_probability: float = Field(0.5, ge=0.0, le=1.0)
    augment_both_views: bool = Field(
        False,
        description="Give view 0 the same random augmentation as view 1 (two augmented views, "
        "as in contrastive learning) instead of the plain view.",
    )
    grayscale_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Augmented views: turned grey with this probability."
    )
    erasing_probability: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Augmented views: random erasing (2-40% of the area) with this probability.",
    )
    camera_style_probability: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Augmented views: recoloured to another camera's colour statistics with this "
        "probability (reid_core/data/camera_style.py); needs images of two cameras or more.",
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("crop_area")
    @classmethod
    def _crop_area_ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"crop_area must satisfy 0 < low <= high <= 1, got {v}")
        return v


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    """Shared trunk, global head, patch generation module and patch heads."""

    backbone: str = Field(
        "resnet50", description="Backbone registry name (resnet50, resnet18, ...)."
    )
    last_stride: Literal[1, 2] = 1
    pretrained: Literal["imagenet", "none"] = Field(
        "imagenet",
        description="'imagenet' loads weights from `weights_path` or torchvision's cache, never "
        "from the network; 'none' trains from scratch.",
    )
    weights_path: Path | None = Field(
        None, description="Local ImageNet checkpoint for the backbone."
    )
    num_patches: int = Field(6, ge=1, le=16)
    patch_dim: int = Field(256, ge=8, le=2048)
    pgm_channels: int = Field(4096, ge=16, le=8192, description="PGM conv3x3 output channels.")
    pgm_hidden: int = Field(512, ge=8, le=4096, description="PGM first Linear output.")
    pgm_trainable: bool = Field(False, description="Frozen in the unsupervised stage by default.")
    ipfl_dim: int = Field(
        128, ge=4, le=1024, description="Per-patch projection size of the IPFL embedding."
    )
    camera_norm: bool = Field(
        False,
        description="BatchNorm statistics per training camera (reid_core.models.camera_norm), "
        "estimated from each camera's training images before every evaluation and before the "
        "final model is written: at test time an image is normalised with its camera's "
        "statistics. Training itself is unchanged. Needs every training image's camera.",
    )
    camera_norm_train: bool = Field(
        False,
        description="Training batches normalised per camera too (camera-based batch "
        "normalisation, Zhuang et al., ECCV 2020): each step's images of one camera go through "
        "the network together, with their own batch statistics, so the network learns in the "
        "per-camera normalised space that evaluation uses. Needs model.camera_norm.",
    )
    camera_norm_images: int = Field(
        1000,
        ge=1,
        description="Training images per camera the camera statistics are estimated from (a "
        "fixed random choice when a camera has more).",
    )

    @model_validator(mode="after")
    def _camera_norm_train_needs_camera_norm(self) -> ModelConfig:
        if self.camera_norm_train and not self.camera_norm:
            raise ValueError(
                "model.camera_norm_train=true needs model.camera_norm=true (the per-camera "
                "statistics that evaluation normalises with)"
            )
        return self


# ----------------------------------------------------------------------------------------------
# memory and losses
# ----------------------------------------------------------------------------------------------


class MemoryConfig(_Strict):
    """Per-image memory of global features: M_i <- a M_i + (1 - a) f_i, renormalised."""

    init: Literal["forward", "zeros"] = "forward"
    momentum_schedule: Literal["constant", "linear"] = Field(
        "linear", description="How the update momentum `a` grows over epochs."
    )
    momentum_start: float = Field(0.5, ge=0.0, lt=1.0)
    momentum_end: float = Field(0.9, ge=0.0, lt=1.0)


class InstanceLossConfig(_Strict):
    """Memory-based non-parametric classifier, L_E = -log p_ii."""

    enabled: bool = True
    temperature: float = Field(0.05, gt=0.0, le=10.0)
    weight: float = Field(1.0, ge=0.0)
    negatives: Literal["all", "same_camera"] = Field(
        "all",
        description="Slots in the softmax of L_E: every slot (the paper), or only the slots of "
        "the image's own camera, so that camera cues cannot lower L_E (images of unknown "
        "camera form one group).",
    )


class NeighbourPriorConfig(_Strict):
    """Neighbours for the first epochs of a run from scratch, from a hand-crafted descriptor
    instead of the memories (whose neighbours are random until the network has learnt
    something). GSL's credible sets (``loss.gsl.prior_epochs``) and PEDAL's nearest patches
    (``loss.pedal.prior_epochs``) can each take them; a prior that no enabled term reads, and
    prior epochs without a prior, are refused."""

    kind: Literal["none", "colour"] = Field(
        "none",
        description="'colour': HSV histograms of model.num_patches horizontal stripes of each "
        "training image (reid_core.data.colour), each camera's mean removed; 'none': no prior "
        "(the paper).",
    )
    topk: int = Field(5, ge=1, le=1000, description="k of GSL's mutual top-k on the prior.")
    threshold: float = Field(
        0.5,
        ge=-1.0,
        le=1.0,
        description="Least cosine of two camera-centred descriptors in GSL's credible sets.",
    )


class GSLConfig(_Strict):
    """Global similarity-based loss over credible neighbours."""

    enabled: bool = True
    threshold: float = Field(0.6, ge=-1.0, le=1.0)
    topk: int = Field(10, ge=1, le=1000)
    mutual: bool = True
    weighting: Literal["similarity", "uniform", "mmcl_squared"] = "similarity"
    neighbours: Literal["all", "other_cameras"] = Field(
        "all",
        description="Candidates for the credible set C_i: every slot (the paper), or only the "
        "slots of other cameras, whose matches re-ID is evaluated on.",
    )
    warmup_epochs: int = Field(5, ge=0)
    weight: float = Field(1.0, ge=0.0)
    prior_epochs: int = Field(
        0,
        ge=0,
        description="C_i comes from the prior (loss.prior.kind, which must then be set) in "
        "epochs [0, prior_epochs), whatever warmup_epochs says; then from the memory, once "
        "warmup_epochs have passed (GSL is 0 in between when warmup_epochs is later).",
    )


class PEDALConfig(_Strict):
    """Patch-level discriminative loss against the patch memory."""

    enabled: bool = True
    weight: float = Field(2.0, ge=0.0)
    scale: float = Field(15.0, gt=0.0, description="s in exp(-s d); 5 for DukeMTMC.")
    neighbours: int = Field(10, ge=1, le=1000)
    memory_momentum: float = Field(0.1, ge=0.0, le=1.0, description="Weight of the new feature.")
    warmup_epochs: int = Field(
        0,
        ge=0,
        description="PEDAL is 0 before this epoch (the patch memory is still updated), like GSL's "
        "warm-up: its neighbours K_i^p mean little while the features are random.",
    )
    prior_epochs: int = Field(
        0,
        ge=0,
        description="K_i^p is the k nearest stripes of the prior (loss.prior.kind, which must "
        "then be set) in epochs [0, prior_epochs), whatever warmup_epochs says; then from the "
        "patch memory, once warmup_epochs have passed (PEDAL is 0 in between when "
        "warmup_epochs is later).",
    )


class IPFLConfig(_Strict):
    """Image-level feature learning with agents and the cycle-ranking check."""

    enabled: bool = True
    weight: float = Field(1.0, ge=0.0)
    margin: float = Field(2.0, ge=0.0)
    agent_momentum: float = Field(0.1, ge=0.0, le=1.0, description="Weight of the new embedding.")
    cycle_k: int = Field(3, ge=1, le=100)
    max_candidates: int = Field(15, ge=1, le=1000)
    warmup_epochs: int = Field(
        0, ge=0, description="IPFL is 0 before this epoch (the agents are still updated)."
    )
    negatives: Literal["other_images", "other_clusters"] = Field(
        "other_images",
        description="Which batchmates may be an image's negative: any other image (the paper), "
        "or, with loss.objective=cluster_contrast, only images outside its pseudo-identity (the "
        "P x K sampler puts K images of each cluster in a batch).",
    )


class ClusterLossConfig(_Strict):
    """Cluster contrast L_cc over pseudo-identity centroids (reid_core.objective.losses.cluster_contrast),
    the global branch's objective with ``loss.objective=cluster_contrast``."""

    weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="tau of the InfoNCE.")
    momentum: float = Field(
        0.1, ge=0.0, le=1.0, description="Weight of the old centroid in its update (mu)."
    )
    update: Literal["mean", "hard"] = Field(
        "mean",
        description="'mean': every image of the batch updates its centroid; 'hard': only the "
        "cluster's image least similar to its centroid does.",
    )


class CameraProxyConfig(_Strict):
    """Camera-aware proxies (reid_core.objective.losses.camera_proxy): one centroid per (cluster, camera),
    an intra-camera and an inter-camera term beside L_cc. Needs every training image's camera."""

    enabled: bool = False
    intra_weight: float = Field(1.0, ge=0.0)
    inter_weight: float = Field(0.5, ge=0.0, description="lambda of L_inter.")
    temperature: float = Field(0.07, gt=0.0, le=10.0, description="b of both terms.")
    momentum: float = Field(0.2, ge=0.0, le=1.0, description="Weight of the old proxy (alpha).")
    hard_negatives: int = Field(50, ge=1, le=10_000, description="|N| of L_inter.")
    inter_from_epoch: int = Field(
        5, ge=0, description="L_inter is 0 before this epoch (the proxies are still updated)."
    )


class LossConfig(_Strict):
    """L = w_E L_E + w_GSL L_GSL + 2 L_PEDAL + 1 L_IPFL; each term can be switched off.

    With ``objective=cluster_contrast`` the global branch's terms are L_cc (``cluster``) and,
    with ``camera.enabled``, L_intra and L_inter instead of L_E and L_GSL (whose settings are
    then unused); the patch branch is the same.
    """

    objective: Literal["instance_memory", "cluster_contrast"] = Field(
        "instance_memory",
        description="The global branch's objective: the paper's instance memory with GSL, or "
        "cluster contrast on pseudo labels (the `cluster` section says how they are made).",
    )
    instance: InstanceLossConfig = InstanceLossConfig()
    gsl: GSLConfig = GSLConfig()
    pedal: PEDALConfig = PEDALConfig()
    ipfl: IPFLConfig = IPFLConfig()
    prior: NeighbourPriorConfig = NeighbourPriorConfig()
    cluster: ClusterLossConfig = ClusterLossConfig()
    camera: CameraProxyConfig = CameraProxyConfig()

    @property
    def clusters(self) -> bool:
        """Whether the run trains on pseudo labels (``objective=cluster_contrast``)."""
        return self.objective == "cluster_contrast"

    @property
    def gsl_on(self) -> bool:
        """Whether L_GSL is part of the objective at all."""
        return self.gsl.enabled and not self.clusters

    def gsl_uses_prior(self, epoch: int) -> bool:
        """Whether GSL's credible sets of ``epoch`` (0-based) come from the prior."""
        return self.gsl_on and self.prior.kind != "none" and epoch < self.gsl.prior_epochs

    def gsl_active(self, epoch: int) -> bool:
        """Whether L_GSL is on in ``epoch``: from the prior, or from the memory after warm-up."""
        return self.gsl_uses_prior(epoch) or (self.gsl_on and epoch >= self.gsl.warmup_epochs)

    def pedal_uses_prior(self, epoch: int) -> bool:
        """Whether PEDAL's neighbours of ``epoch`` come from the prior."""
        return self.pedal.enabled and self.prior.kind != "none" and epoch < self.pedal.prior_epochs

    def pedal_active(self, epoch: int) -> bool:
        """Whether L_PEDAL is on in ``epoch``: from the prior, or from the patch memory after
        warm-up."""
        return self.pedal_uses_prior(epoch) or (
            self.pedal.enabled and epoch >= self.pedal.warmup_epochs
        )

    def uses_prior(self, epoch: int) -> bool:
        """Whether any term reads the prior in ``epoch`` or later."""
        return self.gsl_uses_prior(epoch) or self.pedal_uses_prior(epoch)

    @model_validator(mode="after")
    def _prior_settings_used(self) -> LossConfig:
        """Refuses prior settings that would be ignored: prior epochs of an enabled term without a
        prior, or a prior that no enabled term reads."""
        terms: dict[str, GSLConfig | PEDALConfig] = {"pedal": self.pedal}
        if not self.clusters:
            terms = {"gsl": self.gsl, **terms}
        kind = self.prior.kind
        if kind == "none":
            for name, term in terms.items():
                if term.enabled and term.prior_epochs > 0:
                    raise ValueError(
                        f"loss.{name}.prior_epochs={term.prior_epochs} but "
                        "loss.prior.kind='none': set loss.prior.kind=colour, or "
                        f"loss.{name}.prior_epochs=0"
                    )
        elif not any(term.enabled and term.prior_epochs > 0 for term in terms.values()):
            settings = ", ".join(
                f"loss.{name}.prior_epochs={term.prior_epochs}"
                + ("" if term.enabled else f" with loss.{name}.enabled=false")
                for name, term in terms.items()
            )
            raise ValueError(
                f"loss.prior.kind={kind!r} but no loss term reads the prior ({settings}): set "
                "loss.gsl.prior_epochs or loss.pedal.prior_epochs of an enabled term, or "
                "loss.prior.kind=none"
            )
        return self

    @model_validator(mode="after")
    def _camera_proxies_need_clusters(self) -> LossConfig:
        if self.camera.enabled and not self.clusters:
            raise ValueError(
                "loss.camera.enabled=true needs pseudo labels: set "
                "loss.objective=cluster_contrast, or loss.camera.enabled=false"
            )
        return self

    @property
    def global_branch(self) -> bool:
        return self.clusters or self.instance.enabled or self.gsl.enabled

    @property
    def patch_branch(self) -> bool:
        return self.pedal.enabled or self.ipfl.enabled


# ----------------------------------------------------------------------------------------------
# optimisation
# ----------------------------------------------------------------------------------------------


class OptimConfig(_Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Learning rate of new layers.")
    backbone_lr: float = Field(0.01, ge=0.0, le=10.0, description="Learning rate of the trunk.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    nesterov: bool = False


class ScheduleConfig(_Strict):
    epochs: int = Field(60, ge=1, le=1000)
    milestones: list[int] = Field(default_factory=lambda: [40])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0, description="Linear LR warm-up, in epochs.")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on steps per epoch (smoke runs, time-boxed benchmarks)."
    )

    @field_validator("milestones")
    @classmethod
    def _milestones_sorted(cls, v: list[int]) -> list[int]:
        if v != sorted(v) or any(m < 1 for m in v):
            raise ValueError(f"milestones must be positive and increasing, got {v}")
        return v


# ----------------------------------------------------------------------------------------------
# evaluation, checkpoints, runtime
# ----------------------------------------------------------------------------------------------


class EvalConfig(_Strict):
    enabled: bool = True
    every_n_epochs: int = Field(5, ge=1)
    at_start: bool = Field(False, description="Evaluate the initial model before training.")
    feature: Literal["concat", "global"] = Field(
        "concat", description="Test feature: concat(global, patches) or global only."
    )
    distance: Literal["cosine", "euclidean"] = "cosine"
    flip: bool = Field(False, description="Average features of the image and its mirror.")
    camera_centred: bool = Field(
        False,
        description="Subtract each camera's mean feature (over query and gallery) before the "
        "distances, which removes what a feature says about the camera alone (its colour cast).",
    )
    rerank: bool = False
    rerank_k1: int = Field(20, ge=1)
    rerank_k2: int = Field(6, ge=1)
    rerank_lambda: float = Field(0.3, ge=0.0, le=1.0)
    rerank_max_memory_gb: float = Field(
        4.0, gt=0.0, description="Re-ranking refuses above this estimate of its dense matrices."
    )
    batch_size: int = Field(128, ge=1, le=4096)
    label_free: bool = Field(
        True,
        description="At every evaluation (the one before training too, with at_start), also on "
        "data without a query/gallery split: quality signals of the training images' features "
        "that read no label (label_free/mutual_nn_rate, label_free/similarity_margin, "
        "label_free/neighbour_stability; reid_core.evaluation.label_free). The features are the "
        "clustering's where loss.objective=cluster_contrast (extracted once for both), else the "
        "evaluation's (eval.feature, eval.flip).",
    )
    label_free_k: int = Field(
        10,
        ge=2,
        le=1000,
        description="k of the label-free signals: the similarity margin is to the k-th nearest "
        "other-camera image, the stability compares each image's k nearest images.",
    )


class CheckpointConfig(_Strict):
    every_n_epochs: int = Field(1, ge=1)
    keep_last: int = Field(2, ge=1, description="Older epoch checkpoints are deleted.")
    resume: str = Field(
        "auto", description="'auto' (last checkpoint in output_dir if any), 'none', or a file path."
    )


class DistributedConfig(_Strict):
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_s: int = Field(1800, ge=10)


class RuntimeConfig(_Strict):
    output_dir: Path = Path("outputs/run")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="float16 mixed precision on CUDA; ignored on the CPU.")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA.")
    cpu_bf16: bool | Literal["auto"] = Field(
        False,
        description="Training steps on the CPU in bfloat16 autocast with channels_last (2-3x "
        "faster per step on a CPU with AMX: bench/results/train_throughput*.md; emulated, and "
        "several times slower, on one without AMX or AVX512-BF16); 'auto': on where the CPU has "
        "either. Ignored on CUDA.",
    )
    seed: int = 0
    deterministic: bool = False
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (None: torch default)."
    )
    log_every_n_steps: int = Field(20, ge=1)
    progress_bar: bool = True


class ClusterConfig(_Strict):
    """How pseudo labels are made for ``loss.objective=cluster_contrast``
    (reid_core.clustering): at the start of every ``every_n_epochs``, features of all training
    images, their sparse k-reciprocal Jaccard distance and DBSCAN on it."""

    every_n_epochs: int = Field(1, ge=1)
    colour_epochs: int = Field(
        1,
        ge=0,
        description="Clusterings at epochs before this one cluster camera-centred colour "
        "stripes (reid_core.data.colour) instead of the network's features: from scratch the "
        "untrained network's neighbours are random. The memories always take the network's "
        "features.",
    )
    colour_weight: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="From cluster.colour_epochs on, cluster the network's features with the "
        "colour stripes beside them, weighted by this (each part camera-centred and of unit "
        "length; 0: the network's features alone). Early networks cluster a camera's images "
        "less purely than colour does; together they do better than either.",
    )
    k1: int = Field(30, ge=1, le=1000, description="k1 of the k-reciprocal sets.")
    knn: Literal["auto", "faiss", "exact"] = Field(
        "auto",
        description="Neighbour search of the Jaccard step: faiss (the GPU when it has one, the "
        "CPU index with a warning when that fails), exact (one pass over the cosine distances "
        "finds the neighbours and each row's farthest distance together), or auto (faiss where "
        "it sees a GPU, else exact: on a CPU the exact pass is the cheaper).",
    )
    k2: int = Field(6, ge=1, le=1000, description="k2 of the local query expansion.")
    eps: float | Literal["auto"] = Field(
        0.6,
        description="DBSCAN's eps on the Jaccard distance, or 'auto': chosen from the data at "
        "every clustering (eps_quantile) and logged.",
    )
    eps_quantile: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="eps=auto: this quantile of the images' distance to their min_samples-1-th "
        "nearest neighbour.",
    )
    min_samples: int = Field(4, ge=2, le=1000)
    camera_centred: bool = Field(
        True, description="Remove each camera's mean feature before the Jaccard distance."
    )
    scope: Literal["global", "per_camera"] = Field(
        "global",
        description="Cluster all images together, or each camera's images alone (every cluster "
        "one camera's: purer, for the intra-camera proxy term; reads the cameras).",
    )
    flip: bool = Field(True, description="Average each image's features with its mirror's.")
    outliers: Literal["drop", "instances"] = Field(
        "drop",
        description="Images DBSCAN leaves unclustered: out of the epoch ('drop'), or each its "
        "own cluster ('instances').",
    )
    max_cluster_fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="A clustering whose largest cluster holds more of the images is refused "
        "(warning; the previous labels are kept), as is one that finds no cluster.",
    )
    instances_per_cluster: int = Field(
        4, ge=1, le=64, description="K of the P x K sampler (data.batch_size = P K)."
    )
    sampler: Literal["cross_camera", "random"] = Field(
        "cross_camera",
        description="How the P x K sampler draws a cluster's K images: 'cross_camera' cycles "
        "through the cluster's cameras (it reads the cameras), 'random' ignores them.",
    )


class ExperimentConfig(_Strict):
    """The whole configuration of one training run."""

    name: str = "reid"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    memory: MemoryConfig = MemoryConfig()
    loss: LossConfig = LossConfig()
    cluster: ClusterConfig = ClusterConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _batch_of_whole_clusters(self) -> ExperimentConfig:
        k = self.cluster.instances_per_cluster
        if self.loss.clusters and self.data.batch_size % k:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not a multiple of "
                f"cluster.instances_per_cluster={k}: the P x K sampler fills a batch with whole "
                "clusters"
            )
        return self

    @model_validator(mode="after")
    def _cluster_negatives_need_clusters(self) -> ExperimentConfig:
        if self.loss.ipfl.negatives == "other_clusters" and not self.loss.clusters:
            raise ValueError(
                "loss.ipfl.negatives=other_clusters needs pseudo labels: set "
                f"loss.objective=cluster_contrast (got {self.loss.objective!r})"
            )
        return self

    @model_validator(mode="after")
    def _some_loss_enabled(self) -> ExperimentConfig:
        if not (self.loss.global_branch or self.loss.patch_branch):
            raise ValueError("every loss term is disabled: enable at least one of loss.*.enabled")
        return self


# ----------------------------------------------------------------------------------------------
# loading, overrides, dumping
# ----------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a plain dict; raise :class:`ConfigError` naming every bad key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into the key path and the value parsed as a YAML scalar/flow."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value {text!r} is not valid YAML ({exc})") from None
    return key.split("."), value


def _known_fields(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted overrides applied.

    Keys are checked against the pydantic models *before* validation so that a typo names the
    exact segment that does not exist (``loss.gls`` -> "unknown key 'gls' in loss").
    """
    out: dict[str, Any] = _deep_copy(raw)
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(k.split("."), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for path, value in items:
        model: type[BaseModel] | None = ExperimentConfig
        node = out
        for depth, part in enumerate(path):
            if model is not None:
                fields = _known_fields(model)
                if part not in fields:
                    where = ".".join(path[:depth]) or "the top level"
                    known = ", ".join(sorted(fields))
                    raise _override_error(path, f"unknown key {part!r} in {where} (known: {known})")
                annotation = fields[part].annotation
                model = (
                    annotation
                    if isinstance(annotation, type) and issubclass(annotation, BaseModel)
                    else None
                )
            elif depth < len(path):
                raise _override_error(path, f"{'.'.join(path[:depth])} is a value, not a section")
            if depth == len(path) - 1:
                node[part] = value
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


class ConfigAbout(_Strict):
    """A config file's ``about:`` header: what the file is for, not a setting."""

    purpose: str = Field(min_length=1, description="One line: what the file is for.")
    measured: str = Field(
        min_length=1,
        description="One line: what it was measured to give and where the runs are written up "
        "('not measured' when it was not).",
    )


#: The top-level key of the header in a config file.
ABOUT_KEY = "about"


def read_config_file(path: str | Path) -> tuple[ConfigAbout | None, dict[str, Any]]:
    """A YAML config file's header (None without one) and its settings, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
    header = loaded.pop(ABOUT_KEY, None)
    if header is None:
        return None, loaded
    try:
        return ConfigAbout.model_validate(header), loaded
    except ValidationError as err:
        raise ConfigError(
            _format_validation_error(err, f"the {ABOUT_KEY}: header of {path}")
        ) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> ExperimentConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        _, raw = read_config_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source += " + overrides"
    return validate_config(raw, source)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict (paths as strings, tuples as lists)."""
    return cfg.model_dump(mode="json")


def dump_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for experiment-tracker params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
