from pathlib import Path
from typing import Any

import pytest
import yaml

from reid_core.config import (
    ConfigAbout,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    flatten,
    load_config,
    parse_override,
    read_config_file,
)
from reid_core.presets import UnknownPresetError, load_preset, preset_names, preset_path


def test_defaults_are_the_paper_settings() -> None:
    cfg = ExperimentConfig()
    assert cfg.model.backbone == "resnet50" and cfg.model.last_stride == 1
    assert (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.loss.instance.temperature == 0.05
    assert (cfg.loss.gsl.threshold, cfg.loss.gsl.topk, cfg.loss.gsl.warmup_epochs) == (0.6, 10, 5)
    assert (cfg.loss.pedal.weight, cfg.loss.pedal.scale, cfg.loss.ipfl.weight) == (2.0, 15.0, 1.0)
    assert (cfg.optim.lr, cfg.optim.backbone_lr, cfg.schedule.epochs) == (0.1, 0.01, 60)


@pytest.mark.parametrize("name", preset_names())
def test_presets_validate_and_say_what_they_are_for(name: str) -> None:
    load_config(preset_path(name))
    about = load_preset(name).about
    assert "\n" not in about.purpose and "\n" not in about.measured  # one line each


def test_presets_are_found() -> None:
    assert {"smoke", "cuhk03_cpu", "market1501"} <= set(preset_names())


def test_unknown_preset_names_the_known_ones() -> None:
    with pytest.raises(UnknownPresetError, match=r"unknown preset '\.\./smoke'.*cuhk03_cpu, "):
        preset_path("../smoke")


def test_about_header_is_read_apart_from_the_settings(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("about: {purpose: a test, measured: nothing}\nschedule: {epochs: 3}\n")
    assert read_config_file(f) == (
        ConfigAbout(purpose="a test", measured="nothing"),
        {"schedule": {"epochs": 3}},
    )
    assert load_config(f).schedule.epochs == 3


def test_about_header_is_checked(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("about: {purpose: a test, mesured: nothing}\n")
    with pytest.raises(ConfigError, match=r"(?s)header of .*c\.yaml.*mesured: unknown key"):
        load_config(f)


def test_override_parses_yaml_scalars() -> None:
    cfg = load_config(
        overrides=[
            "loss.gsl.threshold=0.55",
            "data.crop_area=[0.5, 0.9]",
            "loss.ipfl.enabled=false",
        ]
    )
    assert cfg.loss.gsl.threshold == 0.55
    assert cfg.data.crop_area == (0.5, 0.9)
    assert cfg.loss.ipfl.enabled is False


def test_override_dict_form() -> None:
    raw = apply_overrides({"loss": {"gsl": {"topk": 3}}}, {"loss.gsl.threshold": 0.4})
    assert raw == {"loss": {"gsl": {"topk": 3, "threshold": 0.4}}}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("loss.gls.threshold=1", "unknown key 'gls' in loss"),
        ("nope=1", "unknown key 'nope' in the top level"),
        ("loss.gsl.threshold=abc", "loss.gsl.threshold"),
        ("data.height=5", "data.height"),
        ("loss.gsl.threshold.x=1", "loss.gsl.threshold is a value"),
        ("loss.gsl.threshold", "key.path=value"),
        ("=3", "empty key"),
        ("schedule.milestones=[40, 10]", "increasing"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("override", "key", "problem"),
    [
        ({"loss.gls.threshold": 1}, "loss.gls.threshold", "unknown key 'gls' in loss (known: "),
        ({"loss.gsl.threshold.x": 1}, "loss.gsl.threshold.x", "loss.gsl.threshold is a value"),
    ],
)
def test_an_override_error_carries_its_key_apart(
    override: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, override)
    assert info.value.key == key
    assert info.value.problem.startswith(problem)
    assert str(info.value) == f"override {key}: {info.value.problem}"


def test_cluster_negatives_need_the_cluster_objective() -> None:
    with pytest.raises(ConfigError, match=r"loss.ipfl.negatives=other_clusters needs pseudo"):
        load_config(overrides=["loss.ipfl.negatives=other_clusters"])
    cfg = load_config(
        overrides=["loss.ipfl.negatives=other_clusters", "loss.objective=cluster_contrast"]
    )
    assert cfg.loss.ipfl.negatives == "other_clusters"


def test_unknown_key_in_file_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("loss:\n  pedal:\n    scael: 3\n")
    with pytest.raises(ConfigError, match=r"loss\.pedal\.scael: unknown key"):
        load_config(f)


@pytest.mark.parametrize(
    ("text", "needle"),
    [("- 1\n- 2\n", "must hold a mapping"), ("a: [1,\n", "not valid YAML")],
)
def test_malformed_files(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        load_config(tmp_path / "does-not-exist.yaml")


def test_all_losses_disabled_is_rejected() -> None:
    off = [f"loss.{t}.enabled=false" for t in ("instance", "gsl", "pedal", "ipfl")]
    with pytest.raises(ConfigError, match="every loss term is disabled"):
        load_config(overrides=off)


def test_parse_override_keeps_strings() -> None:
    assert parse_override("data.root=/tmp/x") == (["data", "root"], "/tmp/x")


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["data.root=/tmp/x", "loss.gsl.weighting=uniform"])
    path = dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert flatten(yaml.safe_load(path.read_text()))["loss.gsl.weighting"] == "uniform"
