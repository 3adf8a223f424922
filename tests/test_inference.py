"""Early-exit inference equals the stopping MDP, runs later stages only on unstopped samples,
and survives export to a bundle loaded without the training code."""

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from policycascade.agents import LearnedRule, StoppingPolicy
from policycascade.agents.rules import exit_stages, stop_decisions
from policycascade.agents.stopping_policy import ensemble_predictions
from policycascade.agents.thresholds import ThresholdRule
from policycascade.envs import STOP, CascadeStoppingEnv
from policycascade.evaluation import evaluate_rule, first_stop
from policycascade.inference import early_exit_predict, export_bundle, load_bundle
from policycascade.models import build_cascade

N = 96  # even, so that median thresholds fall between two samples' confidences


def digits_setup():
    torch.manual_seed(0)
    cascade = build_cascade("digits", (1, 8, 8), 10)
    x = torch.randn(N, 1, 8, 8)
    y = torch.randint(10, (N,))
    return cascade, x, y


def make_rule(kind: str, cascade, x, y, ensemble: bool = False):
    """A deterministic rule whose stops are spread over the stages on these inputs."""
    probs = cascade.outputs(x, y, cascade.costs()).probs  # (sample, stage, class)
    if kind == "threshold":
        medians = [float(probs[:, t].max(-1).values.median()) for t in range(3)]
        return ThresholdRule("max-softmax", medians)
    policy = StoppingPolicy(cascade.num_stages, cascade.num_classes, hidden=16)
    with torch.no_grad():  # centre each random module so that about half the samples stop
        logits = policy(probs)
        for t in range(cascade.num_stages - 1):
            middle = logits[:, t].sort().values[N // 2 - 1 : N // 2 + 1].mean()
            policy.layer3_bias[t] -= middle
    return LearnedRule(policy, ensemble).eval()


@pytest.fixture(params=["policy", "threshold"])
def setup(request):
    cascade, x, y = digits_setup()
    rule = make_rule(request.param, cascade, x, y)
    costs = cascade.costs(rule.policy_macs())
    return cascade, rule, costs, x, y


def test_early_exit_matches_env_stepped_sample_by_sample(setup):
    cascade, rule, costs, x, y = setup
    result = early_exit_predict(cascade, rule, x, costs)
    env = CascadeStoppingEnv(cascade.outputs(x, y, costs))
    c = cascade.num_classes
    for i in range(N):
        obs, info = env.reset(options={"sample_index": i})
        seen = []  # the softmaxes of the visited stages, as the env showed them
        terminated = False
        while not terminated:
            seen.append(torch.from_numpy(obs[:c]))
            history = torch.stack(seen).unsqueeze(0)  # (1, t + 1, C)
            last = info["stage"] == cascade.num_stages - 1
            stop = last or bool(rule.stop_scores(history)[0, info["stage"]] >= 0)
            obs, _, terminated, _, info = env.step(STOP if stop else 1 - STOP)
        assert int(result.exit_stage[i]) == info["exit_stage"], i
        assert int(result.predictions[i]) == info["prediction"], i
        assert int(result.macs[i]) == info["macs"], i
    assert len(result.exit_stage.unique()) >= 3  # the comparison covers several exits


def test_early_exit_matches_first_stop_on_cached_outputs(setup):
    cascade, rule, costs, x, y = setup
    outputs = cascade.outputs(x, y, costs)
    exit_stage = first_stop(stop_decisions(rule, outputs.probs))
    predictions = outputs.probs[torch.arange(N), exit_stage].argmax(-1)
    cumulative = torch.tensor(costs.cumulative_macs)
    result = early_exit_predict(cascade, rule, x)  # costs from rule.policy_macs()
    assert torch.equal(result.exit_stage, exit_stage)
    assert torch.equal(result.predictions, predictions)
    assert torch.equal(result.macs, cumulative[exit_stage])


class BatchSizeRecorder(nn.Module):
    def __init__(self, inner: nn.Module, log: list[int]):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x):
        self.log.append(len(x))
        return self.inner(x)


def test_later_stages_run_only_on_samples_that_have_not_stopped(setup):
    cascade, rule, costs, x, _ = setup
    logs = [[] for _ in range(cascade.num_stages)]
    cascade.classifiers = nn.ModuleList(
        BatchSizeRecorder(clf, log) for clf, log in zip(cascade.classifiers, logs, strict=True)
    )
    cascade.train()
    result = early_exit_predict(cascade, rule, x, costs)
    reached = [int((result.exit_stage >= t).sum()) for t in range(cascade.num_stages)]
    assert [log[-1] for log in logs] == reached
    assert all(len(log) == 1 for log in logs)  # one batched call per stage
    assert reached[0] == N and reached[-1] < reached[1] < N
    assert cascade.training  # the training flag is restored


def test_early_exit_skips_stages_nobody_reaches():
    cascade, x, _ = digits_setup()
    rule = ThresholdRule("max-softmax", [0.0, 0.0, 0.0])  # everyone stops at stage 0
    logs = [[] for _ in range(cascade.num_stages)]
    cascade.classifiers = nn.ModuleList(
        BatchSizeRecorder(clf, log) for clf, log in zip(cascade.classifiers, logs, strict=True)
    )
    costs = cascade.costs(rule.policy_macs())
    for log in logs:
        log.clear()  # measuring the MACs ran every classifier on one sample
    result = early_exit_predict(cascade, rule, x, costs)
    assert [len(log) for log in logs] == [1, 0, 0, 0]
    assert bool((result.exit_stage == 0).all())
    assert bool((result.macs == costs.cumulative_macs[0]).all())


LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import torch
    from policycascade.inference import load_bundle

    predictor = load_bundle("bundle.pt")
    torch.save(predictor.predict(torch.load("x.pt")).__dict__, "out.pt")
    training = {"policycascade.harness", "policycascade.agents.reinforce_training"}
    assert not training & set(sys.modules), "the training code was imported"
    print(predictor.meta["kind"], predictor.rule_name, predictor.stage_names[-1])
    """
)


def test_exported_policy_predicts_identically_in_a_fresh_process(tmp_path):
    cascade, x, y = digits_setup()
    policy = make_rule("policy", cascade, x, y)
    export_bundle(tmp_path / "bundle.pt", cascade, policy, {"kind": "policy"})
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.pt"]  # no temporary file left
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["policy", "LearnedRule", "cnn"]
    expected = early_exit_predict(cascade, policy, x)
    got = torch.load(tmp_path / "out.pt")
    for key in ("predictions", "exit_stage", "macs"):
        assert torch.equal(got[key], getattr(expected, key)), key


def test_exported_threshold_rule_predicts_identically_also_one_sample_at_a_time(tmp_path):
    cascade, x, y = digits_setup()
    rule = make_rule("threshold", cascade, x, y)
    export_bundle(tmp_path / "bundle.pt", cascade, rule)
    loaded = load_bundle(tmp_path / "bundle.pt")
    expected = early_exit_predict(cascade, rule, x)
    got = loaded.predict(x)
    for key in ("predictions", "exit_stage", "macs"):
        assert torch.equal(getattr(got, key), getattr(expected, key)), key
    # A batch of one is not specialised away by the export's dynamic batch dimension.
    one_by_one = torch.cat([loaded.predict(x[i : i + 1]).exit_stage for i in range(8)])
    assert torch.equal(one_by_one, expected.exit_stage[:8])


def test_ensemble_answers_are_used_live_and_the_bundle_answers_with_the_arg_max(tmp_path):
    cascade, x, y = digits_setup()
    rule = make_rule("policy", cascade, x, y, ensemble=True)
    outputs = cascade.outputs(x, y, cascade.costs(rule.policy_macs()))
    exit_stage = exit_stages(rule, outputs.probs)
    stop_probs = rule.policy.stop_probs(outputs.probs)
    ensemble = ensemble_predictions(outputs.probs, stop_probs, exit_stage)
    arg_max = outputs.probs[torch.arange(N), exit_stage].argmax(-1)
    assert not torch.equal(ensemble, arg_max)  # the two answers differ on these inputs
    live = early_exit_predict(cascade, rule, x)
    assert torch.equal(live.exit_stage, exit_stage)
    assert torch.equal(live.predictions, ensemble)
    accuracy = float((live.predictions == y).double().mean())
    assert accuracy == evaluate_rule(rule, outputs)["accuracy"]
    export_bundle(tmp_path / "bundle.pt", cascade, rule)
    exported = load_bundle(tmp_path / "bundle.pt").predict(x)
    assert torch.equal(exported.exit_stage, exit_stage)
    assert torch.equal(exported.predictions, arg_max)


def test_export_bundle_rejects_meta_that_is_not_plain_data(tmp_path):
    cascade, x, y = digits_setup()
    with pytest.raises(ValueError, match="meta"):
        export_bundle(tmp_path / "b.pt", cascade, make_rule("threshold", cascade, x, y), {"x": x})


def test_bench_quick_json_smoke(capsys):
    from policycascade.bench import main

    main(["--quick", "--json", "--tiny", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {
        "machine",
        "early_exit",
        "vector_env",
        "training_step",
        "train_job",
        "cuda",
    }
    assert {"cpu", "cores", "torch"} <= set(report["machine"])
    row = report["early_exit"]["digits"]["rows"][0]
    assert {"early_exit_s_per_sample", "reference_s_per_sample", "speedup", "macs_speedup"} <= set(
        row
    )
    assert report["early_exit"]["resnet"]["stage_names"] == [
        "resnet8",
        "resnet20",
        "resnet56",
        "resnet110",
    ]
    # no timed assertions: the derived numbers must agree with what was measured
    for row in report["early_exit"]["digits"]["rows"] + report["early_exit"]["resnet"]["rows"]:
        assert sum(row["exit_share"]) == pytest.approx(1.0)
        assert row["speedup"] == pytest.approx(
            row["reference_s_per_sample"] / row["early_exit_s_per_sample"]
        )
    digits = report["early_exit"]["digits"]
    cumulative = list(itertools.accumulate(digits["classifier_macs"]))  # thresholds cost 0
    for row in digits["rows"]:
        mean_macs = sum(s * m for s, m in zip(row["exit_share"], cumulative, strict=True))
        assert row["macs_speedup"] == pytest.approx(max(digits["classifier_macs"]) / mean_macs)
    vector = report["vector_env"]
    assert vector["num_envs"] == report["plan"]["num_envs"]
    assert vector["ratio"] == pytest.approx(
        vector["vector_env_steps_per_s"] / vector["sync_vector_env_steps_per_s"]
    )
    step = report["training_step"]["digits"]
    assert (step["cascade"], step["batch_size"], step["device"]) == ("digits", 64, "cpu")
    assert step["ratio"] == pytest.approx(step["reinforce_step_s"] / step["cross_entropy_step_s"])
    assert step["reinforce_samples_per_s"] == pytest.approx(64 / step["reinforce_step_s"])
    assert "skipped" in report["train_job"]


def test_bench_early_exit_agrees_with_the_cached_evaluation():
    """The benchmark's exits and MACs are those of its rule on cached outputs of its inputs."""
    from policycascade.bench import bench_early_exit, digits_cascade

    cascade = digits_cascade()
    torch.manual_seed(1)
    x = torch.randn(64, *cascade.input_shape)  # the benchmark's inputs: its first draw
    torch.manual_seed(1)
    report = bench_early_exit(cascade, 64, {16: 48, 48: 48}, reps=1)
    rule = ThresholdRule("max-softmax", report["thresholds"])
    labels = torch.zeros(48, dtype=torch.int64)
    outputs = cascade.outputs(x[:48], labels, cascade.costs(rule.policy_macs()))
    cached = evaluate_rule(rule, outputs)
    assert sum(share > 0 for share in cached["exit_distribution"]) >= 3  # exits spread out
    assert [row["batch_size"] for row in report["rows"]] == [16, 48]
    for row in report["rows"]:
        assert row["samples"] == 48
        assert row["exit_share"] == pytest.approx(cached["exit_distribution"])
        speedup = outputs.costs.reference_macs / cached["mean_macs"]
        assert row["macs_speedup"] == pytest.approx(speedup)


def test_bench_epoch_times_the_trainer_and_a_dataloader_on_fake_cifar(capsys):
    from policycascade.bench_epoch import main

    argv = ["--fake", "--train-images", "10", "--batch-size", "8", "--workers", "0"]
    argv += ["--device", "cpu", "--variants", "device-fp32", "dataloader-fp32", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_images"] == 9  # 10% carved out for validation
    device, loader = report["variants"]["device-fp32"], report["variants"]["dataloader-fp32"]
    assert device["pretrain_images_per_s"] == pytest.approx(9 / device["pretrain_epoch_s"])
    expected = 164 * (device["pretrain_epoch_s"] + device["validation_s"]) + 40 * (
        device["joint_epoch_s"] + device["validation_s"]
    )
    assert device["estimated_run_s"] == pytest.approx(expected)
    assert loader["workers"] == 0 and loader["pretrain_epoch_s"] > 0


def test_bench_epoch_fake_needs_cifar10(capsys, tmp_path):
    from policycascade.bench_epoch import main

    config = tmp_path / "c.yaml"
    config.write_text("dataset: digits\n")
    assert main(["--config", str(config), "--fake", "--device", "cpu"]) == 2
    assert "cifar10" in capsys.readouterr().err
