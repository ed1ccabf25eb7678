"""Evaluation protocols on a pretrained backbone: weighted kNN, the linear protocol, few-label
fine-tuning, retrieval, and representation diagnostics."""

from .diagnostics import (
    alignment,
    dictionary_consistency,
    dimension_std,
    effective_rank,
    embedding_diagnostics,
    run_diagnostics,
    uniformity,
)
from .features import extract_augmented_features, extract_features
from .finetune import balanced_subset, finetune
from .knn import knn_accuracy, knn_predict, nearest_neighbours
from .linear import LINEAR_RECIPES, linear_probe
from .retrieval import retrieval_metrics, retrieve

__all__ = [
    "LINEAR_RECIPES",
    "alignment",
    "balanced_subset",
    "dictionary_consistency",
    "dimension_std",
    "effective_rank",
    "embedding_diagnostics",
    "extract_augmented_features",
    "extract_features",
    "finetune",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "nearest_neighbours",
    "retrieval_metrics",
    "retrieve",
    "run_diagnostics",
    "uniformity",
]
