"""Learning to Cascade: loss by hand, gradient direction, eq. (5)/(6) training, thresholds."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from policycascade.agents.ltc import MultiExitNet, cascade_loss, ltc_loss, multi_exit_ltc_loss
from policycascade.agents.ltc_training import LtcTraining
from policycascade.agents.rules import StoppingRule, stop_decisions
from policycascade.agents.thresholds import ThresholdRule
from policycascade.cascade import Cascade, CascadeOutputs
from policycascade.config import LtcConfig, TrainConfig
from policycascade.costs import StageCosts, count_macs
from policycascade.data import Split
from policycascade.data.splits import DataSplits
from policycascade.evaluation import evaluate_exits, evaluate_rule, first_stop
from policycascade.harness import RunHarness
from policycascade.optimizers import build_optimizer
from policycascade.supervised import batches


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log p, up to rounding)."""
    return torch.tensor(probs).log()


def test_ltc_loss_matches_hand_computation():
    # C = 0.5. Per sample: conf * 1{fast wrong} + (1 - conf) * (1{expensive wrong} + C)
    # s0: label 0, fast p=[0.8, 0.2] right (conf 0.8), expensive wrong: 0.2 * 1.5 = 0.30
    # s1: label 1, fast p=[0.6, 0.4] wrong (conf 0.6), expensive right: 0.6 + 0.4 * 0.5 = 0.80
    # s2: label 1, fast p=[0.3, 0.7] right (conf 0.7), expensive right: 0.3 * 0.5 = 0.15
    # L_casc = 1.25 / 3 = 0.416667
    # CE = -(ln 0.8 + ln 0.4 + ln 0.7) / 3 = 0.498703; with w = 2: 0.498703 + 0.833333 = 1.332036
    fast = logits_of([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1])
    expensive_correct = torch.tensor([False, True, True])
    assert float(cascade_loss(fast, labels, expensive_correct, cost=0.5)) == pytest.approx(
        1.25 / 3, abs=1e-6
    )
    assert float(ltc_loss(fast, labels, expensive_correct, cost=0.5, weight=2.0)) == pytest.approx(
        1.332036, abs=1e-6
    )
    # weight 0 leaves the plain cross-entropy
    expected_ce = -(math.log(0.8) + math.log(0.4) + math.log(0.7)) / 3
    assert float(ltc_loss(fast, labels, expensive_correct, weight=0.0)) == pytest.approx(
        expected_ce, abs=1e-6
    )
    with pytest.raises(ValueError, match="expensive_correct"):
        cascade_loss(fast, labels, expensive_correct[:2], cost=0.5)


def test_gradient_lowers_confidence_only_where_only_the_expensive_model_is_right():
    # Four samples with the same fast softmax [0.6, 0.4] (conf 0.6); the label decides
    # whether the fast model is right. dL/dconf = 1{fast wrong} - 1{exp wrong} - C:
    # only-expensive-right +0.5 (down), only-fast-right -1.5 (up, most), both -0.5, neither -0.5.
    fast = logits_of([[0.6, 0.4]] * 4).requires_grad_()
    labels = torch.tensor([1, 0, 0, 1])  # fast wrong, right, right, wrong
    expensive_correct = torch.tensor([True, False, True, False])
    cascade_loss(fast, labels, expensive_correct, cost=0.5).backward()
    stepped = (fast.detach() - 0.1 * fast.grad).softmax(-1).max(-1).values
    change = stepped - 0.6
    assert change[0] < 0  # only the expensive model is right: defer to it
    assert (change[1:] > 0).all()
    assert change[1] > change[2] and change[1] > change[3]  # only the fast model is right
    assert change[2] == pytest.approx(float(change[3]), abs=1e-6)


def test_multi_exit_loss_is_eq6_sum_over_exit_pairs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 4, generator=g)
    labels = torch.randint(4, (6,), generator=g)
    correct = logits.argmax(-1) == labels.unsqueeze(1)
    expected = sum(
        ltc_loss(logits[:, m], labels, correct[:, m + 1], cost=0.3, weight=1.7) for m in range(2)
    ) + F.cross_entropy(logits[:, 2], labels)
    got = multi_exit_ltc_loss(logits, labels, cost=0.3, weight=1.7)
    torch.testing.assert_close(got, expected)


# --- thresholds ---------------------------------------------------------------------------


def val_outputs(n: int, k: int, macs: list[int], seed: int = 0) -> CascadeOutputs:
    """Random softmaxes over 5 classes whose later stages lean harder towards the label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, (n,), generator=g)
    logits = torch.randn(n, k, 5, generator=g) * 1.5
    logits[torch.arange(n), :, labels] += torch.linspace(0.5, 3.0, k)
    return CascadeOutputs(logits.softmax(-1), labels, StageCosts(macs))


def max_softmax(thresholds: list[float]) -> ThresholdRule:
    return ThresholdRule("max-softmax", thresholds)


def metrics_of(rule: StoppingRule, outputs: CascadeOutputs) -> dict:
    return evaluate_exits(outputs, first_stop(stop_decisions(rule, outputs.probs)))


def ltc_rule(outputs: CascadeOutputs, epsilon: float) -> ThresholdRule:
    """LtcTraining's own threshold fit, with ``outputs`` as its validation split."""
    ltc = LtcTraining.__new__(LtcTraining)  # the fit needs no cascade, only val outputs
    ltc.harness = SimpleNamespace(outputs=lambda split: outputs)
    ltc.settings, ltc.thresholds = LtcConfig(epsilon=epsilon), None
    ltc._fit_thresholds()
    return ltc.rule()


def test_ltc_rule_is_a_max_softmax_threshold_rule():
    rule = max_softmax([0.75, float("inf")])
    assert isinstance(rule, StoppingRule)
    assert rule.num_stages == 3 and rule.policy_macs() == [0, 0, 0]
    probs = torch.tensor([[[0.75, 0.25]] * 3, [[0.625, 0.375]] * 3])
    # conf == threshold stops (0.75 is exact in float32 and float64); +inf never stops;
    # the last stage always does
    assert stop_decisions(rule, probs).tolist() == [[True, False, True], [False, False, True]]


def hand_two_stage() -> CascadeOutputs:
    """K=2, MACs 10/100. Stage 0's confidences 0.9, 0.8, 0.7, 0.6; it is wrong on the 0.8 one.

    Stage 1 is right on all four. Threshold 0.9 stops only sample 0: accuracy 1, mean MACs
    (10 + 3 * 110) / 4 = 85. Any threshold in (0.6, 0.8] lets sample 1 out wrong (0.75);
    0.6 stops everyone at stage 0: accuracy 0.75 at 10 MACs.
    """
    probs = torch.tensor(
        [
            [[0.9, 0.1], [0.95, 0.05]],
            [[0.2, 0.8], [0.95, 0.05]],
            [[0.7, 0.3], [0.95, 0.05]],
            [[0.6, 0.4], [0.95, 0.05]],
        ]
    )
    return CascadeOutputs(probs, torch.zeros(4, dtype=torch.int64), StageCosts([10, 100]))


@pytest.mark.parametrize(
    "epsilon, threshold, accuracy, mean_macs",
    [(0.0, 0.9, 1.0, 85.0), (0.1, 0.9, 1.0, 85.0), (0.25, 0.6, 0.75, 10.0)],
)
def test_ltc_thresholds_on_a_hand_built_two_stage_cascade(epsilon, threshold, accuracy, mean_macs):
    outputs = hand_two_stage()
    rule = ltc_rule(outputs, epsilon)
    assert rule.criterion == "max-softmax" and rule.thresholds == pytest.approx([threshold])
    m = evaluate_rule(rule, outputs)
    assert (m["accuracy"], m["mean_macs"]) == (accuracy, mean_macs)
    # exhaustive: no threshold at all (every confidence, +-inf, and between them) is
    # feasible and cheaper
    candidates = [float("-inf"), 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, float("inf")]
    feasible = [
        evaluate_rule(max_softmax([d]), outputs)
        for d in candidates
        if evaluate_rule(max_softmax([d]), outputs)["accuracy"] >= (1 - epsilon) * 1.0
    ]
    assert m["mean_macs"] == min(f["mean_macs"] for f in feasible)


EPSILONS = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


def test_two_stage_thresholds_are_the_exact_cheapest_feasible_and_monotone_in_epsilon():
    outputs = val_outputs(200, 2, [10, 100])
    last_accuracy = metrics_of(max_softmax([float("inf")]), outputs)["accuracy"]
    candidates = outputs.probs[:, 0].max(-1).values.unique().tolist() + [float("inf")]
    brute = [metrics_of(max_softmax([d]), outputs) for d in candidates]
    mean_macs = []
    for epsilon in EPSILONS:
        m = metrics_of(ltc_rule(outputs, epsilon), outputs)
        # LtC's constraint is relative: (1 - epsilon) x the last classifier's accuracy
        required = (1 - epsilon) * last_accuracy - 1e-12
        assert m["accuracy"] >= required
        assert m["mean_macs"] == min(b["mean_macs"] for b in brute if b["accuracy"] >= required)
        mean_macs.append(m["mean_macs"])
    # a looser constraint never costs more
    assert all(a >= b for a, b in zip(mean_macs[:-1], mean_macs[1:], strict=True))
    assert mean_macs[-1] < mean_macs[0]


def test_three_stage_thresholds_are_feasible_and_no_single_threshold_can_do_cheaper():
    outputs = val_outputs(150, 3, [10, 40, 100], seed=1)
    last_alone = metrics_of(max_softmax([float("inf")] * 2), outputs)
    for epsilon in (0.0, 0.05):
        rule = ltc_rule(outputs, epsilon)
        fitted = metrics_of(rule, outputs)
        required = (1 - epsilon) * last_alone["accuracy"] - 1e-12
        assert fitted["accuracy"] >= required
        assert fitted["mean_macs"] < last_alone["mean_macs"]
        for t in range(2):  # coordinate-wise optimal: checked through evaluate_exits
            for delta in outputs.probs[:, t].max(-1).values.unique().tolist() + [float("inf")]:
                thresholds = list(rule.thresholds)
                thresholds[t] = delta
                m = metrics_of(max_softmax(thresholds), outputs)
                assert m["accuracy"] < required or m["mean_macs"] >= fitted["mean_macs"]
    with pytest.raises(ValueError, match="epsilon"):
        LtcConfig(epsilon=1.0).validate()


# --- training through the run harness ------------------------------------------------------

EPOCHS, LR, BATCH, SEED = 3, 1e-2, 16, 7


def tiny_split(n: int, shape: tuple[int, ...], classes: int = 3) -> Split:
    g = torch.Generator().manual_seed(3)
    return Split(torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g))


def tiny_cascade() -> Cascade:
    torch.manual_seed(0)
    return Cascade(
        [
            nn.Linear(4, 3),
            nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
            nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
        ],
        input_shape=(4,),
        num_classes=3,
    )


def ltc_harness(tmp_path, split: Split, num_classes: int, **ltc) -> RunHarness:
    """An LtC run on ``split`` (train, val and test alike) on the CPU."""
    config = TrainConfig(
        agent="ltc",
        lr=LR,
        batch_size=BATCH,
        seed=SEED,
        device="cpu",
        ltc=LtcConfig(epochs=EPOCHS, **ltc),
    )
    data = DataSplits("tiny", split, split, split, num_classes)
    return RunHarness(config, tmp_path, show_progress=False, data=data)


def fit_reference(model: nn.Module, split: Split, seed: int, loss) -> nn.Module:
    """The documented schedule: the run's optimiser, ``EPOCHS`` epochs of batches from ``seed``."""
    defaults = TrainConfig()
    g = torch.Generator().manual_seed(seed)
    opt = build_optimizer(defaults.optimizer, model.parameters(), LR, defaults.weight_decay)
    model.train()
    for _ in range(EPOCHS):
        for idx in batches(len(split), BATCH, g):
            opt.zero_grad()
            loss(model(split.x[idx]), idx).backward()
            opt.step()
    return model.eval()


def test_sequential_training_follows_eq5_from_the_most_expensive_down(tmp_path, monkeypatch):
    split = tiny_split(48, (4,))
    x, y = split.x, split.y
    initial = tiny_cascade()
    monkeypatch.setattr(RunHarness, "build_cascade", lambda self: copy.deepcopy(initial))
    harness = ltc_harness(tmp_path, split, 3, cost=0.5, weight=2.0)
    metrics = harness.run()
    trained = harness.cascade
    assert harness.epoch == 3 * EPOCHS  # one part per model

    def plain_ce(logits, idx):
        return F.cross_entropy(logits, y[idx])

    # The most expensive model: plain cross-entropy, never touched again (BN buffers included).
    expensive = fit_reference(copy.deepcopy(initial.classifiers[2]), split, SEED + 2, plain_ce)
    torch.testing.assert_close(trained.classifiers[2].state_dict(), expensive.state_dict())
    # Each cheaper model: CE + w L_casc against the already-trained next model's correctness.
    for m in (1, 0):
        with torch.no_grad():
            next_correct = trained.classifiers[m + 1].eval()(x).argmax(-1) == y

        def ltc(logits, idx, next_correct=next_correct):
            return ltc_loss(logits, y[idx], next_correct[idx], 0.5, 2.0)

        reference = fit_reference(copy.deepcopy(initial.classifiers[m]), split, SEED + m, ltc)
        torch.testing.assert_close(trained.classifiers[m].state_dict(), reference.state_dict())
        ce_only = fit_reference(copy.deepcopy(initial.classifiers[m]), split, SEED + m, plain_ce)
        differences = [
            (a - b).abs().max()
            for a, b in zip(trained.classifiers[m].parameters(), ce_only.parameters(), strict=True)
        ]
        assert max(differences) > 1e-4  # the L_casc term changed the cheaper models
    # every classifier is left in eval mode (batch norm on its running statistics)
    assert not any(m.training for c in trained.classifiers for m in c.modules())
    # the run ends with LtC's own thresholds, fitted on validation (here the same split)
    assert metrics["thresholds"] == ltc_rule(harness.outputs("val"), 0.0).thresholds


def test_multi_exit_net_exits_and_incremental_macs():
    torch.manual_seed(0)
    net = MultiExitNet(num_classes=10).eval()
    x = torch.randn(5, 1, 8, 8)
    exits = net.exits()
    assert len(exits) == 3
    for clf in exits:
        assert clf(x).shape == (5, 10)
    torch.testing.assert_close(net(x), torch.stack([clf(x) for clf in exits], dim=1))

    sample = torch.zeros(1, 1, 8, 8)
    incremental = net.incremental_macs()
    assert sum(incremental) == count_macs(net, sample)  # every exit run once = the full net
    assert incremental[0] == count_macs(exits[0], sample)
    separate = [count_macs(clf, sample) for clf in exits]  # each exit re-running the trunk
    assert separate == sorted(separate) and len(set(separate)) == 3
    cascade = net.as_cascade()
    costs = cascade.costs()
    assert costs.classifier_macs == incremental
    for t in (1, 2):  # reusing earlier blocks is cheaper than running separate models
        assert costs.cumulative_macs[t] < sum(separate[: t + 1])
    # an exit used alone runs its trunk: the last one alone is the reference (share 1)
    assert costs.alone_macs == separate and costs.reference_macs == separate[-1]
    assert costs.cumulative_macs[-1] / costs.reference_macs > 1  # every head ran on the way
    assert cascade.outputs(x, torch.zeros(5, dtype=torch.int64), costs).probs.shape == (5, 3, 10)


def test_multi_exit_training_updates_every_exit_and_feeds_the_threshold_fit(tmp_path):
    split = tiny_split(32, (1, 8, 8), classes=10)
    harness = ltc_harness(tmp_path, split, 10, form="multi-exit")
    ltc = harness.algorithm
    net = ltc.net
    assert isinstance(net, MultiExitNet) and ltc.num_epochs == EPOCHS  # one part: the whole net
    before = copy.deepcopy(net.state_dict())
    metrics = harness.run()
    assert not net.training
    for name, value in net.named_parameters():
        assert not torch.equal(value, before[name]), name
    # stages cost their increments: the run's cost table is the net's
    assert harness.costs.classifier_macs == net.incremental_macs()
    outputs = harness.outputs("val")
    rule = ltc.rule()
    assert metrics["thresholds"] == rule.thresholds
    fitted = evaluate_rule(rule, outputs)
    assert fitted["accuracy"] >= fitted["stage_accuracy"][-1] - 1e-12
