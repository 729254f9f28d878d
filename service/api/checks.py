"""/v1/checks: a person judges sampled pairs of a gallery's crops (same person or not), and the
answers estimate the gallery's model version's precision at ranks 1 and 5 with 95% intervals.

``POST /v1/checks`` makes a gallery's check (:func:`service.core.pair_checks.create_check`), ``GET
/{id}/pairs`` lists its pairs with your answers, ``PUT /{id}/pairs/{index}/answer`` answers one
(``DELETE`` takes the answer back) and answers the new estimate, which is also logged to the
version's MLflow run. Answers belong to the pair of images, so a retrained version's check of
the same dataset reuses them.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam

from service.api.auth import CurrentOwner
from service.api.deps import PageDep, SessionDep, SettingsDep
from service.api.schemas import (
    COMMON_ERRORS,
    CheckAnsweredOut,
    CheckCreate,
    CheckOut,
    Page,
    PairAnswerIn,
    PairList,
    PairOut,
    PrecisionOut,
    error_responses,
)
from service.core import pair_checks
from service.core.pair_estimate import Proportion

router = APIRouter(prefix="/v1/checks", tags=["checks"], responses=COMMON_ERRORS)

PairIndex = Annotated[
    int, PathParam(ge=0, description="The pair's `index` in the check (GET .../pairs).")
]


def _precision(estimate: Proportion) -> PrecisionOut:
    return PrecisionOut.model_validate(estimate, from_attributes=True)


def _fields(status: pair_checks.CheckStatus) -> dict[str, object]:
    check = status.check
    return {
        "id": check.id,
        "gallery_id": check.gallery_id,
        "dataset_id": check.dataset_id,
        "model_name": check.model_name,
        "model_version": check.model_version,
        "seed": check.seed,
        "queries": check.query_count,
        "pairs": len(status.pairs),
        "answered": status.answered,
        "min_answers": pair_checks.MIN_ANSWERS,
        "precision_at_1": _precision(status.precision_at_1),
        "precision_at_5": _precision(status.precision_at_5),
        "created_at": check.created_at,
    }


def _out(status: pair_checks.CheckStatus) -> CheckOut:
    return CheckOut.model_validate(_fields(status))


def _answered(answered: pair_checks.AnsweredCheck) -> CheckAnsweredOut:
    return CheckAnsweredOut.model_validate(
        {
            **_fields(answered.status),
            "mlflow_run_id": answered.mlflow_run_id,
            "mlflow_error": answered.mlflow_error,
        }
    )


@router.post(
    "",
    status_code=201,
    summary="Check a gallery's model version by hand: sample the pairs to judge",
    responses={
        200: {"model": CheckOut, "description": "The gallery's check, made before"},
        **error_responses(
            e404="Unknown gallery",
            e409="The gallery is not READY, its dataset was deleted, its images all come from "
            "one camera, or its check was made with another seed or number of queries",
        ),
    },
)
def create_check(
    body: CheckCreate,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
    response: Response,
) -> CheckOut:
    """Queries are sampled uniformly from the gallery's images (those with a crop from another
    camera), with the check's seed; each is paired with its nearest crop from another camera
    (its answer samples precision at rank 1) and with the crop at a rank drawn uniformly from 1
    to 5 (precision at rank 5; the same pair when the draw is 1). A gallery has one check: asking
    again answers it (200)."""
    request = pair_checks.CheckRequest(**body.model_dump())
    status, created = pair_checks.create_check(session, settings, owner, request)
    response.headers["Location"] = f"/v1/checks/{status.check.id}"
    if not created:
        response.status_code = 200
    return _out(status)


@router.get("", summary="Your checks, newest first")
def list_checks(
    owner: CurrentOwner,
    session: SessionDep,
    paging: PageDep,
    gallery_id: Annotated[
        uuid.UUID | None, Query(description="Only the check of this gallery.")
    ] = None,
) -> Page[CheckOut]:
    page = pair_checks.list_checks(
        session, owner, paging.limit, paging.offset, paging.after, gallery_id
    )
    items = [_out(pair_checks.status_of(session, check)) for check in page.rows]
    return Page[CheckOut].of(items, page, paging.limit, paging.offset)


@router.get(
    "/{check_id:uuid}",
    summary="One check: pairs answered and the estimates with their 95% intervals",
    responses=error_responses(e404="Unknown check"),
)
def get_check(check_id: uuid.UUID, owner: CurrentOwner, session: SessionDep) -> CheckOut:
    return _out(pair_checks.check_status(session, owner, check_id))


@router.delete(
    "/{check_id:uuid}",
    status_code=204,
    summary="Delete a check (its sample of pairs); your answers are kept",
    responses=error_responses(e404="Unknown check"),
)
def delete_check(check_id: uuid.UUID, owner: CurrentOwner, session: SessionDep) -> Response:
    pair_checks.delete_check(session, owner, check_id)
    return Response(status_code=204)


@router.get(
    "/{check_id:uuid}/pairs",
    summary="The check's pairs in asking order, with your answers",
    responses=error_responses(e404="Unknown check"),
)
def list_pairs(check_id: uuid.UUID, owner: CurrentOwner, session: SessionDep) -> PairList:
    """Each query's rank-1 pair, then its drawn-rank pair when that is another one. Any prefix
    of the queries is a uniform sample, so answering in this order gives usable estimates
    early. A pair answered in another check of the dataset (another version) shows that
    answer."""
    status = pair_checks.check_status(session, owner, check_id)
    return PairList(
        items=[
            PairOut(**dataclasses.asdict(pair), answer=answer)
            for pair, answer in zip(status.pairs, status.answers, strict=True)
        ]
    )


@router.put(
    "/{check_id:uuid}/pairs/{index}/answer",
    summary="Answer a pair: same person, different people, or unsure",
    responses=error_responses(e404="Unknown check, or no pair with that index"),
)
def answer_pair(
    check_id: uuid.UUID,
    index: PairIndex,
    body: PairAnswerIn,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
) -> CheckAnsweredOut:
    """The answer is yours and the two images', not this check's: it counts in every check of
    the dataset that shows them (another version's too), and answering again changes it. The
    new estimate is logged to the version's MLflow run (`human/precision_at_1`, `..._low`,
    `..._high`, the same at 5, and `human/answers`, at step 0: the newest value is the current
    one); an MLflow that does not answer leaves the answer stored (`mlflow_error` says why)."""
    return _answered(
        pair_checks.answer_pair(session, settings, owner, check_id, index, body.answer)
    )


@router.delete(
    "/{check_id:uuid}/pairs/{index}/answer",
    summary="Take an answer back (undo)",
    responses=error_responses(e404="Unknown check, or no pair with that index"),
)
def take_back_answer(
    check_id: uuid.UUID,
    index: PairIndex,
    owner: CurrentOwner,
    session: SessionDep,
    settings: SettingsDep,
) -> CheckAnsweredOut:
    """The pair is unanswered again, in every check that shows it; the estimate is logged
    again. Taking back an answer that was not there changes nothing."""
    return _answered(pair_checks.answer_pair(session, settings, owner, check_id, index, None))
