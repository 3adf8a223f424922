import torch

from policycascade.config import ReinforceConfig, TrainConfig
from policycascade.harness import RunHarness


def _harness(tmp_path, compile_setting):
    config = TrainConfig(
        device="cpu",
        agent="reinforce",
        compile=compile_setting,
        reinforce=ReinforceConfig(alpha=[0.01], pretrain_epochs=1, epochs=1),
    )
    return RunHarness(config, tmp_path, 0.01, show_progress=False)


def test_compile_off_and_auto_on_cpu_train_eagerly(tmp_path):
    for setting in ("off", "auto"):
        algorithm = _harness(tmp_path, setting).algorithm
        assert algorithm.agent_step is algorithm.agent
        assert algorithm.train_cascade is algorithm.cascade


def test_a_failing_compile_falls_back_to_eager_with_one_line(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    algorithm = _harness(tmp_path, "on").algorithm
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("eager" in line for line in err), err
    assert algorithm.agent_step is algorithm.agent
    idx = torch.arange(8)
    step, _ = algorithm.joint_step(idx, idx)
    assert torch.isfinite(step.loss)
