"""Dataset registry: a name (``data.dataset``) -> a dataset class that reads a root folder.

Every dataset class derives from :class:`BaseDataset`, declares the sub-paths its root must hold
(``required``) and a human-readable ``layout``, and returns :class:`ReIDSplits` from ``load()``.
:func:`build_dataset` checks the root *before* reading anything so a wrong path fails at once with
a message naming the missing folder and the expected layout.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from reid_core.data.records import ReIDSplits

if TYPE_CHECKING:
    from reid_core.config import DataConfig

__all__ = [
    "DATASETS",
    "BaseDataset",
    "DatasetError",
    "build_dataset",
    "build_splits",
    "dataset_names",
    "register_dataset",
]


class DatasetError(ValueError):
    """A dataset that cannot be used: unknown name, bad root, bad layout, too many bad images."""


class BaseDataset(ABC):
    """Base of every registered dataset.

    Subclasses set ``required`` (paths relative to the root that must exist), ``layout`` (shown in
    errors) and optionally ``nested`` (folder names the data may sit in below the given root, e.g.
    ``Market-1501-v15.09.15``), and implement :meth:`load`. ``needs_root = False`` marks datasets
    that can make up their own root (``synthetic``).
    """

    name: ClassVar[str] = ""
    layout: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    nested: ClassVar[tuple[str, ...]] = ()
    needs_root: ClassVar[bool] = True

    def __init__(self, root: Path | None) -> None:
        self.root: Path | None = self.locate(root) if root is not None else None
        if self.root is None and self.needs_root:
            raise DatasetError(
                f"dataset {self.name!r} needs a root folder: set data.root to the folder laid out "
                f"as\n{self.layout}"
            )

    @classmethod
    def locate(cls, root: Path) -> Path:
        """Check ``root`` (or one of its ``nested`` folders) holds every ``required`` path."""
        root = Path(root).expanduser().absolute()
        if not root.exists():
            raise DatasetError(
                f"dataset root {root} does not exist (dataset {cls.name!r}); set data.root to the "
                f"folder laid out as\n{cls.layout}"
            )
        if not root.is_dir():
            raise DatasetError(
                f"dataset root {root} is not a folder (dataset {cls.name!r}); set data.root to "
                f"the folder laid out as\n{cls.layout}"
            )
        if not cls.required:
            return root
        for candidate in (root, *(root / n for n in cls.nested)):
            if all((candidate / r).exists() for r in cls.required):
                return candidate
        missing = [r for r in cls.required if not (root / r).exists()]
        also = f" (nor in {', '.join(cls.nested)}/ below it)" if cls.nested else ""
        raise DatasetError(
            f"dataset root {root} has no {missing[0]}{also}, needed by dataset {cls.name!r} "
            f"(missing: {', '.join(missing)}); expected layout:\n{cls.layout}"
        )

    @abstractmethod
    def load(self) -> ReIDSplits:
        """Read the folder and return the splits (paths, pids, 0-based cameras)."""


#: Registry name -> dataset class. Filled by :func:`register_dataset`; the built-in datasets
#: (:mod:`reid_core.data.datasets`) register themselves when the package imports them.
DATASETS: dict[str, type[BaseDataset]] = {}

_D = TypeVar("_D", bound=type[BaseDataset])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_dataset(name: str) -> Callable[[_D], _D]:
    """Class decorator: make a :class:`BaseDataset` subclass available as ``name``."""
    key = _normalise(name)

    def decorate(cls: _D) -> _D:
        if not (isinstance(cls, type) and issubclass(cls, BaseDataset)):
            raise TypeError(
                f"@register_dataset({name!r}) needs a BaseDataset subclass, got {cls!r}"
            )
        if key in DATASETS and DATASETS[key] is not cls:
            raise ValueError(
                f"dataset name {key!r} is already registered by {DATASETS[key].__qualname__}"
            )
        cls.name = key
        DATASETS[key] = cls
        return cls

    return decorate


def dataset_names() -> list[str]:
    """Sorted registry names."""
    return sorted(DATASETS)


def build_dataset(name: str, root: Path | str | None, **kwargs: Any) -> ReIDSplits:
    """Read dataset ``name`` from ``root``; ``kwargs`` are the dataset's own options.

    Raises :class:`DatasetError` for an unknown name (listing the known ones), an unknown option,
    a missing root, or a root without the expected sub-folders.
    """
    key = _normalise(name)
    cls = DATASETS.get(key)
    if cls is None:
        raise DatasetError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))} "
            "(set data.dataset to one of them)"
        )
    try:
        inspect.signature(cls.__init__).bind(None, root, **kwargs)
    except TypeError:
        allowed = [
            p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "root")
        ]
        raise DatasetError(
            f"dataset {key!r} does not take option(s) {sorted(kwargs)}; its options: "
            f"{', '.join(allowed) or 'none'}"
        ) from None
    dataset = cls(Path(root) if root is not None else None, **kwargs)
    splits = dataset.load()
    splits.name = key
    return splits


def _dataset_options(cfg: DataConfig, name: str) -> dict[str, Any]:
    if _normalise(name) == "synthetic":
        return {
            "num_identities": cfg.synthetic_identities,
            "images_per_identity": cfg.synthetic_images_per_identity,
            "seed": cfg.synthetic_seed,
        }
    return {}


def build_splits(cfg: DataConfig) -> ReIDSplits:
    """Splits for a run: ``train`` from ``data.dataset``/``data.root``; ``query``/``gallery``
    from ``data.eval_dataset``/``data.eval_root`` when set, else from the same dataset."""
    splits = build_dataset(cfg.dataset, cfg.root, **_dataset_options(cfg, cfg.dataset))
    eval_name = cfg.eval_dataset
    eval_root = cfg.eval_root
    if eval_name is None and eval_root is None:
        return splits
    eval_name = eval_name or cfg.dataset
    eval_root = eval_root if eval_root is not None else cfg.root
    other = build_dataset(eval_name, eval_root, **_dataset_options(cfg, eval_name))
    return ReIDSplits(
        train=splits.train,
        query=other.query,
        gallery=other.gallery,
        name=f"{splits.name}->{other.name}",
        root=splits.root,
    )
