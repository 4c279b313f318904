"""Hyperparameter-optimization experiments on the general bilevel core (not few-shot).

``python train.py experiment=hyper_cleaning_mnist`` runs :func:`hyper_cleaning.run` and
``python train.py experiment=effect_of_T`` runs :func:`effect_of_t.run`, through the
config's ``runner``.
"""

from metalearn.hpo.effect_of_t import (
    RepresentationData,
    make_gaussian_mixture,
    optimize_representation,
    representation_problem,
    solve_inner,
    stable_inner_lr,
)
from metalearn.hpo.hyper_cleaning import (
    HYPERGRADIENT_METHODS,
    HyperCleaningData,
    detector_metrics,
    evaluate_classifier,
    hyper_cleaning_problem,
    make_hyper_cleaning_data,
    optimize_example_weights,
    train_weighted,
)

__all__ = [
    "HYPERGRADIENT_METHODS",
    "HyperCleaningData",
    "RepresentationData",
    "detector_metrics",
    "evaluate_classifier",
    "hyper_cleaning_problem",
    "make_gaussian_mixture",
    "make_hyper_cleaning_data",
    "optimize_example_weights",
    "optimize_representation",
    "representation_problem",
    "solve_inner",
    "stable_inner_lr",
    "train_weighted",
]
