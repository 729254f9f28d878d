"""Unit tests of reid_core.data: folder parsing, registry errors, synthetic data, image checks,
transforms and loaders. Everything runs on tiny JPEGs written into tmp_path."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_core.config import DataConfig
from reid_core.data import (
    DATASETS,
    CorruptImageError,
    DatasetError,
    EvalSet,
    ImageRecord,
    ReIDSplits,
    TooManyCorruptImagesError,
    TrainSet,
    build_dataset,
    build_eval_loader,
    build_splits,
    build_test_transform,
    build_train_loader,
    build_train_transform,
    generate_synthetic_market,
    load_image,
    parse_market_name,
    scan_images,
)
from reid_core.data.synthetic import COMPLETE_MARKER, PARAMS_FILE

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def write_jpeg(path: Path, colour: tuple[int, int, int] = (120, 60, 30), size=(8, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = np.clip(np.array(colour) + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def write_images(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        write_jpeg(folder / name)


def make_market(root: Path, duke: bool = False) -> Path:
    def name(pid: str, cam: int, frame: int) -> str:
        if duke:
            return f"{pid}_c{cam}_f{frame:07d}.jpg"
        return f"{pid}_c{cam}s1_{frame:06d}_00.jpg"

    write_images(
        root / "bounding_box_train",
        [name("0002", 1, 1), name("0002", 2, 2), name("0007", 3, 3), name("-1", 1, 4)],
    )
    write_images(root / "query", [name("0010", 1, 5), name("0011", 2, 6)])
    write_images(
        root / "bounding_box_test",
        [name("0010", 2, 7), name("0011", 1, 8), name("0000", 4, 9), name("-1", 2, 10)],
    )
    (root / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    return root


def small_cfg(**kw: object) -> DataConfig:
    base: dict[str, object] = {"height": 32, "width": 16, "batch_size": 4, "num_workers": 0}
    base.update(kw)
    return DataConfig.model_validate(base)


def records_in(folder: Path, n: int) -> list[ImageRecord]:
    return [
        ImageRecord(write_jpeg(folder / f"{i:04d}_c1s1_{i:06d}_00.jpg", (i * 9 % 255, 80, 200)))
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# file names and folders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0002_c1s1_000451_03.jpg", (2, 0)),
        ("1500_c6s3_086542_02.jpg", (1500, 5)),
        ("-1_c3s2_000001_00.jpg", (-1, 2)),
        ("0000_c4s1_000002_01.jpg", (0, 3)),
        ("0001_c2_f0046182.jpg", (1, 1)),  # DukeMTMC
        ("0005_c8_f0123456.jpg", (5, 7)),
        ("readme.jpg", None),
        ("0001_c0s1_000000_00.jpg", None),  # cameras are 1-based in names
    ],
)
def test_parse_market_name(name: str, expected: tuple[int, int] | None) -> None:
    assert parse_market_name(name) == expected


def test_market1501_drops_junk_keeps_distractors(tmp_path: Path) -> None:
    splits = build_dataset("market1501", make_market(tmp_path / "m"))
    assert [(r.path.name[:4], r.pid, r.camid) for r in splits.train] == [
        ("0002", 2, 0),
        ("0002", 2, 1),
        ("0007", 7, 2),
    ]
    assert all(r.pid != -1 for r in splits.train + splits.query + splits.gallery)
    assert sorted(r.pid for r in splits.gallery) == [0, 10, 11]  # distractor kept
    assert {r.pid for r in splits.query} == {10, 11}
    assert splits.has_eval
    assert splits.summary() == {
        "train": {"images": 3, "identities": 2, "cameras": 3},
        "query": {"images": 2, "identities": 2, "cameras": 2},
        "gallery": {"images": 3, "identities": 3, "cameras": 3},
    }
    assert all(r.path.is_file() for r in splits.train + splits.query + splits.gallery)


def test_market1501_finds_the_nested_release_folder(tmp_path: Path) -> None:
    make_market(tmp_path / "Market-1501-v15.09.15")
    splits = build_dataset("market1501", tmp_path)
    assert splits.root == tmp_path / "Market-1501-v15.09.15"
    assert len(splits.train) == 3


def test_market_folder_shares_the_market_reader(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    a, b = build_dataset("market1501", root), build_dataset("market_folder", root)
    assert (a.train, a.query, a.gallery) == (b.train, b.query, b.gallery)
    assert b.name == "market_folder"


def test_dukemtmc_names(tmp_path: Path) -> None:
    splits = build_dataset("dukemtmc", make_market(tmp_path / "d", duke=True))
    assert [(r.pid, r.camid) for r in splits.train] == [(2, 0), (2, 1), (7, 2)]
    assert sorted((r.pid, r.camid) for r in splits.gallery) == [(0, 3), (10, 1), (11, 0)]


def test_msmt17_lists(tmp_path: Path) -> None:
    root = tmp_path / "MSMT17_V1"
    train = ["0000/0000_000_01_0303morning_0015_0.jpg", "0000/0000_001_05_0303noon_0022_1.jpg"]
    val = ["0001/0001_000_15_0304morning_0001_0.jpg"]
    query = ["0000/0000_000_02_0113morning_0001_0.jpg"]
    gallery = ["0000/0000_001_03_0113noon_0002_0.jpg", "0003/0003_000_03_0113noon_0009_0.jpg"]
    for rel in train + val:
        write_jpeg(root / "train" / rel)
    for rel in query + gallery:
        write_jpeg(root / "test" / rel)

    def lines(rels: list[str]) -> str:
        return "".join(f"{r} {int(r[:4])}\n" for r in rels)

    (root / "list_train.txt").write_text(lines(train))
    (root / "list_val.txt").write_text(lines(val))
    (root / "list_query.txt").write_text(lines(query))
    (root / "list_gallery.txt").write_text(lines(gallery) + "\n")

    splits = build_dataset("msmt17", tmp_path)  # the V1 folder is found below the root
    assert sorted((r.pid, r.camid) for r in splits.train) == [(0, 0), (0, 4), (1, 14)]
    assert all(r.path.is_file() for r in splits.train + splits.query + splits.gallery)
    assert [(r.pid, r.camid) for r in splits.query] == [(0, 1)]
    assert [(r.pid, r.camid) for r in splits.gallery] == [(0, 2), (3, 2)]
    assert len(build_dataset("msmt17", root, include_val=False).train) == 2

    (root / "list_query.txt").write_text("0000/0000_000_xx_bad.jpg 0\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:1.*0000_000_xx_bad.jpg"):
        build_dataset("msmt17", root)


def test_image_folder_cameras_are_optional(tmp_path: Path) -> None:
    root = tmp_path / "crops"
    write_images(root, ["a.jpg", "b.PNG"])  # no camera
    write_images(root / "cam_a", ["x1.jpg", "x2.jpeg"])  # camera from the sub-folder
    write_images(root / "c7" / "deeper", ["y.jpg"])
    write_images(root / "misc", ["0001_c3s1_000001_00.jpg", "pic12.jpg"])  # from the name
    write_images(root / ".hidden", ["z.jpg"])
    (root / "notes.txt").write_text("not an image")
    (root / "b.PNG").rename(root / "b.png")

    splits = build_dataset("image_folder", root)
    cams = {r.path.relative_to(root).as_posix(): r.camid for r in splits.train}
    assert set(cams) == {
        "a.jpg",
        "b.png",
        "cam_a/x1.jpg",
        "cam_a/x2.jpeg",
        "c7/deeper/y.jpg",
        "misc/0001_c3s1_000001_00.jpg",
        "misc/pic12.jpg",
    }
    assert cams["a.jpg"] == cams["b.png"] == cams["misc/pic12.jpg"] == -1
    assert cams["cam_a/x1.jpg"] == cams["cam_a/x2.jpeg"] != -1
    assert (
        len({cams["cam_a/x1.jpg"], cams["c7/deeper/y.jpg"], cams["misc/0001_c3s1_000001_00.jpg"]})
        == 3
    )
    assert all(r.pid == -1 for r in splits.train)
    assert not splits.has_eval
    assert splits.query == []
    assert splits.gallery == []
    assert splits.summary()["train"] == {"images": 7, "identities": 0, "cameras": 3}


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no image"):
        build_dataset("image_folder", tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# registry errors
# ----------------------------------------------------------------------------------------------


def test_registry_knows_the_builtin_datasets() -> None:
    assert {
        "market1501",
        "dukemtmc",
        "msmt17",
        "market_folder",
        "image_folder",
        "synthetic",
    } <= set(DATASETS)


def test_unknown_dataset_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'market1502'.*market1501.*synthetic"):
        build_dataset("market1502", tmp_path)


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"needs a root folder.*data\.root"):
        build_dataset("market1501", None)
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"{missing}.*does not exist"):
        build_dataset("market_folder", missing)


def test_missing_subfolder_is_named_with_the_layout(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    for f in (root / "query").iterdir():
        f.unlink()
    (root / "query").rmdir()
    with pytest.raises(DatasetError, match=r"(?s)has no query.*bounding_box_train/") as err:
        build_dataset("market_folder", root)
    assert str(root) in str(err.value)


def test_unknown_option_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not take option\(s\) \['colour'\]"):
        build_dataset("market_folder", make_market(tmp_path / "m"), colour=True)


def test_empty_split_folder_is_explained(tmp_path: Path) -> None:
    root = make_market(tmp_path / "m")
    for f in (root / "query").iterdir():
        f.rename(root / "query" / f"x{f.name}")
    with pytest.raises(DatasetError, match=r"query holds no usable image.*PPPP_cC"):
        build_dataset("market_folder", root)


# ----------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    kw = {"num_identities": 4, "images_per_identity": 4}
    a = folder_bytes(generate_synthetic_market(tmp_path / "a", seed=3, **kw))
    b = folder_bytes(generate_synthetic_market(tmp_path / "b", seed=3, **kw))
    c = folder_bytes(generate_synthetic_market(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert len(images) == 2 * 4 * 4
    assert all(a[k] != c[k] for k in images)
    assert COMPLETE_MARKER in a
    assert PARAMS_FILE in a


def test_synthetic_layout_reads_as_market(tmp_path: Path) -> None:
    root = generate_synthetic_market(tmp_path / "s", num_identities=6, images_per_identity=5)
    splits = build_dataset("market1501", root)
    s = splits.summary()
    assert s["train"] == {"images": 30, "identities": 6, "cameras": 3}
    assert s["query"]["identities"] == s["gallery"]["identities"] == 6
    assert s["query"]["images"] + s["gallery"]["images"] == 30
    assert not {r.pid for r in splits.train} & {r.pid for r in splits.gallery}
    for q in splits.query:  # every query has a cross-camera match in the gallery
        assert any(g.pid == q.pid and g.camid != q.camid for g in splits.gallery)
    with Image.open(splits.train[0].path) as img:
        assert img.size == (64, 128)
        assert img.format == "JPEG"


def test_synthetic_dataset_caches_and_regenerates_half_written(tmp_path: Path) -> None:
    splits = build_dataset("synthetic", tmp_path, num_identities=3, images_per_identity=3)
    assert splits.has_eval
    assert len(splits.train) == 9
    folder = splits.train[0].path.parent.parent
    assert folder.parent == tmp_path
    stamp = (folder / COMPLETE_MARKER).stat().st_mtime_ns
    build_dataset("synthetic", tmp_path, num_identities=3, images_per_identity=3)
    assert (folder / COMPLETE_MARKER).stat().st_mtime_ns == stamp  # reused, not rewritten
    (folder / COMPLETE_MARKER).unlink()  # as if the writer died before the end
    splits.train[0].path.unlink()
    again = build_dataset("synthetic", tmp_path, num_identities=3, images_per_identity=3)
    assert (folder / COMPLETE_MARKER).is_file()
    assert again.train == splits.train
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folders left


def test_synthetic_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "mine" / "holiday.jpg")
    with pytest.raises(DatasetError, match="not empty and was not generated"):
        generate_synthetic_market(tmp_path / "mine", num_identities=2, images_per_identity=2)
    assert (tmp_path / "mine" / "holiday.jpg").is_file()


def test_synthetic_identities_are_learnable(tmp_path: Path) -> None:
    root = generate_synthetic_market(tmp_path / "s", num_identities=12, images_per_identity=6)
    records = build_dataset("market_folder", root).train
    feats = []
    for r in records:  # a coarse colour layout of the central (body) region
        arr = np.asarray(load_image(r.path).resize((4, 8)), dtype=np.float32)[1:7, 1:3]
        feats.append(arr.reshape(-1) / 255.0)
    x = np.stack(feats)
    pids = np.array([r.pid for r in records])
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same = pids[:, None] == pids[None]
    off_diag = ~np.eye(len(pids), dtype=bool)
    intra, inter = d[same & off_diag].mean(), d[~same].mean()
    assert intra < 0.6 * inter
    # nearest neighbour (leave-one-out) is mostly the same identity
    d[~off_diag] = np.inf
    assert (pids[d.argmin(1)] == pids).mean() > 0.8


# ----------------------------------------------------------------------------------------------
# unreadable images
# ----------------------------------------------------------------------------------------------


def make_bad_files(folder: Path) -> dict[str, Path]:
    good = write_jpeg(folder / "good.jpg", size=(32, 64))
    truncated = folder / "truncated.jpg"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixels cut short
    garbage = folder / "garbage.jpg"
    garbage.write_bytes(b"\x00not a jpeg at all" * 10)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return {"good": good, "truncated": truncated, "garbage": garbage, "empty": empty}


def test_load_image_raises_with_the_path(tmp_path: Path) -> None:
    files = make_bad_files(tmp_path)
    assert load_image(files["good"]).mode == "RGB"
    for key in ("truncated", "garbage", "empty"):
        with pytest.raises(CorruptImageError, match=key) as err:
            load_image(files[key])
        assert err.value.path == files[key]
    with pytest.raises(CorruptImageError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_corrupt_image_error_survives_pickling_and_rebuilding() -> None:
    err = CorruptImageError(Path("/x/a.jpg"), "truncated")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))
    rebuilt = CorruptImageError("Caught CorruptImageError in DataLoader worker: ... a.jpg")
    assert "a.jpg" in str(rebuilt)  # DataLoader re-raises with the message only


def test_scan_skips_unreadable_images_and_logs_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = records_in(tmp_path / "ok", 300)
    files = make_bad_files(tmp_path / "bad")
    records[10:10] = [ImageRecord(files["garbage"]), ImageRecord(files["empty"])]
    with caplog.at_level(logging.WARNING, logger="reid_core.data"):
        good, bad = scan_images(records, 0.01)
    assert len(good) == 300
    assert good == [r for r in records if r.path.parent.name == "ok"]
    assert sorted(p.name for p, _ in bad) == ["empty.png", "garbage.jpg"]
    assert "skipping 2 unreadable of 302" in caplog.text
    assert "garbage.jpg" in caplog.text

    truncated = [ImageRecord(files["truncated"]), ImageRecord(files["good"])]
    assert len(scan_images(truncated, 1.0)[0]) == 2  # header checks cannot see a truncation
    good, bad = scan_images(truncated, 1.0, full_decode=True)
    assert good == truncated[1:]
    assert bad[0][0] == files["truncated"]


def test_scan_log_lists_the_first_20_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(25):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"junk")
    records = [ImageRecord(p) for p in sorted(tmp_path.iterdir())]
    with caplog.at_level(logging.WARNING, logger="reid_core.data"):
        good, bad = scan_images(records, 1.0)
    assert good == []
    assert len(bad) == 25
    assert "bad19.jpg" in caplog.text
    assert "bad20.jpg" not in caplog.text
    assert "and 5 more" in caplog.text


def test_too_many_corrupt_images(tmp_path: Path) -> None:
    records = records_in(tmp_path, 7)
    for r in records[:3]:
        r.path.write_bytes(b"broken")
    with pytest.raises(
        TooManyCorruptImagesError, match=r"3 of 7.*42\.86%.*max_bad_fraction=0\.1"
    ) as e:
        scan_images(records, 0.1)
    assert records[0].path.name in str(e.value)
    assert isinstance(e.value, DatasetError)
    assert len(scan_images(records, 0.5)[0]) == 4  # under the limit: skipped only


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------


def test_two_view_transform(tmp_path: Path) -> None:
    cfg = small_cfg(flip_probability=0.0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 30, 3), dtype=np.uint8))
    v0, v1 = build_train_transform(cfg)(img)
    assert v0.shape == v1.shape == (3, 32, 16)
    assert v0.dtype == v1.dtype == torch.float32
    assert not torch.allclose(v0, v1)
    # view 0 is the plain (normalised) resize: the same as the test transform without flips
    assert torch.allclose(v0, build_test_transform(cfg)(img))
    # and it is flipped when asked to
    flipped = build_train_transform(small_cfg(flip_probability=1.0)).view0(img)
    assert torch.allclose(flipped, v0.flip(-1))


def test_view1_without_augmentation_equals_view0_up_to_the_crop() -> None:
    cfg = small_cfg(
        flip_probability=0.0,
        rotation_degrees=0.0,
        color_jitter=(0.0, 0.0, 0.0, 0.0),
        crop_area=(1.0, 1.0),
    )
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 32, 3), dtype=np.uint8))
    v0, v1 = build_train_transform(cfg)(img)
    assert torch.allclose(v0, v1, atol=1e-5)


def _no_geometry(**kw: object) -> DataConfig:
    base: dict[str, object] = {
        "flip_probability": 0.0,
        "rotation_degrees": 0.0,
        "color_jitter": (0.0, 0.0, 0.0, 0.0),
        "crop_area": (1.0, 1.0),
    }
    base.update(kw)
    return small_cfg(**base)


def test_augmentation_options_default_off() -> None:
    cfg = DataConfig()
    assert not cfg.augment_both_views
    assert cfg.grayscale_probability == 0.0
    assert cfg.erasing_probability == 0.0


def test_grayscale_makes_the_channels_equal_before_normalising() -> None:
    cfg = _no_geometry(grayscale_probability=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 32, 3), dtype=np.uint8))
    v0, v1 = build_train_transform(cfg)(img)
    assert torch.allclose(v1[0], v1[1]) and torch.allclose(v1[1], v1[2])
    assert not torch.allclose(v0[0], v0[1])  # the plain view keeps its colours


def test_random_erasing_fills_a_block_with_the_mean() -> None:
    cfg = _no_geometry(erasing_probability=1.0)
    img = Image.fromarray(np.full((64, 32, 3), 250, dtype=np.uint8))
    v0, v1 = build_train_transform(cfg)(img)
    erased = (v1 == 0).all(dim=0)  # 0 after normalising = the mean colour
    share = erased.float().mean().item()
    assert 0.02 * 0.9 <= share <= 0.4 * 1.1
    assert not (v0 == 0).all(dim=0).any()


def test_augment_both_views_draws_view0_from_the_augmentation() -> None:
    cfg = _no_geometry(grayscale_probability=1.0, augment_both_views=True)
    tf = build_train_transform(cfg)
    assert tf.view0 is tf.view1
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 32, 3), dtype=np.uint8))
    v0, _ = tf(img)
    std = torch.tensor(cfg.std)[:, None, None]
    mean = torch.tensor(cfg.mean)[:, None, None]
    raw = v0 * std + mean  # grey before normalising: the three channels agree
    assert torch.allclose(raw[0], raw[1], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------


def loader_order(loader: torch.utils.data.DataLoader, epoch: int = 0) -> list[int]:
    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    return [i for _, _, idx in loader for i in idx.tolist()]


def test_train_loader_batches(tmp_path: Path) -> None:
    records = records_in(tmp_path, 10)
    loader = build_train_loader(records, small_cfg(), seed=0)
    batches = list(loader)
    assert len(batches) == 2  # 10 // 4, last partial batch dropped
    for v0, v1, idx in batches:
        assert v0.shape == v1.shape == (4, 3, 32, 16)
        assert v0.dtype == torch.float32
        assert idx.dtype == torch.int64
    seen = torch.cat([b[2] for b in batches]).tolist()
    assert len(set(seen)) == 8
    assert set(seen) <= set(range(10))
    item = TrainSet(records, build_train_transform(small_cfg()))[3]
    assert len(item) == 3
    assert item[2] == 3


def test_train_loader_shuffle_is_deterministic(tmp_path: Path) -> None:
    records = records_in(tmp_path, 12)

    def order(seed: int, epoch: int) -> list[int]:
        return loader_order(build_train_loader(records, small_cfg(), seed), epoch)

    assert order(5, 0) == order(5, 0)
    assert order(5, 0) != order(6, 0)
    assert order(5, 0) != order(5, 1)
    assert sorted(order(5, 1)) == list(range(12))


def test_distributed_train_loader_splits_equally(tmp_path: Path) -> None:
    records = records_in(tmp_path, 19)
    cfg = small_cfg()
    parts = [
        loader_order(build_train_loader(records, cfg, 1, rank=r, world_size=2), 3) for r in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == 8  # 19 -> 2 whole batches of 4 per process
    assert not set(parts[0]) & set(parts[1])


def test_train_loader_refuses_less_than_one_batch(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"3 images.*data\.batch_size=4"):
        build_train_loader(records_in(tmp_path, 3), small_cfg(), 0)


def test_train_loader_with_workers(tmp_path: Path) -> None:
    records = records_in(tmp_path, 8)
    loader = build_train_loader(records, small_cfg(num_workers=1), seed=0)
    assert loader.persistent_workers
    assert sorted(loader_order(loader, 0)) == list(range(8))
    assert sorted(loader_order(loader, 1)) == list(range(8))


def test_eval_loader_keeps_order_and_the_last_batch(tmp_path: Path) -> None:
    records = records_in(tmp_path, 10)
    batches = list(build_eval_loader(records, small_cfg(), batch_size=4))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.cat([b[1] for b in batches]).tolist() == list(range(10))
    assert batches[0][0].shape == (4, 3, 32, 16)


def test_image_gone_bad_after_the_scan(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = records_in(tmp_path, 10)
    records[4].path.write_bytes(b"gone bad")
    transform = build_train_transform(small_cfg())
    with caplog.at_level(logging.WARNING, logger="reid_core.data"):
        v0, _v1, idx = TrainSet(records, transform, max_bad_fraction=0.2)[4]
    assert idx == 4
    assert v0.shape == (3, 32, 16)
    assert records[4].path.name in caplog.text
    with pytest.raises(CorruptImageError, match=records[4].path.name):
        TrainSet(records, transform, on_corrupt="raise")[4]
    strict = TrainSet(records, transform, max_bad_fraction=0.0)
    with pytest.raises(TooManyCorruptImagesError, match="max_bad_fraction=0"):
        strict[4]
    image, i = EvalSet(records, build_test_transform(small_cfg()))[4]
    assert i == 4
    assert image.shape == (3, 32, 16)
    with pytest.raises(CorruptImageError):
        EvalSet(records, build_test_transform(small_cfg()), on_corrupt="raise")[4]


def test_build_splits_from_config(tmp_path: Path) -> None:
    cfg = small_cfg(
        dataset="synthetic", root=tmp_path, synthetic_identities=3, synthetic_images_per_identity=3
    )
    splits = build_splits(cfg)
    assert isinstance(splits, ReIDSplits)
    assert splits.summary()["train"]["identities"] == 3
    market = make_market(tmp_path / "m")
    mixed = build_splits(
        cfg.model_copy(update={"eval_dataset": "market_folder", "eval_root": market})
    )
    assert mixed.train == splits.train
    assert {r.pid for r in mixed.query} == {10, 11}


def test_image_folder_does_not_follow_links_out_of_its_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "cam1").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 16)).save(root / "cam1" / "a.jpg")
    Image.new("RGB", (8, 16)).save(outside / "secret.jpg")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "inside.jpg").symlink_to(root / "cam1" / "a.jpg")
    (root / "cam1" / "loop").symlink_to(root, target_is_directory=True)
    names = sorted(r.path.name for r in build_dataset("image_folder", root).train)
    assert names == ["a.jpg", "inside.jpg"]
