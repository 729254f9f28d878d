"""Pseudo labels from features: k-reciprocal Jaccard distance and DBSCAN (cluster contrast)."""

from reid_core.clustering.pseudo_labels import (
    Clustering,
    ClusteringStats,
    choose_eps,
    cluster_features,
    fuse_features,
    jaccard_graph,
)

__all__ = [
    "Clustering",
    "ClusteringStats",
    "choose_eps",
    "cluster_features",
    "fuse_features",
    "jaccard_graph",
]
