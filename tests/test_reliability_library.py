"""Issue 19, library side: what the user owns stays theirs, runs are counted once, splits are
never reused in silence, long units are checkpointed, and odd setups are named."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import policycascade
import policycascade.checkpointing as checkpointing
from policycascade.agents.thresholds import best_reward_rule
from policycascade.checkpoint import load_checkpoint
from policycascade.compare.report import (
    figure_path,
    figure_paths,
    make_figures,
    write_tensorboard,
)
from policycascade.compare.rows import Row, aggregate, config_key
from policycascade.config import TrainConfig
from policycascade.crossfit import logits_of
from policycascade.envs.registration import registered_cascade
from policycascade.harness import preserved_global_state
from policycascade.inference import early_exit_predict, export_bundle, load_bundle
from policycascade.shift import corrupt, shift_report
from policycascade.subsets import best_subset
from policycascade.train import main

N = 90  # samples per split


def _data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * N, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return {
        "fit": (x[:N], y[:N]),
        "val": (x[N : 2 * N], y[N : 2 * N]),
        "test": (x[2 * N :], y[2 * N :]),
    }


def _classifier(hidden: int) -> nn.Module:
    torch.manual_seed(hidden)
    return nn.Sequential(
        nn.Linear(8, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(hidden, 3),
    )


def _snapshot(modules: list[nn.Module]) -> list:
    return [
        (
            {k: v.clone() for k, v in m.state_dict().items()},
            [(n, p.requires_grad, p.device) for n, p in m.named_parameters()],
            [s.training for s in m.modules()],
        )
        for m in modules
    ]


def _assert_untouched(before: list, modules: list[nn.Module]) -> None:
    for (state, params, flags), (state2, params2, flags2) in zip(
        before, _snapshot(modules), strict=True
    ):
        assert state.keys() == state2.keys()
        assert all(torch.equal(state[k], state2[k]) for k in state)
        assert params == params2 and flags == flags2


def _user_cascade():
    """The user's classifiers in a mixed state: training, one layer frozen, one part in eval."""
    small, big = _classifier(4), _classifier(32)
    big[0].requires_grad_(False)  # the user froze a layer
    big[1].eval()  # ... and keeps its batch norm in eval mode inside a training parent
    return [small, big]


def test_the_users_classifiers_data_and_rng_stay_as_they_were(tmp_path):
    classifiers, splits = _user_cascade(), _data()
    before = _snapshot(classifiers)
    data = {k: (x.clone(), y.clone()) for k, (x, y) in splits.items()}
    env_id = policycascade.register_cascade("Untouched", classifiers, splits=splits, overwrite=True)
    run = policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path)
    _assert_untouched(before, classifiers)
    # the run's cascade is a frozen copy: loading it, setting eval, etc. reaches no user module
    assert all(a is not b for a, b in zip(run.cascade.classifiers, classifiers, strict=True))
    assert not any(p.requires_grad for p in run.cascade.parameters())

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    loaded = policycascade.load_run(run.run_dir)  # loading leaves the caller's generators alone
    assert loaded.cascade is not None and loaded.rule is not None
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])

    registered = registered_cascade(env_id)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    result = early_exit_predict(registered.cascade, run.rule, splits["test"][0])
    export_bundle(tmp_path / "bundle.pt", registered.cascade, run.rule)
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the user's generator
    assert torch.equal(
        load_bundle(tmp_path / "bundle.pt")(splits["test"][0]).exit_stage, result.exit_stage
    )

    env = gym.make(env_id, alpha=1e-2, split="val")
    env.reset(seed=0)
    env.step(0)
    val, test = registered.outputs("val"), registered.outputs("test")
    best_subset(val, test, "max-softmax")
    shift_report(run.rule, val, test, test)
    corrupt(splits["test"][0].view(N, 1, 2, 4), "contrast", 3)
    with pytest.raises(ValueError, match=r"x must be images \(N, C, H, W\) to corrupt"):
        corrupt(splits["test"][0], "noise", 1)  # a table is not an image
    _assert_untouched(before, classifiers)
    for name, (x, y) in splits.items():
        assert torch.equal(x, data[name][0]) and torch.equal(y, data[name][1])


def test_evaluation_helpers_give_every_submodule_its_own_training_flag_back():
    classifiers = _user_cascade()
    cascade = policycascade.Cascade(classifiers, (8,), 3)
    flags = [m.training for m in cascade.modules()]
    assert not all(flags) and any(flags)  # mixed on purpose
    logits_of(cascade, torch.randn(5, 8))
    assert [m.training for m in cascade.modules()] == flags


def test_preserved_global_state_gives_back_every_generator_and_flag():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    with preserved_global_state():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        torch.use_deterministic_algorithms(True)
        torch.rand(3)
    assert not torch.are_deterministic_algorithms_enabled()
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


# -- inputs users naturally have --------------------------------------------------------------


def test_early_exit_predict_takes_numpy_arrays_and_lists(tmp_path):
    splits = _data()
    env_id = policycascade.register_cascade(
        "NumpyIn", _user_cascade(), splits=splits, overwrite=True
    )
    run = policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path)
    x = splits["test"][0]
    expected = early_exit_predict(run.cascade, run.rule, x)
    for given in (x.numpy().astype(np.float64), x.tolist()):
        got = early_exit_predict(run.cascade, run.rule, given)
        assert torch.equal(got.predictions, expected.predictions)
        assert torch.equal(got.exit_stage, expected.exit_stage)
    with pytest.raises(TypeError, match="x must be a torch tensor, a NumPy array or a list"):
        early_exit_predict(run.cascade, run.rule, "images")


def test_a_cascade_of_token_classifiers_registers_trains_predicts_and_exports(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (3 * N, 5), generator=g)
    labels = (tokens[:, 0] % 3).long()
    splits = {
        "fit": (tokens[:N], labels[:N]),
        "val": (tokens[N : 2 * N], labels[N : 2 * N]),
        "test": (tokens[2 * N :], labels[2 * N :]),
    }
    torch.manual_seed(0)
    classifiers = [
        nn.Sequential(nn.Embedding(20, 2), nn.Flatten(), nn.Linear(10, 3)),
        nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(80, 3)),
    ]
    env_id = policycascade.register_cascade("Tokens", classifiers, splits=splits, overwrite=True)
    # MACs counted on a real token sample: the linear layers' 2*5*3 and 16*5*3
    assert registered_cascade(env_id).cascade.classifier_macs() == [30, 240]
    run = policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path)
    result = early_exit_predict(run.cascade, run.rule, splits["test"][0].tolist())
    assert len(result.predictions) == N
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    export_bundle(tmp_path / "tokens.pt", run.cascade, run.rule)  # traced on a real token sample
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the user's generator
    bundled = load_bundle(tmp_path / "tokens.pt")(splits["test"][0])
    assert torch.equal(bundled.exit_stage, result.exit_stage)


def test_registration_warns_when_dearest_first_or_returning_probabilities():
    splits = _data()
    small, big = _classifier(4), _classifier(64)
    with pytest.warns(UserWarning, match=r"cheapest first, but 'stage0' \(.* MACs\) comes before"):
        policycascade.register_cascade("Dearest", [big, small], splits=splits, overwrite=True)
    probs = [nn.Sequential(m, nn.Softmax(-1)) for m in (small, big)]
    with pytest.warns(UserWarning, match="seems to return probabilities, not logits"):
        policycascade.register_cascade("Probs", probs, splits=splits, overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logits, cheapest first: silent
        policycascade.register_cascade("Fine", [small, big], splits=splits, overwrite=True)
        log_probs = [nn.Sequential(m, nn.LogSoftmax(-1)) for m in (small, big)]
        policycascade.register_cascade("LogProbs", log_probs, splits=splits, overwrite=True)


# -- splits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("test",), "has no 'fit' or 'val' split"),
        (("fit", "val"), "has no 'test' split"),
        (("val",), "has no 'test' split"),
    ],
)
def test_a_run_never_fits_or_chooses_on_the_split_it_reports(tmp_path, names, message):
    splits = _data()
    env_id = policycascade.register_cascade(
        "Reuse", _user_cascade(), splits={n: splits[n] for n in names}, overwrite=True
    )
    with pytest.raises(ValueError, match=message):
        policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path)
    assert not any(tmp_path.iterdir()) or not any(tmp_path.glob("*/metrics.json"))


def test_the_same_samples_as_val_and_test_are_refused(tmp_path):
    splits = _data()
    same = {"val": splits["val"], "test": (splits["val"][0].clone(), splits["val"][1].clone())}
    env_id = policycascade.register_cascade(
        "SameTwice", _user_cascade(), splits=same, overwrite=True
    )
    with pytest.raises(ValueError, match=r"splits\['val'\] and splits\['test'\] .* hold the same"):
        policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path)


def test_metrics_say_which_split_each_role_read_and_whether_test_was_held_out(tmp_path):
    splits = _data()
    env_id = policycascade.register_cascade(
        "Held",
        _user_cascade(),
        splits={"val": splits["val"], "test": splits["test"]},
        overwrite=True,
    )
    run = policycascade.train_policy(env_id, alpha=1e-2, logdir=tmp_path / "a")
    assert run.metrics["splits"] == {"train": "val", "val": "val", "test": "test"}
    assert run.metrics["test_held_out"] is True
    x, y = splits["fit"]
    one = policycascade.register_cascade("OneSplit", _user_cascade(), x, y, overwrite=True)
    with pytest.warns(UserWarning, match="metrics are in-sample"):
        run = policycascade.train_policy(one, alpha=1e-2, logdir=tmp_path / "b")
    assert run.metrics["test_held_out"] is False


def test_shift_and_subsets_refuse_outputs_of_different_cascades():
    a = policycascade.register_cascade("TaskA", _user_cascade(), splits=_data(), overwrite=True)
    three = [_classifier(4), _classifier(8), _classifier(32)]
    b = policycascade.register_cascade("TaskB", three, splits=_data(1), overwrite=True)
    val, other = registered_cascade(a).outputs("val"), registered_cascade(b).outputs("test")
    with pytest.raises(ValueError, match="val and test must be outputs of one cascade"):
        best_subset(val, other)
    rule = best_reward_rule(val.probs, val.labels, val.costs, 0.01)
    with pytest.raises(ValueError, match="must be outputs of one cascade"):
        shift_report(rule, val, registered_cascade(a).outputs("test"), other)


# -- compare: runs, not rows -----------------------------------------------------------------


def _row(run: str, seed: int, accuracy: float, config: str = "c1", alpha=0.01, point="a") -> Row:
    return Row(
        "digits", run, seed, "continuation", "continuation", "own", point, alpha, accuracy,
        100.0 * (1 + seed), 0.1 * (1 + seed), [0.5, 0.5], [0.8, 0.9], [[0.8, 0.9], [0.7, 0.9]],
        num_samples=10, config=config,
    )  # fmt: skip


def test_aggregate_averages_distinct_seeds_of_one_configuration_only():
    rows = [_row("r0", 0, 0.90), _row("r1", 1, 0.94), _row("r2", 2, 0.95, config="c2")]
    by_config = {a.config: a for a in aggregate(rows)}
    assert by_config["c1"].runs == 2 and by_config["c1"].run_names == ["r0", "r1"]
    assert by_config["c1"].accuracy == pytest.approx(0.92)
    assert by_config["c1"].accuracy_std == pytest.approx(np.std([0.90, 0.94], ddof=1))
    assert by_config["c2"].runs == 1 and by_config["c2"].accuracy == 0.95
    alphas = aggregate([_row("r0", 0, 0.9), _row("r1", 0, 0.8, alpha=0.001)])
    assert sorted(a.runs for a in alphas) == [1, 1]


def test_aggregate_refuses_a_run_given_twice_and_a_seed_counted_twice():
    with pytest.raises(ValueError, match="run 'r0' is given twice"):
        aggregate([_row("r0", 0, 0.9), _row("r0", 0, 0.9)])
    with pytest.raises(ValueError, match="runs 'r0' and 'r9' have the same configuration"):
        aggregate([_row("r0", 0, 0.9), _row("r9", 0, 0.8)])


def test_config_key_ignores_the_seed_and_where_a_run_ran_but_not_training_options():
    base = TrainConfig()
    assert config_key(base) == config_key(TrainConfig(seed=3, logdir="elsewhere", device="cpu"))
    assert config_key(base.to_dict()) == config_key(base)
    assert config_key(TrainConfig(lr=1e-2)) != config_key(base)
    values = base.to_dict()
    values["continuation"] = {**values["continuation"], "classifier_epochs": 3}
    assert config_key(values) != config_key(base)  # a 3-epoch run is not a seed of a 40-epoch one
    values["continuation"] = {**base.to_dict()["continuation"], "alpha": [0.5]}
    assert config_key(values) == config_key(base)  # alpha is a row's own column


def test_tensorboard_writes_one_run_per_alpha_group_and_keeps_what_is_there(tmp_path):
    rows = []
    for alpha, shift in ((0.01, 0.0), (0.001, 0.05)):
        for seed in (0, 1):
            run = f"a{alpha}-s{seed}"
            for point in range(3):
                row = _row(
                    run, seed, 0.8 + shift + 0.01 * point, alpha=alpha, point=f"sweep {point}"
                )
                row.kind, row.policy = "curve", "max-softmax"
                row.mean_macs = 100.0 * (point + 1) + 1000 * shift
                rows.append(row)
            rows.append(_row(run, seed, 0.9 + shift, alpha=alpha, point=f"a={alpha:g}"))
    mine = tmp_path / "tensorboard" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("kept")
    aggregated = aggregate(rows)
    tb = write_tensorboard(tmp_path, aggregated, [], rows)
    assert mine.read_text() == "kept" and tb == tmp_path / "tensorboard-2"
    for alpha, shift in ((0.01, 0.0), (0.001, 0.05)):
        events = EventAccumulator(str(tb / "digits" / f"continuation_a{alpha:g}" / "max-softmax"))
        events.Reload()
        values = [e.value for e in events.Scalars("compare/accuracy")]
        assert values == pytest.approx([0.8 + shift + 0.01 * p for p in range(3)])  # no zig-zag


def test_figures_are_per_configuration_and_hide_no_marker():
    rows = [_row("r0", 0, 0.9), _row("r1", 1, 0.92), _row("r2", 0, 0.7, config="c2")]
    for r in rows[:]:
        for t, (macs, acc) in enumerate(((10.0, 0.6), (100.0, 0.95))):
            single = copy.copy(r)
            single.kind, single.policy, single.point = "single", "single", f"stage{t}"
            single.mean_macs, single.accuracy = macs, acc
            rows.append(single)
    figures = make_figures(rows, aggregate(rows))
    groups = [tag for tag in figures if tag.startswith("compare/tradeoff/")]
    assert len(groups) == 2
    # the paths compare checks before drawing are the files it draws
    out = Path("out")
    drawn = {figure_path(out, tag) for tag in figures}
    assert sorted(figure_paths(out, rows)) == sorted(drawn)
    for tag in groups:
        (ax,) = figures[tag].axes
        figures[tag].canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, over no marker
        assert not ax.texts  # no label drawn over another marker
    assert "c2" in figures[groups[0]].axes[0].get_title() + figures[groups[1]].axes[0].get_title()


# -- training is never lost -------------------------------------------------------------------

FAST = ["--alpha", "1e-2", "--cv-classifier-epochs", "4", "--cv-folds", "2", "--no-progress"]
FAST += ["--device", "cpu", "--threads", "1"]  # one thread here and in the subprocess


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("uninterrupted")
    assert main([*FAST, "--logdir", str(logdir)]) == 0
    (run,) = logdir.iterdir()
    return json.loads((run / "metrics.json").read_text())


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import policycascade.checkpointing as checkpointing
    from policycascade.train import main
    real, saves = checkpointing.save_atomic, [0]
    def save_then_die(state, path):
        real(state, path)
        saves[0] += 1
        if saves[0] == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.save_atomic = save_then_die
    main(sys.argv[2:])
    """
)


def test_kill_9_during_classifier_training_resumes_to_the_same_metrics(tmp_path, uninterrupted):
    logdir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLER, "2", *FAST, "--logdir", str(logdir)]
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == -signal.SIGKILL, process.stderr
    (run,) = logdir.iterdir()
    state = load_checkpoint(run)
    assert state["epoch"] == 0  # killed inside the first unit, after 2 of its 4 epochs
    assert state["state"]["unit_in_progress"]["unit"] == 0
    assert state["state"]["unit_in_progress"]["training"]["epoch"] == 2
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == uninterrupted


def test_sigterm_inside_a_cross_fitting_fold_stops_there_and_resumes_exactly(
    tmp_path, monkeypatch, uninterrupted
):
    real, saves = checkpointing.save_atomic, [0]

    def save_then_signal(state, path):
        real(state, path)
        saves[0] += 1
        if saves[0] == 6:  # unit 0: 3 inner saves and its own; fold 0: after its epoch 2
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(checkpointing, "save_atomic", save_then_signal)
    assert main([*FAST, "--logdir", str(tmp_path)]) == 130
    monkeypatch.setattr(checkpointing, "save_atomic", real)
    (run,) = tmp_path.iterdir()
    state = load_checkpoint(run)
    assert state["epoch"] == 1 and state["state"]["unit_in_progress"]["unit"] == 1
    assert state["state"]["unit_in_progress"]["training"]["epoch"] == 2
    assert main(["--resume", str(run), "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text()) == uninterrupted
