import torch

from conftest import random_outputs
from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import ThresholdRule, ThresholdSearch
from policycascade.evaluation import evaluate_rule


def test_ensemble_threshold_reads_the_running_mean_and_answers_with_it():
    # two stages, one sample: stage 0 says class 0 (0.6), stage 1 says class 1 (0.55);
    # their mean (0.45, 0.5, 0.05) answers class 1 with confidence 0.5
    probs = torch.tensor([[[0.6, 0.3, 0.1], [0.3, 0.7, 0.0]]])
    rule = ThresholdRule("ensemble", [0.55])
    assert torch.allclose(rule.confidences(probs), torch.tensor([[0.6]]))
    last = torch.tensor([1])
    assert rule.predictions(probs, last).item() == 1  # mean (0.45, 0.5, 0.05)
    assert rule.predictions(probs, torch.tensor([0])).item() == 0


def test_ensemble_search_scores_the_ensembles_answers():
    out = random_outputs(400, 3, 4, seed=3)
    search = ThresholdSearch(out.probs, out.labels, out.costs, "ensemble")
    for rule in (search.for_accuracy_drop(0.0), search.for_budget(out.costs.reference_macs)):
        exits = exit_stages(rule, out.probs)
        mean = out.probs.cumsum(1) / torch.arange(1, 4).view(1, -1, 1)
        answers = mean[torch.arange(400), exits].argmax(-1)
        expected = (answers == out.labels).double().mean().item()
        assert evaluate_rule(rule, out)["accuracy"] == expected
        accuracy, _ = search.evaluate_many(torch.tensor([rule.thresholds], dtype=torch.float64))
        assert abs(float(accuracy[0]) - expected) < 1e-12
