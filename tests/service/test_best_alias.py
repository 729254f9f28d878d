"""The rule of the alias ``best`` (service/core/best.py) on a real MLflow store (SQLite, local
artifacts): mAP where versions were evaluated on labels, else the human check's precision@1, else
the kept label-free signal, else the newest; the strongest kind any version has decides, ties go to
the newest, and the chosen version carries its rule. Then what the models API says of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient

from service.core.best import (
    HUMAN_PRECISION_METRIC,
    KEPT_LABEL_FREE_SIGNAL,
    BestChoice,
    move_best_alias,
)
from service.core.registry import BEST_RULE_TAG, BEST_VALUE_TAG, OWNER_TAG
from service.core.settings import Settings, TrackingSettings
from tests.service.conftest import Headers, make_settings

MODEL = "reid-alice"
LABEL_FREE = f"metric.{KEPT_LABEL_FREE_SIGNAL}"


class Registry:
    """A registered model of alice's whose versions are made with the evidence a test names."""

    def __init__(self, tmp_path: Path) -> None:
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment = self.client.create_experiment(
            "reid-training", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        self.client.create_registered_model(MODEL, tags={OWNER_TAG: "alice"})

    def version(
        self,
        mAP: float | None = None,  # noqa: N803 (the metric's name)
        label_free: float | None = None,
        human: float | None = None,
    ) -> str:
        """A new version whose job evaluated ``mAP`` on labels and measured ``label_free`` (its
        version tags), and whose run holds the human check's ``human`` precision@1."""
        run = self.client.create_run(self.experiment).info.run_id
        if human is not None:
            self.human_check(run, human)
        tags = {"metric.r1": "50.0"}
        if mAP is not None:
            tags["metric.mAP"] = str(mAP)
        if label_free is not None:
            tags[LABEL_FREE] = str(label_free)
        made = self.client.create_model_version(
            MODEL, f"runs:/{run}/model", run_id=run, tags={OWNER_TAG: "alice", **tags}
        )
        return str(made.version)

    def human_check(self, run_id: str, precision: float) -> None:
        self.client.log_metric(run_id, HUMAN_PRECISION_METRIC, precision)

    def run_of(self, version: str) -> str:
        return str(self.client.get_model_version(MODEL, version).run_id)

    def best(self) -> str:
        return str(self.client.get_model_version_by_alias(MODEL, "best").version)

    def rule_tags(self) -> dict[str, dict[str, str]]:
        """version -> its best_rule/best_value tags, for the versions that have any."""
        out = {}
        for v in self.client.search_model_versions(f"name = '{MODEL}'"):
            tags = {k: v.tags[k] for k in (BEST_RULE_TAG, BEST_VALUE_TAG) if k in v.tags}
            if tags:
                out[str(v.version)] = tags
        return out


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path)


def test_map_decides_where_versions_were_evaluated_on_labels(registry: Registry) -> None:
    registry.version(mAP=30.0, label_free=0.9, human=0.95)
    registry.version(mAP=42.5, label_free=0.1)
    registry.version(mAP=41.0, label_free=0.5)

    choice = move_best_alias(registry.client, MODEL)

    assert choice == BestChoice("2", "mAP", 42.5)
    assert registry.best() == "2"
    assert registry.rule_tags() == {"2": {BEST_RULE_TAG: "mAP", BEST_VALUE_TAG: "42.5"}}
    # a tie goes to the newest version
    registry.version(mAP=42.5)
    assert move_best_alias(registry.client, MODEL) == BestChoice("4", "mAP", 42.5)
    assert registry.rule_tags() == {"4": {BEST_RULE_TAG: "mAP", BEST_VALUE_TAG: "42.5"}}


def test_human_precision_decides_without_labels(registry: Registry) -> None:
    registry.version(label_free=0.9)  # the strongest label-free signal, never checked by people
    registry.version(label_free=0.2, human=0.7)
    registry.version(label_free=0.3, human=0.6)

    assert move_best_alias(registry.client, MODEL) == BestChoice("2", "human precision@1", 0.7)
    assert registry.rule_tags() == {
        "2": {BEST_RULE_TAG: "human precision@1", BEST_VALUE_TAG: "0.7"}
    }
    # new answers to the check of version 3: its latest precision counts
    registry.human_check(registry.run_of("3"), 0.8)
    assert move_best_alias(registry.client, MODEL) == BestChoice("3", "human precision@1", 0.8)
    assert registry.best() == "3"
    assert registry.rule_tags() == {
        "3": {BEST_RULE_TAG: "human precision@1", BEST_VALUE_TAG: "0.8"}
    }


def test_the_kept_label_free_signal_decides_without_labels_nor_human_answers(
    registry: Registry,
) -> None:
    registry.version(label_free=0.31)
    registry.version(label_free=0.47)
    registry.version(label_free=0.47)  # as high: the newest wins
    registry.version(label_free=0.12)
    registry.version()  # no evaluation at all: no candidate

    choice = move_best_alias(registry.client, MODEL)

    assert choice == BestChoice("3", "label-free mutual_nn_rate", 0.47)
    assert registry.best() == "3"
    assert registry.rule_tags() == {
        "3": {BEST_RULE_TAG: "label-free mutual_nn_rate", BEST_VALUE_TAG: "0.47"}
    }


def test_mixed_evidence_the_strongest_kind_any_version_has_decides(registry: Registry) -> None:
    registry.version(label_free=0.6)
    assert move_best_alias(registry.client, MODEL) == BestChoice(
        "1", "label-free mutual_nn_rate", 0.6
    )
    registry.version(label_free=0.9)
    assert move_best_alias(registry.client, MODEL) == BestChoice(
        "2", "label-free mutual_nn_rate", 0.9
    )
    # people checked version 1: checked beats unchecked, whatever the signals say
    registry.human_check(registry.run_of("1"), 0.25)
    assert move_best_alias(registry.client, MODEL) == BestChoice("1", "human precision@1", 0.25)
    # a version evaluated on labels beats them all, its precision and signal lower or absent
    registry.version(mAP=12.0, label_free=0.1, human=0.1)
    assert move_best_alias(registry.client, MODEL) == BestChoice("3", "mAP", 12.0)
    # the tags went with the alias: only the holder has them
    assert registry.rule_tags() == {"3": {BEST_RULE_TAG: "mAP", BEST_VALUE_TAG: "12.0"}}


def test_no_evidence_at_all_the_newest_and_no_version_nothing(registry: Registry) -> None:
    assert move_best_alias(registry.client, MODEL) is None
    registry.version()
    registry.version()
    registry.version(mAP=float("nan"), label_free=float("inf"))  # not finite: absent
    assert move_best_alias(registry.client, MODEL) == BestChoice("3", "newest")
    assert registry.rule_tags() == {"3": {BEST_RULE_TAG: "newest"}}


# -- what the models API says of it -----------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path, migrated_sqlite: Path, registry: Registry) -> Settings:
    """The service's settings (the conftest's app, client and keys use them) on that store."""
    db = tmp_path / "reid.db"
    shutil.copyfile(migrated_sqlite, db)
    return make_settings(
        tmp_path, f"sqlite:///{db}", mlflow=TrackingSettings(tracking_uri=registry.uri)
    )


def _versions(client: TestClient, alice: Headers) -> dict[str, tuple[str | None, float | None]]:
    items = client.get(f"/v1/models/{MODEL}/versions", headers=alice).json()["items"]
    return {v["version"]: (v["best_rule"], v["best_value"]) for v in items}


def test_the_api_shows_the_rule_on_the_version_holding_best(
    client: TestClient, alice: Headers, registry: Registry
) -> None:
    registry.version(label_free=0.4)
    registry.version(label_free=0.3)
    move_best_alias(registry.client, MODEL)
    assert _versions(client, alice) == {
        "2": (None, None),
        "1": ("label-free mutual_nn_rate", 0.4),
    }
    best = client.get(f"/v1/models/{MODEL}/versions/best", headers=alice).json()
    assert (best["version"], best["best_rule"], best["best_value"]) == (
        "1",
        "label-free mutual_nn_rate",
        0.4,
    )

    # pointed by hand: the rule says so, the former holder's tags no longer count
    put = client.put(f"/v1/models/{MODEL}/aliases/best", json={"version": "2"}, headers=alice)
    assert put.status_code == 200, put.text
    assert (put.json()["best_rule"], put.json()["best_value"]) == ("set by hand", None)
    assert _versions(client, alice) == {"2": ("set by hand", None), "1": (None, None)}
    # another alias says nothing of best
    client.put(f"/v1/models/{MODEL}/aliases/production", json={"version": "1"}, headers=alice)
    assert _versions(client, alice)["1"] == (None, None)

    # the next registration (or human check) applies the rule again
    registry.version(label_free=0.35)
    move_best_alias(registry.client, MODEL)
    assert _versions(client, alice) == {
        "3": (None, None),
        "2": (None, None),
        "1": ("label-free mutual_nn_rate", 0.4),
    }
    assert registry.rule_tags() == {
        "1": {BEST_RULE_TAG: "label-free mutual_nn_rate", BEST_VALUE_TAG: "0.4"}
    }
