"""The optional compiled path: eager losses, and eager with one notice where it cannot compile."""

import importlib.util
import shutil

import pytest
import torch

from policycascade.agents import ReinforceAgent
from policycascade.compiled import maybe_compile, resolve_enabled


def tiny_agent_batch():
    torch.manual_seed(0)
    agent = ReinforceAgent(3, 4, 0.3, policy_hidden=8)
    logits = torch.randn(16, 3, 4, requires_grad=True)
    labels = torch.randint(4, (16,))
    return agent, (logits, labels, torch.tensor([0.1, 0.4, 1.4]))


def test_auto_compiles_on_cuda_only_and_off_means_the_function_itself():
    assert resolve_enabled("auto", "cuda:0") and not resolve_enabled("auto", "cpu")
    assert resolve_enabled("on") and not resolve_enabled("off", "cuda")
    agent, _ = tiny_agent_batch()
    assert maybe_compile(agent, "off", "the agent") is agent
    assert maybe_compile(agent, "auto", "the agent", device="cpu") is agent
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_enabled("yes")


def test_compile_failing_at_wrapping_falls_back_to_eager_with_one_line(monkeypatch, capsys):
    def no_compile(*args, **kwargs):
        raise RuntimeError("dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_compile)
    agent, batch = tiny_agent_batch()
    step = maybe_compile(agent, "on", "the REINFORCE agent")
    assert step is agent
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "torch.compile of the REINFORCE agent unavailable (RuntimeError: dynamo is not" in err


def test_compile_failing_at_the_first_call_falls_back_to_eager_for_good(monkeypatch, capsys):
    from torch._inductor.exc import InvalidCxxCompiler

    calls = []

    def compiled(*args, **kwargs):
        calls.append(1)
        raise InvalidCxxCompiler()

    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled)
    agent, batch = tiny_agent_batch()
    step = maybe_compile(agent, "on", "the REINFORCE agent")
    expected = agent(*batch, torch.Generator().manual_seed(1)).loss
    for _ in range(2):
        assert torch.equal(step(*batch, torch.Generator().manual_seed(1)).loss, expected)
    assert len(calls) == 1  # not retried
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "InvalidCxxCompiler" in err


def test_errors_of_the_function_itself_are_not_swallowed(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    agent, (logits, labels, costs) = tiny_agent_batch()
    step = maybe_compile(agent, "on", "the REINFORCE agent")
    with pytest.raises(RuntimeError):
        step(logits, labels[:3], costs)  # wrong batch: the agent's own error


@pytest.mark.skipif(
    importlib.util.find_spec("torch._inductor") is None
    or not (shutil.which("g++") or shutil.which("clang++")),
    reason="torch.compile's inductor backend needs torch._inductor and a C++ compiler on the CPU",
)
def test_compiled_agent_gives_the_eager_loss_and_gradients():
    # About 25 s on a 2-core machine, nearly all of it compiling.
    agent, (logits, labels, costs) = tiny_agent_batch()
    eager = agent(logits, labels, costs, torch.Generator().manual_seed(1))
    (eager_grad,) = torch.autograd.grad(eager.loss + eager.baseline_loss, logits)
    step = maybe_compile(agent, "on", "the REINFORCE agent")
    compiled = step(logits, labels, costs, torch.Generator().manual_seed(1))
    (compiled_grad,) = torch.autograd.grad(compiled.loss + compiled.baseline_loss, logits)
    assert not getattr(step, "failed", False), "compiling failed; see the notice on stderr"
    assert torch.equal(compiled.exit_stage, eager.exit_stage)  # the same random draws
    torch.testing.assert_close(compiled.loss, eager.loss)
    torch.testing.assert_close(compiled.returns, eager.returns)
    torch.testing.assert_close(compiled_grad, eager_grad)
