"""Compare every stopping policy on the same classifiers: ``policycascade compare RUN_DIR...``.

For each run, the classifiers' softmaxes on the validation and test splits are cached
once; every policy (the run's own rule, its stop score as a curve, threshold rules of
every criterion fitted on validation, random stopping at matched cost, the oracle, each
classifier alone) is evaluated on the test split by the same function.
"""

from policycascade.compare.cli import main
from policycascade.compare.policies import CompareOptions, Matched, compare_outputs
from policycascade.compare.rows import Aggregate, Row, aggregate
from policycascade.compare.savings import RunSavings, run_savings

__all__ = [
    "Aggregate",
    "CompareOptions",
    "Matched",
    "Row",
    "RunSavings",
    "aggregate",
    "compare_outputs",
    "main",
    "run_savings",
]
