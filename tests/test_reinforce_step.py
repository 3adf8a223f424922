"""The cheaper REINFORCE step against the formulation it replaced: same losses and gradients.

``reference_forward`` is the agent's forward as it was (its own log-softmax, two
log-sigmoids, gathers), and ``reference_joint_loss`` the joint loss as it was (the
cross-entropy and the agent each normalising the logits). The joined optimiser must
step each parameter exactly as its own optimiser would and keep their checkpoints.
"""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import repeat

from conftest import digits_harness
from policycascade.agents import ReinforceAgent, expected_return
from policycascade.agents.reinforce import sample_categorical
from policycascade.agents.reinforce_training import JoinedOptimizer
from policycascade.rewards import episode_return, prediction_loss
from policycascade.supervised import cross_entropy_all_stages

B, K, C = 6, 4, 5
COSTS = torch.tensor([0.1, 0.3, 0.7, 1.7])
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def reference_forward(agent, logits, labels, cumulative_costs, generator):
    """The agent's forward before the shared log-softmax (verbatim, less the comments)."""
    m = agent.rollouts
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    if not agent.train_classifiers:
        log_probs, probs = log_probs.detach(), probs.detach()
    stop_logits = agent.policy(probs)
    log_probs_m, labels_m = log_probs, labels
    if m > 1:
        stop_logits = repeat(stop_logits, "b k -> (m b) k", m=m)
        log_probs_m = repeat(log_probs, "b k c -> (m b) k c", m=m)
        labels_m = repeat(labels, "b -> (m b)", m=m)
    stop = torch.sigmoid(stop_logits.detach())
    uniform = torch.rand(stop.shape, generator=generator, device=stop.device)
    stops = torch.cat([uniform < stop, torch.ones_like(stop[:, :1], dtype=torch.bool)], dim=1)
    exit_stage = stops.to(torch.uint8).argmax(dim=1)
    stages = torch.arange(stop_logits.shape[1]).unsqueeze(0)
    continued, stopped = stages < exit_stage.unsqueeze(1), stages == exit_stage.unsqueeze(1)
    exit_index = exit_stage.view(-1, 1, 1).expand(-1, 1, log_probs_m.shape[2])
    exit_log_probs = log_probs_m.gather(1, exit_index).squeeze(1)
    log_continue, log_stop = F.logsigmoid(-stop_logits), F.logsigmoid(stop_logits)
    log_prob = (log_continue * continued + log_stop * stopped).sum(1)
    score_sq = (-stop * continued + (1.0 - stop) * stopped).square().sum(1)
    if agent.sample_prediction:
        exit_probs = exit_log_probs.detach().exp()
        predictions = sample_categorical(exit_probs, generator)
        chosen_index = predictions.unsqueeze(1)
        log_prob = log_prob + exit_log_probs.gather(1, chosen_index).squeeze(1)
        chosen = exit_probs.gather(1, chosen_index).squeeze(1)
        score_sq = score_sq + 1.0 - 2.0 * chosen + exit_probs.square().sum(1)
        loss = prediction_loss(exit_probs, predictions, labels_m, agent.loss_name)
    else:
        predictions = exit_log_probs.argmax(-1)
        loss = prediction_loss(exit_log_probs.exp(), predictions, labels_m, agent.loss_name)
    returns = episode_return(agent.alpha, cumulative_costs[exit_stage], loss)
    returns_mb = returns.view(m, -1)
    baseline, baseline_loss = agent.baseline(returns_mb, score_sq.view(m, -1), probs[:, 0])
    advantages = (returns_mb.detach() - baseline).reshape(-1)
    if agent.policy_gradient == "exact":
        full_stop = torch.cat([torch.sigmoid(stop_logits), torch.ones_like(stop_logits[:, :1])], 1)
        surrogate = -expected_return(
            log_probs_m,
            full_stop,
            labels_m,
            cumulative_costs,
            agent.alpha,
            agent.loss_name,
            agent.sample_prediction,
        ).mean()
    else:
        surrogate = -(advantages.to(log_prob.dtype) * log_prob + returns).mean()
    return surrogate, baseline_loss, returns_mb.detach(), advantages.view(m, -1), exit_stage


def _loss_and_gradients(agent, forward, logits, labels, seed):
    logits = logits.detach().clone().requires_grad_()
    agent.zero_grad(set_to_none=True)
    outputs = forward(logits, labels, COSTS, torch.Generator().manual_seed(seed))
    (outputs[0] + outputs[1]).backward()
    grads = [torch.zeros(()) if p.grad is None else p.grad.clone() for p in agent.parameters()]
    return outputs, logits.grad, grads


CASES = [
    {},
    {"rollouts": 3},
    {"rollouts": 3, "baseline": "leave-one-out"},
    {"baseline": "value"},
    {"baseline": "moving-average"},
    {"baseline": "none", "loss": "cross-entropy"},
    {"train_classifiers": False},
    {"policy_gradient": "exact"},
    {"policy_gradient": "exact", "loss": "cross-entropy", "rollouts": 2},
]


def _case_id(options: dict) -> str:
    return ",".join(map(str, options.values())) or "default"


@pytest.mark.parametrize("options", CASES, ids=_case_id)
@pytest.mark.parametrize("normalised", [False, True])
def test_forward_matches_the_formulation_it_replaced(options, normalised):
    torch.manual_seed(0)
    agent = ReinforceAgent(K, C, 0.2, policy_hidden=8, **options)
    logits = torch.randn(B, K, C) * 3
    labels = torch.randint(C, (B,))

    def new_forward(logits, *args):
        if normalised:  # the log-softmax the joint step shares with the cross-entropy
            step = agent(logits.log_softmax(-1), *args, normalised=True)
        else:
            step = agent(logits, *args)
        return step.loss, step.baseline_loss, step.returns, step.advantages, step.exit_stage

    for seed in range(5):  # several draws of exits and labels
        if options.get("baseline") == "moving-average":
            agent.baseline.value.zero_(), agent.baseline.initialised.fill_(False)
        new, new_logit_grad, new_grads = _loss_and_gradients(
            agent, new_forward, logits, labels, seed
        )
        if options.get("baseline") == "moving-average":
            agent.baseline.value.zero_(), agent.baseline.initialised.fill_(False)
        old, old_logit_grad, old_grads = _loss_and_gradients(
            agent, lambda *a: reference_forward(agent, *a), logits, labels, seed
        )
        if options.get("policy_gradient") == "exact":
            # nothing is sampled: the reference's loss; the logged returns are each sample's
            # expected return, the advantages 0 and the exits the greedy policy's
            torch.testing.assert_close(new[0], old[0], **TOLERANCE)
            assert float(new[1]) == 0.0 and not new[1].requires_grad
            with torch.no_grad():
                probs = logits.softmax(-1)
                stop = torch.cat([agent.policy(probs).sigmoid(), torch.ones(B, 1)], 1)
                sampled = agent.sample_prediction
                loss = agent.loss_name
                expected = expected_return(
                    logits.log_softmax(-1), stop, labels, COSTS, agent.alpha, loss, sampled
                )
            torch.testing.assert_close(new[2], expected.unsqueeze(0), **TOLERANCE)
            assert torch.equal(new[3], torch.zeros(1, B))
            assert torch.equal(new[4], (stop >= 0.5).to(torch.uint8).argmax(1))
        else:
            assert torch.equal(new[4], old[4])  # the same exits were drawn
            for got, expected in zip(new[:4], old[:4], strict=True):
                torch.testing.assert_close(got, expected, **TOLERANCE)
        if old_logit_grad is None:  # frozen classifiers: no gradient reaches the logits
            assert new_logit_grad is None
        else:
            torch.testing.assert_close(new_logit_grad, old_logit_grad, **TOLERANCE)
        for got, expected in zip(new_grads, old_grads, strict=True):
            torch.testing.assert_close(got, expected, **TOLERANCE)


def reference_joint_loss(algorithm, images, labels):
    """The joint loss before the shared log-softmax: cross-entropy and agent each normalise."""
    h = algorithm.harness
    logits = h.classify(algorithm.train_cascade, h.inputs(images, True))
    supervised = cross_entropy_all_stages(logits, labels)
    step = reference_forward(
        algorithm.agent, logits, labels, algorithm.cumulative_costs, h.sample_generator
    )
    return algorithm.settings.supervised_weight * supervised + step[0] + step[1]


def _gradients(algorithm):
    modules = [algorithm.cascade, algorithm.agent]
    return [p.grad.clone() for m in modules for p in m.parameters() if p.grad is not None]


def test_joint_loss_and_gradients_match_the_formulation_it_replaced(tmp_path):
    harness = digits_harness(tmp_path, 64)
    algorithm = harness.algorithm
    x, y = harness.split_on_device("train")
    idx = torch.arange(32)
    state = harness.sample_generator.get_state()
    algorithm.cascade.zero_grad(set_to_none=True), algorithm.agent.zero_grad(set_to_none=True)
    expected = reference_joint_loss(algorithm, x[idx], y[idx])
    expected.backward()
    expected_grads = _gradients(algorithm)
    harness.sample_generator.set_state(state)
    algorithm.cascade.zero_grad(set_to_none=True), algorithm.agent.zero_grad(set_to_none=True)
    _, _, loss = algorithm._classifier_loss(x[idx], y[idx], held_out=False, step_index=0)
    loss.backward()
    torch.testing.assert_close(loss, expected, **TOLERANCE)
    got = _gradients(algorithm)
    assert len(got) == len(expected_grads) == len(list(algorithm.cascade.parameters())) + 6
    for a, b in zip(got, expected_grads, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)


def test_cross_entropy_from_the_shared_log_softmax_is_cross_entropy_all_stages(tmp_path):
    algorithm = digits_harness(tmp_path, 64).algorithm
    logits = torch.randn(7, 4, 10) * 4
    labels = torch.randint(10, (7,))
    log_probs = logits.log_softmax(-1)
    got = algorithm._cross_entropy(logits, log_probs, labels)
    assert torch.equal(got, cross_entropy_all_stages(logits, labels))
    algorithm._trained_classes = [None, frozenset({1, 2}), None, None]  # a specialist stage
    got = algorithm._cross_entropy(logits, log_probs, labels)
    assert torch.equal(got, cross_entropy_all_stages(logits, labels, algorithm._trained_classes))


def _adam_pair(seed):
    torch.manual_seed(seed)
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    return a, b, torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.01)


def _assert_same_parameters(modules, others):
    for m1, m2 in zip(modules, others, strict=True):
        for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
            assert torch.equal(p, q)


def _step(a, b, step):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    for p in [*a.parameters(), *b.parameters()]:
        p.grad = None
    b(a(x)).square().sum().backward()
    step()


def test_joined_optimizer_steps_each_group_as_its_own_optimizer_and_keeps_its_state_dict():
    a1, b1, oa1, ob1 = _adam_pair(0)
    a2, b2, oa2, ob2 = _adam_pair(0)
    joined = JoinedOptimizer.of([oa2, ob2])
    for _ in range(3):
        _step(a1, b1, lambda: (oa1.step(), ob1.step()))
        _step(a2, b2, joined.optimizer.step)
    _assert_same_parameters([a1, b1], [a2, b2])
    for own, part in [(oa1, oa2), (ob1, ob2)]:
        mine, theirs = own.state_dict(), part.state_dict()
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys()
        for n, state in mine["state"].items():
            for key, value in state.items():
                assert torch.equal(value, theirs["state"][n][key])


def test_joined_optimizer_is_rebuilt_after_a_checkpoint_is_loaded_into_its_parts():
    a1, b1, oa1, ob1 = _adam_pair(0)
    a2, b2, oa2, ob2 = _adam_pair(0)
    _step(a1, b1, lambda: (oa1.step(), ob1.step()))
    joined = JoinedOptimizer.of([oa2, ob2])
    _step(a2, b2, joined.optimizer.step)
    saved = oa2.state_dict(), ob2.state_dict()  # the checkpoint layout: one state per optimiser
    oa2.load_state_dict(saved[0]), ob2.load_state_dict(saved[1])
    assert not joined.joins([oa2, ob2])
    joined = JoinedOptimizer.of([oa2, ob2])
    assert joined.joins([oa2, ob2])
    _step(a1, b1, lambda: (oa1.step(), ob1.step()))
    _step(a2, b2, joined.optimizer.step)
    _assert_same_parameters([a1, b1], [a2, b2])
    assert JoinedOptimizer.of([oa2, torch.optim.SGD(b2.parameters(), lr=0.1)]) is None


def test_a_checkpoint_resumes_the_joint_steps_exactly_and_schedules_do_not_warn(tmp_path):
    first = digits_harness(tmp_path / "a", 64)
    idx = torch.arange(32)
    for step in range(2):
        first.algorithm.joint_step(idx, idx, step)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    # the layout checkpoints had before: one state per optimiser and per schedule
    assert {"classifier_optimizer", "policy_optimizer"} <= state["state"].keys()
    second = digits_harness(tmp_path / "b", 64)
    second.load(state)
    for harness in (first, second):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            harness.algorithm.joint_step(idx, idx, 2)
            harness.algorithm.policy_schedule.step()
    _assert_same_parameters(
        [first.cascade, first.algorithm.agent], [second.cascade, second.algorithm.agent]
    )


def test_policy_and_classifier_optimizers_of_different_kinds_step_one_after_the_other(tmp_path):
    harness = digits_harness(tmp_path, 64, policy_optimizer="sgd")
    algorithm = harness.algorithm
    policy = [p.detach().clone() for p in algorithm.agent.parameters()]
    algorithm.joint_step(torch.arange(32), torch.arange(32), 0)
    assert algorithm._joined is None
    assert all(
        not torch.equal(p, q) for p, q in zip(algorithm.agent.parameters(), policy, strict=True)
    )


@pytest.mark.parametrize(
    "loss,sampled", [("zero-one", True), ("zero-one", False), ("cross-entropy", False)]
)
def test_the_steps_expected_return_equals_the_plain_form_with_its_gradients(loss, sampled):
    """The exact step's log-space form: the value and gradients of expected_return."""
    from policycascade.agents.reinforce import _expected_return_from_logits

    g = torch.Generator().manual_seed(3)
    stop_logits = torch.randn(B, K - 1, generator=g, dtype=torch.float64) * 4
    stop_logits[0] = torch.tensor([30.0, -30.0, 0.0], dtype=torch.float64)  # near-certain
    log_probs = (torch.randn(B, K, C, generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    labels = torch.randint(C, (B,), generator=g)
    costs = COSTS.double()
    results = []
    for plain in (True, False):
        z = stop_logits.clone().requires_grad_()
        lp = log_probs.clone().requires_grad_()
        if plain:
            stop = torch.cat([z.sigmoid(), torch.ones(B, 1, dtype=torch.float64)], 1)
            value = expected_return(lp, stop, labels, costs, 0.2, loss, sampled)
        else:
            value = _expected_return_from_logits(z, lp, labels, costs, 0.2, loss, sampled)
        weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
        z_grad, lp_grad = torch.autograd.grad((value * weights).sum(), [z, lp], allow_unused=True)
        results.append((value, z_grad, torch.zeros(()) if lp_grad is None else lp_grad))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_batch_of_one_sample_logs_without_warnings():
    """A last batch of one sample: spread 0, gradient variance NaN, and no torch warning."""
    import math

    from policycascade.agents.reinforce import policy_gradient_variance
    from policycascade.agents.reinforce_training import step_scalars

    torch.manual_seed(0)
    agent = ReinforceAgent(K, C, 0.2, policy_hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = agent(torch.randn(1, K, C), torch.tensor([2]), COSTS, torch.Generator())
        scalars = step_scalars(step, torch.zeros(()))
        variance = policy_gradient_variance(
            agent.policy, step.probs, step.exit_stage, step.advantages.reshape(-1)
        )
    assert float(scalars[-1]) == 0.0 and math.isnan(variance)
