"""The shipped training recipes ("presets"): one YAML config file per preset in this folder,
installed with the package.

A preset's name is its file's name without ``.yaml``. Its ``about:`` header
(:class:`reid_core.config.ConfigAbout`) is the one place that says what it is for and what it was
measured to give; its settings are a config file's like any other::

    reid train --preset cuhk03_cpu --set data.root=/data/cuhk03-pair1
    cfg = load_config(preset_path("smoke"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reid_core.config import ConfigAbout, ConfigError, read_config_file

__all__ = ["Preset", "UnknownPresetError", "load_preset", "preset_names", "preset_path", "presets"]

_FOLDER = Path(__file__).parent


class UnknownPresetError(ConfigError):
    """No preset of that name; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.known = preset_names()
        super().__init__(f"unknown preset {name!r}; the presets are: {', '.join(self.known)}")


@dataclass(frozen=True)
class Preset:
    """A preset: its name, header and settings (the file's, not yet validated)."""

    name: str
    about: ConfigAbout
    settings: dict[str, Any]


def preset_names() -> list[str]:
    """The presets' names, sorted."""
    return sorted(p.stem for p in _FOLDER.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``; :class:`UnknownPresetError` when there is none."""
    if name not in preset_names():  # never a path built from the name alone: no "../x"
        raise UnknownPresetError(name)
    return _FOLDER / f"{name}.yaml"


def load_preset(name: str) -> Preset:
    path = preset_path(name)
    about, settings = read_config_file(path)
    if about is None:
        raise ConfigError(f"preset {path} has no about: header (purpose and measured)")
    return Preset(name, about, settings)


def presets() -> list[Preset]:
    """Every preset, by name."""
    return [load_preset(name) for name in preset_names()]
