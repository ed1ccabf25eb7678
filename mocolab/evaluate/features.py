"""Frozen-backbone features: moved to :mod:`mocolab.features` (the methods use them too, and
evaluation sits above the methods); re-exported here."""

from ..features import (
    classifier_augment,
    cpu_features,
    extract_augmented_features,
    extract_features,
)

__all__ = [
    "classifier_augment",
    "cpu_features",
    "extract_augmented_features",
    "extract_features",
]
