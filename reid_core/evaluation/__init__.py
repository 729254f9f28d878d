"""Evaluation: distances, CMC/mAP/mINP (Market-1501 protocol), k-reciprocal re-ranking, faiss
k-NN search and feature extraction. faiss is optional and imported only by the search
functions."""

from reid_core.evaluation.distance import METRICS, Metric, compute_distance
from reid_core.evaluation.evaluator import (
    centre_per_camera,
    evaluate_features,
    extract_features,
)
from reid_core.evaluation.metrics import RankResult, evaluate_rank
from reid_core.evaluation.rerank import (
    DEFAULT_RERANK_MAX_MEMORY_BYTES,
    RerankMemoryError,
    check_rerank_memory,
    estimate_rerank_memory,
    re_rank,
    re_rank_features,
)
from reid_core.evaluation.search import build_index, knn_search, load_index, save_index

__all__ = [
    "DEFAULT_RERANK_MAX_MEMORY_BYTES",
    "METRICS",
    "Metric",
    "RankResult",
    "RerankMemoryError",
    "build_index",
    "centre_per_camera",
    "check_rerank_memory",
    "compute_distance",
    "estimate_rerank_memory",
    "evaluate_features",
    "evaluate_rank",
    "extract_features",
    "knn_search",
    "load_index",
    "re_rank",
    "re_rank_features",
    "save_index",
]
