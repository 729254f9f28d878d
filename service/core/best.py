"""The alias ``best`` of a registered model: which version it names, and the rule that chose it.

A version's *evidence* of how good it is comes in three kinds, strongest first:

1. ``mAP``: its job evaluated it on a labelled query/gallery split (the version tag
   ``metric.mAP`` the worker writes at registration);
2. ``human precision@1``: people judged its answers in the human pair check (the metric
   :data:`HUMAN_PRECISION_METRIC` on the version's MLflow run, its latest value);
3. ``label-free <signal>``: the kept label-free signal :data:`KEPT_LABEL_FREE_SIGNAL` of its
   last evaluation (the version tag ``metric.<signal>``), measured with or without labels.

The strongest kind that *any* version of the model has decides: only the versions carrying that
kind are candidates, the one with the highest value wins, a tie goes to the newest. Kinds never
compare with each other (a mAP and a precision are different scales), so a version evaluated on
labels outranks every version that was not, and a version people checked outranks every
label-free one. A model whose versions carry none of the three (evaluation turned off): the
newest version, rule ``newest``. Values that are not finite count as absent.

:func:`move_best_alias` applies the rule to every version of a model and records it: the alias,
and on the chosen version the tags :data:`BEST_RULE_TAG` (the rule's name, e.g. ``mAP``) and
:data:`BEST_VALUE_TAG` (the value it won with); the tags leave the versions that no longer hold
``best``. It runs after the worker registers a version and after a human check logs new answers.
An owner may point ``best`` elsewhere by hand (:meth:`ModelRegistry.set_alias
<service.core.registry.ModelRegistry.set_alias>`, rule :data:`~service.core.registry.BEST_BY_HAND`);
the next registration or human check applies the rule again (pin a version with another alias).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from service.core.registry import (
    BEST_ALIAS,
    BEST_RULE_TAG,
    BEST_VALUE_TAG,
    METRIC_TAG_PREFIX,
    HumanMetric,
    finite_number,
    quote,
)

#: The label-free signal that ranks versions with neither labels nor human answers; higher is
#: better. Which signal ranks models the way mAP does is measured in bench/results/label_free.md.
KEPT_LABEL_FREE_SIGNAL = "label_free/mutual_nn_rate"
#: The run metric of the human pair check: the share of queries whose first answer people
#: judged the same person (0..1).
HUMAN_PRECISION_METRIC: str = HumanMetric.PRECISION_AT_1

_MAP_TAG = f"{METRIC_TAG_PREFIX}mAP"
_LABEL_FREE_TAG = f"{METRIC_TAG_PREFIX}{KEPT_LABEL_FREE_SIGNAL}"


class Evidence(Enum):
    """The kinds of evidence, strongest first; the value is the rule's name as tagged."""

    MAP = "mAP"
    HUMAN_PRECISION = "human precision@1"
    LABEL_FREE = f"label-free {KEPT_LABEL_FREE_SIGNAL.removeprefix('label_free/')}"


#: The rule when no version carries any evidence.
NEWEST = "newest"


@dataclass(frozen=True)
class BestChoice:
    """The version ``best`` names, the rule that chose it (an :class:`Evidence` value or
    :data:`NEWEST`) and the value it won with (None for ``newest``)."""

    version: str
    rule: str
    value: float | None = None


def _human_precision(client: Any, run_id: str | None) -> float | None:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:  # the run was deleted: the version keeps its tags only
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise
    value = run.data.metrics.get(HUMAN_PRECISION_METRIC)
    return finite_number(None if value is None else str(value))


def choose_best(versions: list[Any], human_precision: Callable[[Any], float | None]) -> BestChoice:
    """The rule of the module over ``versions`` (MLflow ``ModelVersion``s, at least one);
    ``human_precision(version)`` reads a version's human precision@1, asked only when no
    version has a mAP."""
    newest_first = sorted(versions, key=lambda v: int(v.version), reverse=True)
    readers: list[tuple[Evidence, Callable[[Any], float | None]]] = [
        (Evidence.MAP, lambda v: finite_number((v.tags or {}).get(_MAP_TAG))),
        (Evidence.HUMAN_PRECISION, human_precision),
        (Evidence.LABEL_FREE, lambda v: finite_number((v.tags or {}).get(_LABEL_FREE_TAG))),
    ]
    for kind, read in readers:
        scored = [(value, v) for v in newest_first if (value := read(v)) is not None]
        if scored:
            # max keeps the first of equals: the newest
            value, chosen = max(scored, key=lambda pair: pair[0])
            return BestChoice(str(chosen.version), kind.value, value)
    return BestChoice(str(newest_first[0].version), NEWEST)


def _versions(client: Any, model_name: str) -> list[Any]:
    found = client.search_model_versions(f"name = '{quote(model_name)}'", max_results=10_000)
    return [v for v in found if str(v.status) != "FAILED_REGISTRATION"]


def _record(client: Any, model_name: str, versions: list[Any], choice: BestChoice) -> None:
    """Tag the chosen version with its rule, point ``best`` at it, untag the others (in this
    order, so that the version holding ``best`` always carries its rule)."""
    client.set_model_version_tag(model_name, choice.version, BEST_RULE_TAG, choice.rule)
    if choice.value is not None:
        value = repr(float(choice.value))
        client.set_model_version_tag(model_name, choice.version, BEST_VALUE_TAG, value)
    client.set_registered_model_alias(model_name, BEST_ALIAS, choice.version)
    for version in versions:
        tags = version.tags or {}
        stale = [BEST_RULE_TAG, BEST_VALUE_TAG]
        if str(version.version) == choice.version:
            stale = [] if choice.value is not None else [BEST_VALUE_TAG]
        for key in stale:
            if key in tags:
                client.delete_model_version_tag(model_name, str(version.version), key)


def move_best_alias(client: Any, model_name: str) -> BestChoice | None:
    """Apply the rule to every version of ``model_name`` and point ``best`` at the winner, tagged
    with its rule (see the module); None when the model has no version. ``client`` is an
    ``MlflowClient``; MLflow's errors are the caller's to handle."""
    versions = _versions(client, model_name)
    if not versions:
        return None
    choice = choose_best(versions, lambda v: _human_precision(client, v.run_id))
    _record(client, model_name, versions, choice)
    return choice
