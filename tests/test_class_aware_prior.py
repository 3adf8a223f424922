"""The class-aware prior m chosen by cross-validation on the fitting outputs."""

import pytest
import torch

from policycascade.agents.class_aware import (
    CV_FOLDS,
    CV_SEED,
    DEFAULT_PRIOR_SAMPLES,
    ClassAwareSearch,
    cross_validate_prior,
)
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.evaluation import evaluate_rule

ALPHAS = (0.01, 0.1, 0.3)


def _outputs(n: int, c: int, seed: int, twin: int | None = None) -> CascadeOutputs:
    """Stage 0 is right with probability equal to its confidence, the same for every class;
    the last stage is always right. With ``twin``, stage 0 answers that class as class 0, as
    confidently as the rest: class 0's best threshold differs from the others'."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(c, (n,), generator=g)
    conf = 0.4 + 0.6 * torch.rand(n, generator=g)
    right = torch.rand(n, generator=g) < conf
    wrong = (labels + torch.randint(1, c, (n,), generator=g)) % c
    predicted = torch.where(right, labels, wrong)
    if twin is not None:
        predicted = torch.where(labels == twin, 0, predicted)
    first = ((1 - conf) / (c - 1)).unsqueeze(1).repeat(1, c)
    first[torch.arange(n), predicted] = conf
    last = torch.full((n, c), 0.02 / (c - 1))
    last[torch.arange(n), labels] = 0.98
    return CascadeOutputs(torch.stack([first, last], 1), labels, StageCosts([10, 100]))


@pytest.mark.parametrize("seed", range(4))
def test_cv_keeps_a_large_prior_when_every_class_behaves_alike(seed):
    outputs = _outputs(1000, 4, seed)
    search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, alphas=ALPHAS)
    assert search.prior_samples >= 200
    assert set(search.prior_scores) == {0.0, 10.0, 50.0, 200.0, 1000.0}
    assert search.prior_scores[search.prior_samples] == max(search.prior_scores.values())


@pytest.mark.parametrize("seed", range(4))
def test_cv_picks_a_small_prior_when_one_class_needs_its_own_threshold(seed):
    outputs = _outputs(1000, 4, seed, twin=3)
    search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, alphas=ALPHAS)
    assert search.prior_samples <= 50
    # and the fit it makes never stops on class 0 at stage 0 at a small cost weight
    assert search.for_reward(0.01).thresholds[0][0] > 0.99


def test_cv_scores_equal_the_held_out_reward_of_separate_fits():
    """Each m's score is the held-out reward of for_reward fits made on the other folds."""
    outputs = _outputs(120, 3, seed=7, twin=2)
    grid, alphas, folds = (0.0, 5.0, 1000.0), (0.05, 0.2), 3
    search = ClassAwareSearch(
        outputs.probs, outputs.labels, outputs.costs, alphas=alphas, prior_grid=grid, folds=folds
    )
    scores = cross_validate_prior(search)
    n = len(outputs.labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(CV_SEED))
    for m in grid:
        total = 0.0
        for k in range(folds):
            held = order[k::folds]
            kept = torch.ones(n, dtype=torch.bool)
            kept[held] = False
            fit = ClassAwareSearch(
                outputs.probs[kept], outputs.labels[kept], outputs.costs, prior_samples=m
            )
            test = CascadeOutputs(outputs.probs[held], outputs.labels[held], outputs.costs)
            for alpha in alphas:
                result = evaluate_rule(fit.for_reward(alpha), test)
                total += len(held) * (result["accuracy"] - alpha * result["macs_share"])
        assert scores[m] == pytest.approx(total / n, abs=1e-9)


def test_an_explicit_prior_skips_cross_validation_and_tiny_data_keeps_the_default():
    outputs = _outputs(200, 3, seed=1)
    search = ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, prior_samples=7)
    assert search.prior_samples == 7.0 and search.prior_scores is None
    tiny = _outputs(2 * CV_FOLDS - 1, 3, seed=2)
    small = ClassAwareSearch(tiny.probs, tiny.labels, tiny.costs)
    assert small.prior_samples == DEFAULT_PRIOR_SAMPLES and small.prior_scores is None


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"prior_samples": "auto"}, "prior_samples"),
        ({"prior_samples": -1.0}, "prior_samples"),
        ({"prior_samples": True}, "prior_samples"),
        ({"folds": 1}, "folds"),
        ({"prior_grid": (0.0, -5.0)}, "prior_grid"),
        ({"prior_grid": ()}, "prior_grid"),
    ],
)
def test_bad_cross_validation_settings_are_refused_by_name(kwargs, named):
    outputs = _outputs(50, 3, seed=0)
    with pytest.raises(ValueError, match=named):
        ClassAwareSearch(outputs.probs, outputs.labels, outputs.costs, **kwargs)
