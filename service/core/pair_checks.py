"""Pair checks: a person judges pairs of a gallery's crops, and the answers estimate the model
version's precision at ranks 1 and 5, without labelling the dataset.

A check belongs to one READY gallery (a dataset's images embedded by one model version) and its
owner. :func:`create_check` samples its queries and fixes its pairs (:func:`sample_pairs`): the
images sorted by path are shuffled with the check's ``seed`` and walked in that order, each
image with at least one crop from another camera becoming a query until there are enough; each
query ``q`` is shown with ``c_1``, its nearest crop from another camera, and with ``c_J``, ``J``
drawn uniformly from ``1..K`` (``K = min(5, crops from other cameras)``; the same pair when ``J =
1``). The queries and draws depend on the images, their cameras and the seed only, never on the
model, so the answers are unbiased samples of both precisions (:mod:`service.core.pair_estimate`
says why, and how the intervals are made).

An answer belongs to a pair of images of a dataset and its owner (``pair_answers``), not to the
check: a check of a retrained version of the same dataset takes the seed of the owner's first
check of it (unless told another), so it asks about the same queries, and every pair the new
version proposes that was answered before counts at once. Each answer changes the estimate, which
is logged to the version's MLflow run (:class:`service.core.registry.HumanMetric`); an MLflow that
does not answer costs no answer: the next one logs the estimate again.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.best import move_best_alias
from service.core.dataset_files import relative_path
from service.core.errors import ConflictError, NotFoundError, ServiceError
from service.core.galleries import owned_gallery, ready_index, require_ready
from service.core.models import PairAnswer, PairAnswerValue, PairCheck
from service.core.owned import Cursor, OwnedPage, owned, owned_page
from service.core.pair_estimate import Proportion, proportion
from service.core.registry import HumanMetric, ModelRegistry
from service.core.settings import Settings

if TYPE_CHECKING:
    from reid_core.inference.search import GalleryIndex

log = logging.getLogger("service.pair_checks")

#: Queries a check samples unless asked for another number; the most it may.
DEFAULT_QUERIES = 50
MAX_QUERIES = 500
#: The ranks precision at rank 5 averages over.
RANKS = 5
#: Answers after which the estimate is worth reading (the dashboard shows it from then on).
MIN_ANSWERS = 10
#: The largest seed: new checks draw theirs from 0 to it.
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class PairImage:
    """One crop of a pair: its row in the gallery's index, its path relative to the dataset's
    folder, its camera (None when unknown)."""

    position: int
    path: str
    camera_id: int | None


@dataclass(frozen=True)
class CheckPair:
    """A pair the check asks about: ``candidate`` is the ``rank``-th nearest crop of ``query``
    among those from other cameras (cosine ``score``). Its answer samples precision at rank 1
    (``at_rank_1``: it is the query's first), at rank 5 (``at_rank_5``: its rank was drawn), or
    both."""

    index: int
    query: PairImage
    candidate: PairImage
    rank: int
    score: float
    at_rank_1: bool
    at_rank_5: bool

    @property
    def images(self) -> tuple[str, str]:
        """The pair as answers key it: unordered, the two paths sorted."""
        a, b = sorted((self.query.path, self.candidate.path))
        return a, b

    def to_json(self) -> dict[str, Any]:
        return {
            "query": [self.query.position, self.query.path, self.query.camera_id],
            "candidate": [self.candidate.position, self.candidate.path, self.candidate.camera_id],
            "rank": self.rank,
            "score": self.score,
            "at_rank_1": self.at_rank_1,
            "at_rank_5": self.at_rank_5,
        }

    @classmethod
    def from_json(cls, index: int, item: dict[str, Any]) -> CheckPair:
        return cls(
            index=index,
            query=PairImage(*item["query"]),
            candidate=PairImage(*item["candidate"]),
            rank=int(item["rank"]),
            score=float(item["score"]),
            at_rank_1=bool(item["at_rank_1"]),
            at_rank_5=bool(item["at_rank_5"]),
        )


@dataclass(frozen=True)
class CheckRequest:
    gallery_id: uuid.UUID
    queries: int | None = None  # default: the owner's first check of the dataset's, else 50
    seed: int | None = None  # default: the owner's first check of the dataset's, else random


@dataclass(frozen=True)
class CheckStatus:
    """A check with its pairs, the owner's answer on each (None: not answered yet) and the
    estimates they make."""

    check: PairCheck
    pairs: list[CheckPair]
    answers: list[PairAnswerValue | None]
    precision_at_1: Proportion
    precision_at_5: Proportion

    @property
    def answered(self) -> int:
        """Pairs with an answer (same, different or unsure)."""
        return sum(answer is not None for answer in self.answers)


@dataclass(frozen=True)
class AnsweredCheck:
    """A check after an answer changed, and where its estimate went: the MLflow run it was
    logged to, or why it was not."""

    status: CheckStatus
    mlflow_run_id: str | None
    mlflow_error: str | None


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def _camera(camid: int) -> int | None:
    return camid if camid >= 0 else None


def sample_pairs(
    index: GalleryIndex, dataset_path: str, seed: int, queries: int
) -> list[CheckPair]:
    """The pairs of a check of the gallery ``index`` (see the module): at most ``queries``
    queries, each with its rank-1 pair first and then its drawn-rank pair when that is another.
    Empty when every crop comes from one camera."""
    records = index.records
    paths = [relative_path(str(r.path), dataset_path) for r in records]
    cameras = [r.camid for r in records]
    per_camera = Counter(c for c in cameras if c >= 0)
    by_path = sorted(range(len(records)), key=paths.__getitem__)  # the same images, same order
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    draws: list[int] = []
    for place in rng.permutation(len(records)):
        position = by_path[place]
        camera = cameras[position]
        others = len(records) - (per_camera[camera] if camera >= 0 else 1)
        if others == 0:
            continue
        chosen.append(position)
        draws.append(int(rng.integers(1, min(RANKS, others) + 1)))
        if len(chosen) == queries:
            break
    pairs: list[CheckPair] = []

    def add(query: int, hit: Any, rank: int, at_rank_1: bool, at_rank_5: bool) -> None:
        pairs.append(
            CheckPair(
                index=len(pairs),
                query=PairImage(query, paths[query], _camera(cameras[query])),
                candidate=PairImage(hit.position, paths[hit.position], _camera(hit.camid)),
                rank=rank,
                score=hit.score,
                at_rank_1=at_rank_1,
                at_rank_5=at_rank_5,
            )
        )

    if not chosen:
        return pairs
    for query, draw, hits in zip(
        chosen, draws, index.nearest_from_other_cameras(chosen, RANKS), strict=True
    ):
        add(query, hits[0], 1, at_rank_1=True, at_rank_5=draw == 1)
        if draw != 1:
            add(query, hits[draw - 1], draw, at_rank_1=False, at_rank_5=True)
    return pairs


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def owned_check(session: Session, owner: str, check_id: uuid.UUID) -> PairCheck:
    return owned(session, PairCheck, owner, check_id, "check")


def _first_check_of(session: Session, owner: str, dataset_id: uuid.UUID) -> PairCheck | None:
    return session.execute(
        select(PairCheck)
        .where(PairCheck.owner == owner, PairCheck.dataset_id == dataset_id)
        .order_by(PairCheck.created_at, PairCheck.id)
        .limit(1)
    ).scalar_one_or_none()


def _check_of_gallery(session: Session, gallery_id: uuid.UUID) -> PairCheck | None:
    return session.execute(
        select(PairCheck).where(PairCheck.gallery_id == gallery_id)
    ).scalar_one_or_none()


def _same_request(check: PairCheck, request: CheckRequest) -> PairCheck:
    """The gallery's check when ``request`` asks for nothing else; refused otherwise."""
    asked = {"seed": request.seed, "queries": request.queries}
    has = {"seed": check.seed, "queries": check.query_count}
    differs = [name for name, value in asked.items() if value is not None and value != has[name]]
    if differs:
        raise ConflictError(
            "check_exists",
            f"gallery {check.gallery_id} already has check {check.id} with seed {check.seed} "
            f"and {check.query_count} queries ({', '.join(differs)} differ); use it, or delete "
            "it (DELETE /v1/checks/{id}; its answers are kept) to sample again",
        )
    return check


def create_check(
    session: Session, settings: Settings, owner: str, request: CheckRequest
) -> tuple[CheckStatus, bool]:
    """The gallery's check and whether it was made now: a gallery has one check, and asking
    again answers it. A new check needs a READY gallery whose dataset is still registered."""
    gallery = owned_gallery(session, owner, request.gallery_id)
    existing = _check_of_gallery(session, gallery.id)
    if existing is not None:
        return status_of(session, _same_request(existing, request)), False
    require_ready(gallery)
    if gallery.dataset_id is None:
        raise ConflictError(
            "dataset_gone",
            f"the dataset of gallery {gallery.id} was deleted: answers belong to a dataset's "
            "images; register the dataset again and build a gallery of it",
        )
    first = _first_check_of(session, owner, gallery.dataset_id)
    seed = request.seed
    if seed is None:
        seed = first.seed if first is not None else secrets.randbelow(MAX_SEED + 1)
    queries = request.queries
    if queries is None:
        queries = first.query_count if first is not None else DEFAULT_QUERIES
    index = ready_index(settings, gallery)
    pairs = sample_pairs(index, gallery.dataset_path, seed, queries)
    if not pairs:
        raise ConflictError(
            "no_pairs",
            f"every image of gallery {gallery.id} comes from one camera: there is no pair of "
            "crops from two cameras to judge",
        )
    check = PairCheck(
        id=uuid.uuid4(),
        owner=owner,
        gallery_id=gallery.id,
        dataset_id=gallery.dataset_id,
        model_name=gallery.model_name,
        model_version=gallery.model_version,
        seed=seed,
        query_count=queries,
        pairs=[pair.to_json() for pair in pairs],
    )
    session.add(check)
    try:
        session.commit()
    except IntegrityError:  # made meanwhile by another request for the same gallery
        session.rollback()
        existing = _check_of_gallery(session, gallery.id)
        if existing is None:
            raise
        return status_of(session, _same_request(existing, request)), False
    return status_of(session, check), True


def list_checks(
    session: Session,
    owner: str,
    limit: int,
    offset: int = 0,
    after: Cursor | None = None,
    gallery_id: uuid.UUID | None = None,
) -> OwnedPage[PairCheck]:
    """``owner``'s checks, newest first (of one gallery when ``gallery_id`` is given)."""
    conditions = [] if gallery_id is None else [PairCheck.gallery_id == gallery_id]
    return owned_page(
        session, PairCheck, owner, *conditions, limit=limit, offset=offset, after=after
    )


def delete_check(session: Session, owner: str, check_id: uuid.UUID) -> None:
    """Delete the check (its sample of pairs); the answers stay, for the dataset's next check."""
    session.delete(owned_check(session, owner, check_id))
    session.commit()


def _pairs(check: PairCheck) -> list[CheckPair]:
    return [CheckPair.from_json(i, item) for i, item in enumerate(check.pairs)]


def status_of(session: Session, check: PairCheck) -> CheckStatus:
    """``check`` with its pairs, its owner's answers on them and the estimates they make."""
    pairs = _pairs(check)
    rows = session.execute(
        select(PairAnswer.image_a, PairAnswer.image_b, PairAnswer.answer).where(
            PairAnswer.owner == check.owner, PairAnswer.dataset_id == check.dataset_id
        )
    ).all()
    known = {(a, b): answer for a, b, answer in rows}
    answers = [known.get(pair.images) for pair in pairs]
    return CheckStatus(
        check=check,
        pairs=pairs,
        answers=answers,
        precision_at_1=proportion(a for p, a in zip(pairs, answers, strict=True) if p.at_rank_1),
        precision_at_5=proportion(a for p, a in zip(pairs, answers, strict=True) if p.at_rank_5),
    )


def check_status(session: Session, owner: str, check_id: uuid.UUID) -> CheckStatus:
    """``owner``'s check with its pairs, answers and estimates."""
    return status_of(session, owned_check(session, owner, check_id))


# ----------------------------------------------------------------------------------------------
# answers
# ----------------------------------------------------------------------------------------------


def _pair(check: PairCheck, index: int) -> CheckPair:
    if not 0 <= index < len(check.pairs):
        raise NotFoundError(
            "pair_not_found",
            f"check {check.id} has no pair {index}: its pairs are 0 to {len(check.pairs) - 1}",
        )
    return CheckPair.from_json(index, check.pairs[index])


def _store(session: Session, check: PairCheck, pair: CheckPair, answer: PairAnswerValue) -> None:
    """Insert or change the owner's answer on ``pair``, committed; a concurrent first answer on
    the same pair makes this one a change of it."""
    image_a, image_b = pair.images
    key = (
        PairAnswer.owner == check.owner,
        PairAnswer.dataset_id == check.dataset_id,
        PairAnswer.image_a == image_a,
        PairAnswer.image_b == image_b,
    )
    for attempt in range(2):
        row = session.execute(select(PairAnswer).where(*key)).scalar_one_or_none()
        if row is None:
            session.add(
                PairAnswer(
                    owner=check.owner,
                    dataset_id=check.dataset_id,
                    image_a=image_a,
                    image_b=image_b,
                    answer=answer,
                )
            )
        else:
            row.answer = answer
        try:
            session.commit()
            return
        except IntegrityError:
            session.rollback()
            if attempt:
                raise


def _metrics(status: CheckStatus) -> dict[str, float]:
    metrics = {HumanMetric.ANSWERS.value: float(status.answered)}
    for estimate, value, low, high in (
        (
            status.precision_at_1,
            HumanMetric.PRECISION_AT_1,
            HumanMetric.PRECISION_AT_1_LOW,
            HumanMetric.PRECISION_AT_1_HIGH,
        ),
        (
            status.precision_at_5,
            HumanMetric.PRECISION_AT_5,
            HumanMetric.PRECISION_AT_5_LOW,
            HumanMetric.PRECISION_AT_5_HIGH,
        ),
    ):
        if estimate.estimate is not None:
            metrics.update({value: estimate.estimate, low: estimate.low, high: estimate.high})
    return metrics


def _log(settings: Settings, status: CheckStatus) -> AnsweredCheck:
    """Log the check's estimate to its version's run (:class:`HumanMetric`)."""
    check = status.check
    registry = ModelRegistry(settings)
    try:
        run_id = registry.log_version_metrics(
            check.owner, check.model_name, check.model_version, _metrics(status)
        )
        # a new human precision may move best (service.core.best's rule)
        registry.with_client(
            check.model_name, lambda client: move_best_alias(client, check.model_name)
        )
    except ServiceError as exc:
        log.warning("check %s: the estimate did not reach MLflow: %s", check.id, exc.message)
        return AnsweredCheck(status, None, exc.message)
    return AnsweredCheck(status, run_id, None)


def answer_pair(
    session: Session,
    settings: Settings,
    owner: str,
    check_id: uuid.UUID,
    index: int,
    answer: PairAnswerValue | None,
) -> AnsweredCheck:
    """Record ``owner``'s ``answer`` on pair ``index`` of the check (None takes the answer
    back), then log the new estimate to the version's MLflow run. The answer is the pair's, so
    it counts in every check of the dataset that shows the same two images."""
    check = owned_check(session, owner, check_id)
    pair = _pair(check, index)
    if answer is None:
        image_a, image_b = pair.images
        session.execute(
            delete(PairAnswer).where(
                PairAnswer.owner == owner,
                PairAnswer.dataset_id == check.dataset_id,
                PairAnswer.image_a == image_a,
                PairAnswer.image_b == image_b,
            )
        )
        session.commit()
    else:
        _store(session, check, pair, answer)
    return _log(settings, status_of(session, check))
