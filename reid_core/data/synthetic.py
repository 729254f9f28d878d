"""A small, learnable, Market-1501-layout data set of drawn people, for tests and smoke runs.

Each identity wears its own clothes: an upper-body colour, a lower-body colour and a pattern
(plain, stripes or checks) on the torso, plus skin, hair and shoe colours and a build. Each
camera has its own background palette, colour cast and brightness. Each image jitters the scale
and position of the person and the pose of arms and legs, draws a cluttered background, may put
an occluding rectangle in front, blurs a little and adds noise. Same seed, same bytes.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from reid_core.data.registry import DatasetError

__all__ = ["COMPLETE_MARKER", "PARAMS_FILE", "generate_synthetic_market"]

#: Written last: a folder without it is half-written and is regenerated.
COMPLETE_MARKER = ".complete"
#: Written first: marks a folder as generated here (and safe to replace).
PARAMS_FILE = "SYNTHETIC.json"
_FORMAT_VERSION = 1

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Identity:
    upper: RGB
    lower: RGB
    pattern: str  # plain | stripes | checks
    pattern_colour: RGB
    pattern_period: float  # share of the person's height
    skin: RGB
    hair: RGB
    shoes: RGB
    build: float  # torso width factor
    bag: RGB | None


@dataclass(frozen=True)
class _Camera:
    cast: tuple[float, float, float]
    brightness: float
    wall: RGB
    floor: RGB


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([k & 0xFFFFFFFF for k in key])


def _make_identity(seed: int, pid: int) -> _Identity:
    rng = _rng(seed, 1, pid)
    offset = float(_rng(seed, 0).random())
    # Golden-ratio hue sequences spread the clothing hues of consecutive identities apart.
    upper = _hsv(offset + pid * 0.618034, rng.uniform(0.55, 1.0), rng.uniform(0.45, 0.95))
    lower_hue = offset + 0.5 + pid * 0.381966 + rng.uniform(-0.05, 0.05)
    if rng.random() < 0.25:  # dark trousers
        lower = _hsv(lower_hue, rng.uniform(0.2, 0.6), rng.uniform(0.12, 0.3))
    else:
        lower = _hsv(lower_hue, rng.uniform(0.4, 0.9), rng.uniform(0.35, 0.9))
    pattern = ("plain", "stripes", "checks")[pid % 3]
    pattern_colour = (
        (245, 245, 240) if sum(upper) < 380 else (25, 25, 30)
    )  # contrasting stripes/checks
    skin_v = rng.uniform(0.35, 0.95)
    skin = _hsv(rng.uniform(0.03, 0.09), rng.uniform(0.3, 0.6), skin_v)
    hair = _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.6))
    shoes = _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.9))
    bag = (
        _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.8))
        if rng.random() < 0.4
        else None
    )
    return _Identity(
        upper=upper,
        lower=lower,
        pattern=pattern,
        pattern_colour=pattern_colour,
        pattern_period=float(rng.uniform(0.05, 0.09)),
        skin=skin,
        hair=hair,
        shoes=shoes,
        build=float(rng.uniform(0.85, 1.15)),
        bag=bag,
    )


def _make_camera(seed: int, cam: int) -> _Camera:
    rng = _rng(seed, 2, cam)
    cast = tuple(float(c) for c in rng.uniform(0.8, 1.2, size=3))
    return _Camera(
        cast=(cast[0], cast[1], cast[2]),
        brightness=float(rng.uniform(0.75, 1.2)),
        wall=_hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.8)),
        floor=_hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.25, 0.6)),
    )


def _jitter(rng: np.random.Generator, colour: RGB, amount: float) -> RGB:
    d = rng.normal(0.0, amount, size=3)
    r, g, b = (int(np.clip(c + x, 0, 255)) for c, x in zip(colour, d, strict=True))
    return (r, g, b)


def _background(rng: np.random.Generator, cam: _Camera, height: int, width: int) -> Image.Image:
    img = Image.new("RGB", (width, height), _jitter(rng, cam.wall, 12))
    draw = ImageDraw.Draw(img)
    horizon = int(height * rng.uniform(0.55, 0.75))
    draw.rectangle((0, horizon, width, height), fill=_jitter(rng, cam.floor, 12))
    for _ in range(int(rng.integers(6, 12))):  # clutter: signs, windows, other objects
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.05, 0.35) * height
        colour = _hsv(rng.random(), rng.uniform(0.0, 0.7), rng.uniform(0.15, 0.95))
        if rng.random() < 0.3:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    return img


def _person(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    ident: _Identity,
    height: int,
    width: int,
) -> None:
    ph = height * rng.uniform(0.78, 0.95)  # person height in pixels
    cx = width * (0.5 + rng.uniform(-0.08, 0.08))
    top = rng.uniform(0.0, height - ph) if height > ph else 0.0
    head_h, torso_h, legs_h = 0.14 * ph, 0.36 * ph, 0.44 * ph
    torso_w = 0.27 * ph * ident.build * rng.uniform(0.93, 1.07)
    head_w = 0.11 * ph
    y_head, y_torso = top, top + head_h
    y_legs = y_torso + torso_h
    y_feet = y_legs + legs_h
    tl, tr = cx - torso_w / 2, cx + torso_w / 2

    # legs (two, with a random stride), shoes
    stride = rng.uniform(-0.08, 0.08) * ph
    leg_w = torso_w * 0.42
    for sign in (-1.0, 1.0):
        x = cx + sign * torso_w * 0.22 + (stride if sign > 0 else -stride) * 0.5
        draw.polygon(
            [
                (cx + sign * torso_w * 0.25 - leg_w / 2, y_legs),
                (cx + sign * torso_w * 0.25 + leg_w / 2, y_legs),
                (x + leg_w * 0.4, y_feet),
                (x - leg_w * 0.4, y_feet),
            ],
            fill=_jitter(rng, ident.lower, 6),
        )
        draw.rectangle(
            (x - leg_w * 0.5, y_feet - 0.02 * ph, x + leg_w * 0.5, y_feet + 0.03 * ph),
            fill=ident.shoes,
        )
    # arms (sleeves in the upper colour, hands in skin)
    swing = rng.uniform(-0.06, 0.06) * ph
    arm_w = 0.07 * ph
    for sign in (-1.0, 1.0):
        shoulder = tl if sign < 0 else tr
        hand_x = shoulder + sign * arm_w * 0.6 + (swing if sign > 0 else -swing)
        hand_y = y_torso + torso_h * 0.95
        draw.polygon(
            [
                (shoulder, y_torso + 0.02 * ph),
                (shoulder + sign * arm_w, y_torso + 0.04 * ph),
                (hand_x + arm_w / 2, hand_y),
                (hand_x - arm_w / 2, hand_y),
            ],
            fill=_jitter(rng, ident.upper, 6),
        )
        draw.ellipse(
            (hand_x - arm_w / 2, hand_y - 1, hand_x + arm_w / 2, hand_y + arm_w), fill=ident.skin
        )
    # torso with its pattern
    draw.rectangle((tl, y_torso, tr, y_legs), fill=_jitter(rng, ident.upper, 6))
    period = max(2.0, ident.pattern_period * ph)
    if ident.pattern == "stripes":
        y = y_torso + period / 2
        while y < y_legs:
            draw.rectangle((tl, y, tr, min(y + period / 2, y_legs)), fill=ident.pattern_colour)
            y += period
    elif ident.pattern == "checks":
        row = 0
        y = y_torso
        while y < y_legs:
            x = tl + (period if row % 2 else 0.0)
            while x < tr:
                draw.rectangle(
                    (x, y, min(x + period, tr), min(y + period, y_legs)),
                    fill=ident.pattern_colour,
                )
                x += 2 * period
            y += period
            row += 1
    if ident.bag is not None:  # a shoulder bag on one side
        side = tl - 0.04 * ph if rng.random() < 0.5 else tr - 0.06 * ph
        draw.rectangle(
            (side, y_torso + torso_h * 0.45, side + 0.1 * ph, y_torso + torso_h * 0.8),
            fill=ident.bag,
        )
    # head and hair
    draw.ellipse((cx - head_w / 2, y_head, cx + head_w / 2, y_head + head_h), fill=ident.skin)
    draw.chord(
        (cx - head_w / 2, y_head - 1, cx + head_w / 2, y_head + head_h * 0.8),
        start=180,
        end=360,
        fill=ident.hair,
    )


def _render(
    seed: int, pid: int, index: int, ident: _Identity, cam: _Camera, height: int, width: int
) -> bytes:
    rng = _rng(seed, 3, pid, index)
    img = _background(rng, cam, height, width)
    draw = ImageDraw.Draw(img)
    _person(draw, rng, ident, height, width)
    if rng.random() < 0.25:  # an occluder (a pole, a bin, another passer-by) in front
        w = rng.uniform(0.2, 0.6) * width
        h = rng.uniform(0.15, 0.4) * height
        x0 = rng.uniform(-0.1, 1.0) * width - w / 2
        y0 = rng.uniform(0.2, 1.0) * height - h / 2
        colour = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.9))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
    arr = np.asarray(img, dtype=np.float32)
    gain = np.asarray(cam.cast, dtype=np.float32) * cam.brightness * rng.uniform(0.9, 1.1)
    arr = arr * gain + rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    radius = float(rng.uniform(0.0, 1.0))
    if radius > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    buf = BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _query_picks(images: Sequence[tuple[int, int]], pid: int) -> set[int]:
    """Indices (into ``images``, a list of (frame, cam)) that go to the query.

    The first image per camera, for up to two cameras per identity, and only when the identity
    keeps a gallery image in *another* camera (Market protocol ignores same-camera matches).
    """
    cams = sorted({c for _, c in images})
    if len(cams) < 2:
        return set()
    start = pid % len(cams)
    order = cams[start:] + cams[:start]
    picks: set[int] = set()
    for cam in order[:2]:
        first = next(i for i, (_, c) in enumerate(images) if c == cam)
        rest = [c for i, (_, c) in enumerate(images) if i != first and i not in picks]
        if any(c != cam for c in rest):
            picks.add(first)
    return picks


def _validate(
    num_identities: int,
    images_per_identity: int,
    num_cameras: int,
    height: int,
    width: int,
    test_identities: int,
) -> None:
    checks = [
        (num_identities >= 1, f"num_identities must be >= 1, got {num_identities}"),
        (test_identities >= 1, f"test_identities must be >= 1, got {test_identities}"),
        (
            num_identities + test_identities <= 9999,
            "num_identities + test_identities must be <= 9999 (4-digit Market ids), got "
            f"{num_identities + test_identities}",
        ),
        (images_per_identity >= 2, f"images_per_identity must be >= 2, got {images_per_identity}"),
        (2 <= num_cameras <= 9, f"num_cameras must be 2..9, got {num_cameras}"),
        (16 <= height <= 1024, f"height must be 16..1024, got {height}"),
        (8 <= width <= 512, f"width must be 8..512, got {width}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DatasetError(f"synthetic data set: {message}")


def _read_params(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, params: dict[str, Any]) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and _read_params(folder) == params


def _write_dataset(folder: Path, params: dict[str, Any]) -> None:
    seed = int(params["seed"])
    n_train, n_test = int(params["num_identities"]), int(params["test_identities"])
    per_id, n_cams = int(params["images_per_identity"]), int(params["num_cameras"])
    height, width = int(params["height"]), int(params["width"])
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (folder / sub).mkdir(parents=True)
    (folder / PARAMS_FILE).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n")
    cameras = [_make_camera(seed, c) for c in range(n_cams)]
    for pid in range(1, n_train + n_test + 1):
        ident = _make_identity(seed, pid)
        images = [(k, (k + pid) % n_cams) for k in range(per_id)]
        picks = _query_picks(images, pid) if pid > n_train else set()
        for i, (frame, cam) in enumerate(images):
            if pid <= n_train:
                sub = "bounding_box_train"
            else:
                sub = "query" if i in picks else "bounding_box_test"
            data = _render(seed, pid, frame, ident, cameras[cam], height, width)
            (folder / sub / f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.jpg").write_bytes(data)
    (folder / COMPLETE_MARKER).write_text("ok\n")


def generate_synthetic_market(
    root: Path,
    num_identities: int = 24,
    images_per_identity: int = 8,
    num_cameras: int = 3,
    height: int = 128,
    width: int = 64,
    seed: int = 0,
    test_identities: int | None = None,
) -> Path:
    """Write (once) a Market-1501-layout folder at ``root`` and return ``root``.

    Layout::

        root/bounding_box_train/  identities 1..num_identities, images_per_identity each
        root/query/               test identities: first image per (identity, camera), for up to
                                  two cameras, when a gallery image remains in another camera
        root/bounding_box_test/   the other images of the test identities
        root/SYNTHETIC.json       the parameters; root/.complete written last

    Test identities (``test_identities``, default ``num_identities``) are disjoint from the train
    identities. Image k of identity p is seen by camera (k + p) mod num_cameras. File names are
    ``PPPP_cCs1_FFFFFF_00.jpg``. The output is the same bytes for the same arguments.

    A complete folder with the same parameters is reused. The data is generated into a temporary
    sibling folder and renamed into place, so concurrent generators do not clash and a crash leaves
    no half-written ``root``; a half-written or stale folder made here is replaced. A non-empty
    ``root`` that was not made here raises :class:`DatasetError` (it is never deleted).
    """
    root = Path(root).expanduser()
    n_test = num_identities if test_identities is None else test_identities
    _validate(num_identities, images_per_identity, num_cameras, height, width, n_test)
    params: dict[str, Any] = {
        "version": _FORMAT_VERSION,
        "num_identities": num_identities,
        "images_per_identity": images_per_identity,
        "num_cameras": num_cameras,
        "height": height,
        "width": width,
        "seed": seed,
        "test_identities": n_test,
    }
    if _is_complete(root, params):
        return root
    if root.exists():
        if not root.is_dir():
            raise DatasetError(f"synthetic data set root {root} exists and is not a folder")
        if any(root.iterdir()) and _read_params(root) is None:
            raise DatasetError(
                f"{root} is not empty and was not generated as a synthetic data set (no "
                f"{PARAMS_FILE}); choose an empty or new folder for it"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_dataset(tmp, params)
        if _is_complete(root, params):  # a concurrent generator finished first
            return root
        if root.exists():  # stale or half-written: move it aside, then swap in the new one
            trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                root.rename(trash)
            except OSError:
                pass  # another generator moved it first
            else:
                shutil.rmtree(trash, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:
            if not _is_complete(root, params):  # not a concurrent generator's finished copy
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
