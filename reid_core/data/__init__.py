"""The data layer: dataset folders -> image records -> checked images -> two-view batches.

Typical use::

    splits = build_splits(cfg.data)                      # or build_dataset(name, root, **options)
    splits, bad = scan_splits(splits, cfg.data.max_bad_fraction)
    loader = build_train_loader(splits.train, cfg.data, seed=cfg.runtime.seed)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for view0, view1, index in loader: ...

Registered datasets (``data.dataset``): market1501, dukemtmc, msmt17, market_folder,
image_folder, synthetic; see :mod:`reid_core.data.datasets` for each folder layout.
"""

from reid_core.data.datasets import (
    MSMT17,
    DukeMTMC,
    ImageFolder,
    Market1501,
    MarketFolder,
    Synthetic,
    parse_market_name,
    read_market_layout,
)
from reid_core.data.image_io import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    TooManyCorruptImagesError,
    check_image,
    load_image,
    scan_images,
    scan_splits,
)
from reid_core.data.loaders import (
    EvalSet,
    TrainSet,
    build_eval_loader,
    build_train_loader,
    seed_worker,
)
from reid_core.data.records import UNKNOWN, ImageRecord, ReIDSplits, split_stats
from reid_core.data.registry import (
    DATASETS,
    BaseDataset,
    DatasetError,
    build_dataset,
    build_splits,
    dataset_names,
    register_dataset,
)
from reid_core.data.samplers import ClusterSampler, EpochShuffleSampler
from reid_core.data.synthetic import generate_synthetic_market
from reid_core.data.transforms import (
    AspectPreservingRandomResizedCrop,
    TwoViewTransform,
    build_test_transform,
    build_train_transform,
)

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MSMT17",
    "UNKNOWN",
    "AspectPreservingRandomResizedCrop",
    "BaseDataset",
    "ClusterSampler",
    "CorruptImageError",
    "DatasetError",
    "DukeMTMC",
    "EpochShuffleSampler",
    "EvalSet",
    "ImageFolder",
    "ImageRecord",
    "Market1501",
    "MarketFolder",
    "ReIDSplits",
    "Synthetic",
    "TooManyCorruptImagesError",
    "TrainSet",
    "TwoViewTransform",
    "build_dataset",
    "build_eval_loader",
    "build_splits",
    "build_test_transform",
    "build_train_loader",
    "build_train_transform",
    "check_image",
    "dataset_names",
    "generate_synthetic_market",
    "load_image",
    "parse_market_name",
    "read_market_layout",
    "register_dataset",
    "scan_images",
    "scan_splits",
    "seed_worker",
    "split_stats",
]
