"""Built-in datasets (torchreid-style folder layouts), registered by name.

Every loader returns :class:`~reid_core.data.records.ReIDSplits` with absolute paths, the
identity label as found (never relabelled; training code does not read it) and 0-based cameras.
Folder-based splits are sorted by path so a folder always gives the same order; MSMT17's query and
gallery keep the order of their list files.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from reid_core.data.image_io import IMAGE_EXTENSIONS
from reid_core.data.records import UNKNOWN, ImageRecord, ReIDSplits
from reid_core.data.registry import BaseDataset, DatasetError, register_dataset
from reid_core.data.synthetic import generate_synthetic_market

__all__ = [
    "MSMT17",
    "DukeMTMC",
    "ImageFolder",
    "Market1501",
    "MarketFolder",
    "Synthetic",
    "parse_market_name",
    "read_market_layout",
]

_LOG = logging.getLogger("reid_core.data")

_MARKET_LAYOUT = """\
  <root>/bounding_box_train/  training images
  <root>/query/               query images
  <root>/bounding_box_test/   gallery images
  file names: PPPP_cCsS_FFFFFF_NN.jpg (PPPP: identity, -1 junk, 0 distractor; C: camera from 1)"""

_DUKE_LAYOUT = """\
  <root>/bounding_box_train/  training images
  <root>/query/               query images
  <root>/bounding_box_test/   gallery images
  file names: PPPP_cC_fFFFFFFF.jpg (PPPP: identity; C: camera from 1)"""

_MSMT_LAYOUT = """\
  <root>/train/               training images (<pid>/<file>.jpg)
  <root>/test/                query and gallery images (<pid>/<file>.jpg)
  <root>/list_train.txt       lines "relpath label", relpath below train/
  <root>/list_val.txt         lines "relpath label", relpath below train/
  <root>/list_query.txt       lines "relpath label", relpath below test/
  <root>/list_gallery.txt     lines "relpath label", relpath below test/
  file names: PPPP_NNN_CC_<date>_<frame>_<n>.jpg (CC: camera from 1)"""

_IMAGE_FOLDER_LAYOUT = """\
  <root>/**/*.{jpg,jpeg,png,bmp,webp}   any images, searched recursively (hidden folders skipped)
  camera (optional): c<N> or cam<N> in the file name, else an immediate sub-folder named
  cam*/c<N> (e.g. <root>/cam_a/x.jpg, <root>/c2/x.jpg), else unknown"""

# ---------------------------------------------------------------------------------------------
# Market-1501 / DukeMTMC file names
# ---------------------------------------------------------------------------------------------

# "0002_c1s1_000451_03.jpg" (Market), "-1_c1s1_..." (junk), "0001_c2_f0046182.jpg" (Duke)
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s\d+)?_")


def parse_market_name(name: str) -> tuple[int, int] | None:
    """``(pid, 0-based camid)`` from a Market/Duke file name, or ``None`` if it does not match."""
    m = _MARKET_NAME.match(name)
    if m is None:
        return None
    cam = int(m.group(2))
    if cam < 1:
        return None
    return int(m.group(1)), cam - 1


def _list_images(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path)
            for e in it
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )


def _read_market_dir(folder: Path, drop_distractors: bool = False) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    unparsed: list[str] = []
    junk = distractors = 0
    for path in _list_images(folder):
        parsed = parse_market_name(path.name)
        if parsed is None:
            unparsed.append(path.name)
            continue
        pid, camid = parsed
        if pid == -1:
            junk += 1
            continue
        if pid == 0 and drop_distractors:
            distractors += 1
            continue
        records.append(ImageRecord(path=path, pid=pid, camid=camid))
    if unparsed:
        more = f" and {len(unparsed) - 10} more" if len(unparsed) > 10 else ""
        _LOG.warning(
            "%s: skipped %d image(s) not named PPPP_cC...: %s%s",
            folder,
            len(unparsed),
            ", ".join(unparsed[:10]),
            more,
        )
    if junk or distractors:
        _LOG.debug("%s: dropped %d junk and %d distractor image(s)", folder, junk, distractors)
    if not records:
        raise DatasetError(
            f"{folder} holds no usable image named like PPPP_cC..._*.jpg (pid >= 0, camera >= 1)"
            + (f"; found e.g. {unparsed[0]!r}" if unparsed else "")
        )
    return records


def read_market_layout(root: Path) -> ReIDSplits:
    """Read a Market-layout folder: junk (pid -1) dropped everywhere, distractors (pid 0) kept
    in the gallery (and dropped from train/query, where they have no meaning)."""
    return ReIDSplits(
        train=_read_market_dir(root / "bounding_box_train", drop_distractors=True),
        query=_read_market_dir(root / "query", drop_distractors=True),
        gallery=_read_market_dir(root / "bounding_box_test"),
        root=root,
    )


class _MarketLayout(BaseDataset):
    """Shared reader of the Market layout (train/query/gallery folders, names PPPP_cC...)."""

    layout = _MARKET_LAYOUT
    required = ("bounding_box_train", "query", "bounding_box_test")

    def load(self) -> ReIDSplits:
        assert self.root is not None
        return read_market_layout(self.root)


@register_dataset("market1501")
class Market1501(_MarketLayout):
    """Market-1501 (Zheng et al., ICCV 2015): 1,501 identities, 6 cameras.

    Layout (``root`` may also be the folder *holding* ``Market-1501-v15.09.15/``)::

        root/bounding_box_train/  12,936 images, 751 identities
        root/query/               3,368 images
        root/bounding_box_test/   19,732 images (incl. distractors, pid 0, and junk, pid -1)

    File names ``PPPP_cCsS_FFFFFF_NN.jpg``: PPPP identity (``-1`` junk: dropped at load; ``0``
    distractor: kept in the gallery), C camera (1-based in names, stored 0-based), S sequence,
    F frame, NN box index.
    """

    nested = ("Market-1501-v15.09.15", "market1501", "Market-1501")


@register_dataset("market_folder")
class MarketFolder(_MarketLayout):
    """Any folder in the Market-1501 layout (same reader as :class:`Market1501`).

    Layout::

        root/bounding_box_train/  training images
        root/query/               query images
        root/bounding_box_test/   gallery images

    File names start with ``PPPP_cC`` (identity, 1-based camera), e.g. ``0001_c1s1_000000_00.jpg``;
    pid ``-1`` is junk (dropped), pid ``0`` a distractor (kept in the gallery).
    """


@register_dataset("dukemtmc")
class DukeMTMC(_MarketLayout):
    """DukeMTMC-reID (Ristani et al. 2016; Zheng et al. 2017): 1,404 identities, 8 cameras.

    The DukeMTMC data set was withdrawn by its owners in 2019; it is supported here only to
    reproduce published results. Do not use it for new work.

    Layout (``root`` may also be the folder *holding* ``DukeMTMC-reID/``)::

        root/bounding_box_train/  16,522 images, 702 identities
        root/query/               2,228 images
        root/bounding_box_test/   17,661 images

    File names ``PPPP_cC_fFFFFFFF.jpg``: PPPP identity, C camera (1-based, stored 0-based),
    F frame.
    """

    layout = _DUKE_LAYOUT
    nested = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid")


# ---------------------------------------------------------------------------------------------
# MSMT17
# ---------------------------------------------------------------------------------------------


def _msmt_camera(relpath: str, list_file: Path, line_no: int) -> int:
    fields = Path(relpath).name.split("_")
    try:
        cam = int(fields[2])
    except (IndexError, ValueError):
        raise DatasetError(
            f"{list_file}:{line_no}: cannot read the camera from {relpath!r}; expected a file name "
            "PPPP_NNN_CC_... (CC: camera from 1)"
        ) from None
    if cam < 1:
        raise DatasetError(f"{list_file}:{line_no}: camera {cam} in {relpath!r} is not >= 1")
    return cam - 1


def _read_msmt_list(root: Path, list_name: str, image_dir: str) -> list[ImageRecord]:
    list_file = root / list_name
    records: list[ImageRecord] = []
    with list_file.open(encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DatasetError(f"{list_file}:{line_no}: expected 'relpath label', got {line!r}")
            relpath, label = parts
            try:
                pid = int(label)
            except ValueError:
                raise DatasetError(
                    f"{list_file}:{line_no}: label {label!r} is not an integer"
                ) from None
            camid = _msmt_camera(relpath, list_file, line_no)
            first = Path(relpath).parts[0]
            base = root if first == image_dir else root / image_dir
            records.append(ImageRecord(path=base / relpath, pid=pid, camid=camid))
    if not records:
        raise DatasetError(f"{list_file} lists no image")
    return records


@register_dataset("msmt17")
class MSMT17(BaseDataset):
    """MSMT17 (Wei et al., CVPR 2018): 4,101 identities, 15 cameras.

    Layout (``root`` may also be the folder *holding* ``MSMT17_V1/``)::

        root/train/               training images, root/train/<pid>/<file>.jpg
        root/test/                query and gallery images
        root/list_train.txt       "relpath label" lines; relpath below train/
        root/list_val.txt         "relpath label" lines; relpath below train/
        root/list_query.txt       "relpath label" lines; relpath below test/
        root/list_gallery.txt     "relpath label" lines; relpath below test/

    File names ``PPPP_NNN_CC_<date><time>_<frame>_<n>.jpg``: the camera is the third field
    (1-based, stored 0-based). Labels are used as given (train and test labels each start at 0).
    ``include_val`` (default True, as is usual) adds list_val.txt to the train split.
    """

    layout = _MSMT_LAYOUT
    required = (
        "train",
        "test",
        "list_train.txt",
        "list_val.txt",
        "list_query.txt",
        "list_gallery.txt",
    )
    nested = ("MSMT17_V1", "MSMT17", "msmt17")

    def __init__(self, root: Path | None, include_val: bool = True) -> None:
        super().__init__(root)
        self.include_val = include_val

    def load(self) -> ReIDSplits:
        assert self.root is not None
        train = _read_msmt_list(self.root, "list_train.txt", "train")
        if self.include_val:
            train += _read_msmt_list(self.root, "list_val.txt", "train")
        return ReIDSplits(
            train=sorted(train, key=lambda r: r.path),
            query=_read_msmt_list(self.root, "list_query.txt", "test"),
            gallery=_read_msmt_list(self.root, "list_gallery.txt", "test"),
            root=self.root,
        )


# ---------------------------------------------------------------------------------------------
# unlabeled folders
# ---------------------------------------------------------------------------------------------

_CAM_IN_NAME = re.compile(r"(?<![a-z0-9])(?:cam|c)(\d+)", re.IGNORECASE)
_CAM_DIR = re.compile(r"^(?:cam.*|c\d+)$", re.IGNORECASE)


def _walk_images(root: Path) -> Iterator[Path]:
    """Images below ``root``; links are followed only while they stay inside ``root``."""
    top = root.resolve()
    seen: set[Path] = set()  # real folders visited: symlink loops
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or not real.is_relative_to(top):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            if path.is_symlink() and not path.resolve().is_relative_to(top):
                continue  # a link out of the dataset folder is not part of the dataset
            yield path


def _camera_key(root: Path, path: Path) -> tuple[int, int, str] | None:
    m = _CAM_IN_NAME.search(path.stem)
    if m is not None:
        return (0, int(m.group(1)), "")
    rel = path.relative_to(root).parts
    if len(rel) >= 2 and _CAM_DIR.match(rel[0]):
        digits = re.search(r"\d+", rel[0])
        return (1, int(digits.group()) if digits else -1, rel[0])
    return None


@register_dataset("image_folder")
class ImageFolder(BaseDataset):
    """An unlabeled folder of person crops (train split only; no query/gallery, no identities).

    Layout::

        root/**/*.{jpg,jpeg,png,bmp,webp}   searched recursively; hidden files/folders skipped

    The camera is optional: read from ``c<N>``/``cam<N>`` in the file name (``0001_c3s1.jpg``,
    ``cam2_0001.png``), else from the name of an immediate sub-folder ``cam*``/``c<N>``
    (``root/cam_a/x.jpg``, ``root/c2/x.jpg``), else unknown (-1). Camera labels found are mapped to
    0..K-1 in sorted order (numbers by value). All pids are -1.
    """

    layout = _IMAGE_FOLDER_LAYOUT

    def load(self) -> ReIDSplits:
        assert self.root is not None
        paths = list(_walk_images(self.root))
        if not paths:
            raise DatasetError(
                f"{self.root} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}), searched "
                "recursively; set data.root to a folder of person crops"
            )
        keys = [_camera_key(self.root, p) for p in paths]
        cam_ids = {k: i for i, k in enumerate(sorted({k for k in keys if k is not None}))}
        records = [
            ImageRecord(path=p, pid=UNKNOWN, camid=UNKNOWN if k is None else cam_ids[k])
            for p, k in zip(paths, keys, strict=True)
        ]
        return ReIDSplits(train=records, root=self.root)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------


@register_dataset("synthetic")
class Synthetic(BaseDataset):
    """A generated Market-layout data set of learnable cartoon people (tests, smoke runs).

    ``root`` is a cache folder (default: ``<tmp>/reid_core_synthetic``); the images are written once
    to ``root/synthetic_i<ids>_n<per id>_c<cams>_<h>x<w>_s<seed>/`` (see
    :func:`reid_core.data.synthetic.generate_synthetic_market`) and then read like Market1501::

        <folder>/bounding_box_train/  PPPP_cCs1_FFFFFF_00.jpg   train identities 1..N
        <folder>/query/               first image per (identity, camera), for up to 2 cameras
        <folder>/bounding_box_test/   the other images of the test identities
    """

    layout = "  any writable folder (the generated data set is cached below it)"
    needs_root = False

    def __init__(
        self,
        root: Path | None,
        num_identities: int = 24,
        images_per_identity: int = 8,
        num_cameras: int = 3,
        height: int = 128,
        width: int = 64,
        seed: int = 0,
        test_identities: int | None = None,
    ) -> None:
        cache = Path(root).expanduser().absolute() if root is not None else None
        if cache is None:
            cache = Path(tempfile.gettempdir()) / "reid_core_synthetic"
        if cache.exists() and not cache.is_dir():
            raise DatasetError(f"synthetic dataset root {cache} exists and is not a folder")
        self.root = cache
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.num_cameras = num_cameras
        self.height = height
        self.width = width
        self.seed = seed
        self.test_identities = test_identities

    def folder(self) -> Path:
        """The generated folder below the cache root (one per set of parameters)."""
        assert self.root is not None
        test = "" if self.test_identities is None else f"_t{self.test_identities}"
        return self.root / (
            f"synthetic_i{self.num_identities}_n{self.images_per_identity}_c{self.num_cameras}"
            f"_{self.height}x{self.width}_s{self.seed}{test}"
        )

    def load(self) -> ReIDSplits:
        folder = generate_synthetic_market(
            self.folder(),
            num_identities=self.num_identities,
            images_per_identity=self.images_per_identity,
            num_cameras=self.num_cameras,
            height=self.height,
            width=self.width,
            seed=self.seed,
            test_identities=self.test_identities,
        )
        return read_market_layout(folder)
