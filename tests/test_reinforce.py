"""The REINFORCE estimator against the exact gradient, enumerated over the K exit points."""

import pytest
import torch

from conftest import digits_harness, hand_outputs
from policycascade.agents import ReinforceAgent, exit_probabilities, expected_return
from policycascade.agents.reinforce import decision_log_prob, sample_categorical, sample_exits
from policycascade.harness import NonFiniteError

B, K, C, ALPHA = 5, 3, 4, 0.3
CUMULATIVE = torch.tensor([0.1, 0.4, 1.4])


def test_exit_probabilities_by_hand():
    stop = torch.tensor([[0.5, 0.5, 1.0], [0.0, 0.2, 1.0], [1.0, 0.3, 1.0]])
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.2, 0.8], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(exit_probabilities(stop), expected)
    torch.testing.assert_close(exit_probabilities(stop[:, :2]), expected)


def test_expected_return_by_hand():
    out = hand_outputs()
    stop = torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.0, 1.0]])
    cumulative = torch.tensor(out.costs.cumulative_macs, dtype=torch.float32) / 100
    got = expected_return(
        out.probs.log(), stop, out.labels, cumulative, alpha=0.5, sample_prediction=False
    )
    # sample 0 exits at 0/1/2 w.p. 0.5/0.25/0.25 with returns -1.05/-0.2/-1.7;
    # sample 1 stops at stage 0 and is right
    torch.testing.assert_close(got, torch.tensor([-1.0, -0.05]))
    sampled = expected_return(
        out.probs.log(), stop, out.labels, cumulative, alpha=0.5, sample_prediction=True
    )
    # with a sampled label the 0/1 loss is 1 - p(y) in expectation
    expected0 = 0.5 * (-0.7 - 0.05) + 0.25 * (-0.3 - 0.2) + 0.25 * (-0.9 - 0.7)
    assert float(sampled[0]) == pytest.approx(expected0)


def test_sampled_exits_follow_exit_probabilities():
    logits = torch.tensor([[0.3, -0.5]]).repeat(200_000, 1)
    exits = sample_exits(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(exits, minlength=3).double() / len(exits)
    exact = exit_probabilities(torch.sigmoid(logits[:1])).double()[0]
    torch.testing.assert_close(freq, exact, atol=4e-3, rtol=0)
    lp = decision_log_prob(logits[:3], torch.tensor([0, 1, 2]))
    s = torch.sigmoid(torch.tensor([0.3, -0.5]))
    torch.testing.assert_close(
        lp, torch.stack([s[0].log(), (1 - s[0]).log() + s[1].log(), (1 - s).log().sum()])
    )


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, C, generator=g) * 2
    labels = torch.randint(C, (B,), generator=g)
    return logits, labels


def _exact_gradient(agent, logits, labels):
    lg = logits.clone().requires_grad_(True)
    log_probs = lg.log_softmax(-1)
    if not agent.train_classifiers:
        log_probs = log_probs.detach()
    stop = torch.sigmoid(agent.policy(log_probs.exp()))
    j = expected_return(
        log_probs, stop, labels, CUMULATIVE, ALPHA, agent.loss_name, agent.sample_prediction
    ).mean()
    params = list(agent.policy.parameters())
    grads = torch.autograd.grad(j, params + [lg], allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def _estimates(agent, logits, labels, chunks=150, copies=40, seed=1):
    """Gradient estimates of -loss, one per chunk of ``copies`` repetitions of the batch."""
    gen = torch.Generator().manual_seed(seed)
    params = list(agent.policy.parameters())
    out = []
    for _ in range(chunks):
        lg = logits.repeat(copies, 1, 1).requires_grad_(True)
        step = agent(lg, labels.repeat(copies), CUMULATIVE, gen)
        grads = torch.autograd.grad(
            -step.loss, params + [lg], allow_unused=True, materialize_grads=True
        )
        g_logits = grads[-1].view(copies, B, K, C).sum(0)
        out.append(torch.cat([g.reshape(-1) for g in grads[:-1]] + [g_logits.reshape(-1)]))
    return torch.stack(out)


def _make_agent(baseline, rollouts=1, train=True, loss="zero-one"):
    torch.manual_seed(0)
    agent = ReinforceAgent(
        K,
        C,
        ALPHA,
        loss=loss,
        baseline=baseline,
        rollouts=rollouts,
        policy_hidden=8,
        train_classifiers=train,
    )
    return agent


def _warm_up(agent, logits, labels):
    """Moving average: one earlier batch; value baseline: fit it to the returns first."""
    if agent.baseline.__class__.__name__ == "MovingAverageBaseline":
        agent(logits.repeat(50, 1, 1), labels.repeat(50), CUMULATIVE)
    if agent.baseline.__class__.__name__ == "ValueBaseline":
        opt = torch.optim.Adam(agent.baseline.parameters(), lr=1e-2)
        for _ in range(300):
            step = agent(logits.repeat(20, 1, 1), labels.repeat(20), CUMULATIVE)
            opt.zero_grad()
            step.baseline_loss.backward()
            opt.step()


CASES = [
    ("none", 1, False, "zero-one"),
    ("moving-average", 1, False, "zero-one"),
    ("optimal-constant", 1, False, "zero-one"),
    ("value", 1, False, "zero-one"),
    ("leave-one-out", 4, False, "zero-one"),
    ("none", 1, True, "zero-one"),
    ("optimal-constant", 1, True, "zero-one"),
    ("leave-one-out", 3, True, "zero-one"),
    ("optimal-constant", 1, True, "cross-entropy"),
]


@pytest.mark.parametrize("baseline, rollouts, train, loss", CASES)
def test_estimator_is_unbiased(baseline, rollouts, train, loss):
    logits, labels = _setup()
    agent = _make_agent(baseline, rollouts, train, loss)
    _warm_up(agent, logits, labels)
    exact = _exact_gradient(agent, logits, labels)
    estimates = _estimates(agent, logits, labels)
    mean = estimates.mean(0)
    standard_error = (estimates.var(0) / len(estimates)).sum().sqrt()
    # ||noise|| is about sqrt(sum of squared standard errors); a bias of that size would fail.
    assert (mean - exact).norm() < 3 * standard_error + 1e-6
    assert exact.norm() > 10 * standard_error  # the check has power: the signal is visible


def test_check_detects_a_biased_baseline():
    """A baseline of half the rollout's own return halves every estimate: biased, and caught.

    The estimates must converge to exactly half the exact gradient, so an estimator that
    returned zeros (or anything else) fails here too.
    """
    logits, labels = _setup()
    agent = _make_agent("none", train=False)
    agent.baseline.forward = lambda returns, s, f: (0.5 * returns.detach(), returns.new_zeros(()))
    exact = _exact_gradient(agent, logits, labels)
    estimates = _estimates(agent, logits, labels, chunks=20)
    standard_error = (estimates.var(0) / len(estimates)).sum().sqrt()
    assert exact.norm() > 10 * standard_error  # the check has power
    assert (estimates.mean(0) - exact).norm() > 3 * standard_error + 1e-6  # the bias is seen
    assert (estimates.mean(0) - 0.5 * exact).norm() < 3 * standard_error + 1e-6  # and is 1/2


@pytest.mark.parametrize(
    "baseline, rollouts",
    [("moving-average", 1), ("optimal-constant", 1), ("value", 1), ("leave-one-out", 4)],
)
def test_baselines_reduce_variance(baseline, rollouts):
    logits, labels = _setup()
    plain = _make_agent("none", rollouts, train=False)
    reduced = _make_agent(baseline, rollouts, train=False)
    _warm_up(reduced, logits, labels)
    var_plain = _estimates(plain, logits, labels, chunks=60, copies=1).var(0).sum()
    var_reduced = _estimates(reduced, logits, labels, chunks=60, copies=1).var(0).sum()
    assert var_reduced < 0.7 * var_plain


def test_leave_one_out_needs_two_rollouts():
    with pytest.raises(ValueError, match="rollouts >= 2"):
        _make_agent("leave-one-out", rollouts=1)


@pytest.mark.parametrize(
    "train, loss, rollouts",
    [(False, "zero-one", 1), (True, "zero-one", 1), (True, "cross-entropy", 2)],
)
def test_exact_policy_gradient_is_the_enumerated_gradient(train, loss, rollouts):
    """``policy_gradient="exact"`` differentiates the K-exit expectation, with no sampling noise."""
    logits, labels = _setup()
    agent = _make_agent("optimal-constant", rollouts, train, loss)
    agent.policy_gradient = "exact"
    params = list(agent.policy.parameters())
    lg = logits.clone().requires_grad_(True)
    step = agent(lg, labels, CUMULATIVE, torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(
        -step.loss, params + [lg], allow_unused=True, materialize_grads=True
    )
    got = torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(got, _exact_gradient(agent, logits, labels))
    again = agent(lg, labels, CUMULATIVE, torch.Generator().manual_seed(4)).loss
    assert float(again.detach()) == float(step.loss.detach())  # other exits drawn, same loss


def test_unknown_policy_gradient_is_rejected():
    with pytest.raises(ValueError, match="policy_gradient must be one of"):
        ReinforceAgent(K, C, ALPHA, policy_gradient="pathwise")
    with pytest.raises(ValueError, match="policy_gradient must be one of"):
        ReinforceAgent(K, C, ALPHA, policy_gradient="backward-induction")  # removed


def test_sample_categorical_draws_what_multinomial_draws():
    probs = torch.softmax(torch.randn(200, 7, generator=torch.Generator().manual_seed(3)), -1)
    ours = sample_categorical(probs, torch.Generator().manual_seed(5))
    torch_own = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    assert torch.equal(ours, torch_own)


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_loss_names_epoch_step_and_stage_deferred_or_not(tmp_path, deferred):
    harness = digits_harness(tmp_path)
    algorithm = harness.algorithm
    harness.epoch = 1  # as if one epoch were checkpointed
    idx = torch.arange(32)
    algorithm.joint_step(idx, idx, 0)  # a good step first
    weights = [p.detach().clone() for p in algorithm.cascade.parameters()]
    with torch.no_grad():
        algorithm.cascade.classifiers[2][1].weight[0, 0] = float("nan")
    checks = harness.check_finite_deferred(enabled=deferred)
    with pytest.raises(NonFiniteError) as error, checks:
        for step in range(1, 4):  # deferred: read on leaving, after the steps that followed
            algorithm.joint_step(idx, idx, step)
    assert str(error.value).startswith(
        "joint training loss became nan in epoch 2, step 2: classifier stage 2 ('mlp-256') "
        "produced non-finite logits. The last good checkpoint (epoch 1)"
    )
    after = list(algorithm.cascade.parameters())
    untouched = [torch.equal(a, b) for a, b in zip(after, weights, strict=True)]
    assert untouched.count(False) == 1  # only the poisoned weight: no step was taken


def test_deferred_non_finite_gradient_is_skipped_on_the_device_and_named(tmp_path):
    harness = digits_harness(tmp_path)
    algorithm = harness.algorithm
    idx = torch.arange(32)
    algorithm.pretrain_step(idx, 0)
    weight = algorithm.cascade.classifiers[1][2].weight
    before = weight.detach().clone()
    steps_before = algorithm.classifier_optimizer.state[weight]["step"].clone()
    weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteError) as error, harness.check_finite_deferred(enabled=True):
        for step in range(1, 3):
            algorithm.pretrain_step(idx, step)
    assert str(error.value).startswith(
        "gradients of the classifier stage 1 ('mlp-4x4') became non-finite in epoch 1, step 2, "
        "with a finite loss; no optimiser step was taken."
    )
    assert torch.equal(weight.detach(), before)
    assert torch.equal(algorithm.classifier_optimizer.state[weight]["step"], steps_before)
