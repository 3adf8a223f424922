import csv
import sys

import numpy as np
import pytest
import torch

from conftest import hand_outputs, random_outputs
from policycascade.agents.rules import exit_stages
from policycascade.agents.thresholds import ThresholdSearch
from policycascade.cascade import CascadeOutputs
from policycascade.costs import StageCosts
from policycascade.outputs_io import load_outputs, outputs_from_arrays, save_outputs


def named(outputs: CascadeOutputs, costs=(10, 30.5, 100), unit="MACs") -> CascadeOutputs:
    """The same predictions with stage names and the given costs."""
    return outputs_from_arrays(
        outputs.labels,
        probs=outputs.probs,
        stage_costs=list(costs),
        stage_names=[f"m{t}" for t in range(outputs.num_stages)],
        cost_unit=unit,
    )


def assert_same(a: CascadeOutputs, b: CascadeOutputs) -> None:
    assert torch.equal(a.probs.double(), b.probs.double())
    assert torch.equal(a.labels, b.labels) and a.labels.dtype == torch.int64
    assert a.names == b.names
    assert a.costs.classifier_macs == b.costs.classifier_macs
    assert a.costs.alone_macs == b.costs.alone_macs
    assert a.costs.unit == b.costs.unit


# --- StageCosts and CascadeOutputs -------------------------------------------------------


def test_stage_costs_keep_ints_and_take_measured_milliseconds():
    macs = StageCosts([10, 30, 100])
    assert macs.unit == "MACs" and all(type(m) is int for m in macs.cumulative_macs)
    assert "unit" not in macs.as_dict()  # MAC tables (metrics.json) read as before
    assert StageCosts([10.0, np.int64(30), 100]).classifier_macs == [10, 30, 100]
    ms = StageCosts([0.25, 1.5, 4.0], unit="ms")
    assert ms.cumulative_macs == [0.25, 1.75, 5.75]
    assert ms.stage_costs == pytest.approx([0.0625, 0.375, 1.0])
    assert ms.as_dict()["unit"] == "ms"
    assert ms.with_policy_macs([0.5, 0.5, 0]).unit == "ms"
    with pytest.raises(ValueError, match="unit must be one of \\['MACs', 'ms'\\], got 'sec'"):
        StageCosts([1, 2], unit="sec")


def test_outputs_keep_stage_names_through_to_and_with_costs():
    out = hand_outputs()  # positional 3-argument construction still works
    assert out.names is None
    named_out = CascadeOutputs(out.probs, out.labels, out.costs, ["a", "b", "c"])
    assert named_out.to("cpu").names == ["a", "b", "c"]
    assert named_out.with_costs(out.costs.with_policy_macs([1, 1, 0])).names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="names must hold 3 stage names"):
        CascadeOutputs(out.probs, out.labels, out.costs, ["a", "b"])


# --- arrays -------------------------------------------------------------------------------


def test_outputs_from_arrays_accepts_numpy_torch_and_lists():
    out = hand_outputs()
    for convert in (lambda t: t.numpy(), lambda t: t, lambda t: t.tolist()):
        got = outputs_from_arrays(
            convert(out.labels),
            probs=convert(out.probs),
            stage_costs=convert(torch.tensor([10, 30, 100])),
        )
        assert torch.equal(got.probs.double(), out.probs.double())
        assert got.labels.tolist() == [1, 2] and got.names == ["stage0", "stage1", "stage2"]
        assert got.costs.classifier_macs == [10, 30, 100]


def test_logits_give_the_softmax_and_the_same_decisions_as_probs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 3, 4, generator=g) * 3
    labels = torch.randint(4, (300,), generator=g)
    from_logits = outputs_from_arrays(labels, logits=logits.numpy(), stage_costs=[1, 3, 9])
    from_probs = outputs_from_arrays(labels, probs=logits.softmax(-1), stage_costs=[1, 3, 9])
    assert torch.equal(from_logits.probs, from_probs.probs)
    for criterion in ("max-softmax", "entropy", "logit-margin"):
        rule = ThresholdSearch(from_probs.probs, labels, from_probs.costs, criterion).for_reward(
            0.1
        )
        assert torch.equal(
            exit_stages(rule, from_logits.probs), exit_stages(rule, from_probs.probs)
        )


def test_rounded_probabilities_are_kept_as_given():
    probs = np.array([[[0.333, 0.333, 0.333], [0.5, 0.25, 0.25]]])  # an API's 3 decimals
    out = outputs_from_arrays([0], probs=probs, stage_costs=[1, 2])
    assert out.probs.dtype == torch.float64 and out.probs[0, 0, 0].item() == 0.333


PROBS = np.full((2, 2, 3), 1 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probs": PROBS, "logits": PROBS}, "pass exactly one of probs= .* got both"),
        ({}, "pass exactly one of probs= .* got neither"),
        ({"probs": PROBS[0]}, "probs must be \\(sample, stage, class\\) .* got shape \\(2, 3\\)"),
        ({"probs": PROBS[:, :1]}, ">= 2 stages .* got shape \\(2, 1, 3\\)"),
        ({"probs": np.where(np.eye(3)[None, :2] > 0, np.nan, PROBS)}, "probs\\[0, 0, 0\\] is nan"),
        ({"probs": PROBS * 1.2}, "probs\\[0, 0\\] \\(stage 0, sample 0\\) is not a probability"),
        ({"probs": np.log(PROBS) + 3}, "look like logits: pass logits= instead of probs="),
        ({"probs": [["a"]]}, "probs must be a numeric array"),
        ({"labels": [0, 3]}, "labels must be class indices in \\[0, 3\\) .* labels\\[1\\]=3"),
        ({"labels": [0, -1]}, "labels\\[1\\]=-1"),
        ({"labels": [0.0, 1.5]}, "labels must be integer class indices, got labels\\[1\\]=1.5"),
        ({"labels": [0, 1, 2]}, "labels must have shape \\(2,\\) .* got \\(3,\\)"),
        ({"labels": ["a", "b"]}, "labels must be integer class indices, got dtype"),
        (
            {"stage_costs": [1, 2, 3]},
            "stage_costs must be 2 finite numbers > 0 .* \\[1.0, 2.0, 3.0\\]",
        ),
        ({"stage_costs": [1, -2]}, "stage_costs must be 2 finite numbers > 0"),
        ({"stage_costs": [1, float("inf")]}, "stage_costs must be 2 finite numbers > 0"),
        ({"stage_costs": "cheap"}, "stage_costs must be 2 numbers"),
        ({"stage_names": ["a"]}, "stage_names must be 2 distinct non-empty names, got \\['a'\\]"),
        ({"stage_names": ["a", "a"]}, "stage_names must be 2 distinct"),
        ({"cost_unit": "sec"}, "cost_unit must be one of \\['MACs', 'ms'\\], got 'sec'"),
    ],
)
def test_bad_arrays_are_refused_naming_the_argument(kwargs, message):
    args = {"labels": [0, 1], "stage_costs": [1, 2]}
    if "probs" not in kwargs and "logits" not in kwargs and kwargs:
        args["probs"] = PROBS
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        outputs_from_arrays(args.pop("labels"), **args)


def test_simplex_error_names_the_first_bad_stage_and_sample():
    probs = np.tile(np.array([0.2, 0.3, 0.5]), (4, 2, 1))
    probs[2, 1] = [0.2, 0.3, 0.4]  # sums to 0.9
    with pytest.raises(
        ValueError, match="probs\\[2, 1\\] \\(stage 1 \\('b'\\), sample 2\\)"
    ) as err:
        outputs_from_arrays([0] * 4, probs=probs, stage_costs=[1, 2], stage_names=["a", "b"])
    assert "logits" not in str(err.value)  # off by 0.1: a bad row, not logits


# --- files --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_round_trip_by_split(tmp_path, suffix):
    val, test = named(random_outputs(40, 3, 4, seed=0)), named(random_outputs(25, 3, 4, seed=1))
    path = tmp_path / f"outputs{suffix}"
    save_outputs({"val": val, "test": test}, path)
    loaded = load_outputs(path)
    assert list(loaded) == ["val", "test"]
    assert_same(loaded["val"], val)
    assert_same(loaded["test"], test)


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_round_trip_without_split_keeps_units_and_alone_costs(tmp_path, suffix):
    out = named(random_outputs(30, 3, 5, seed=2), costs=(0.25, 1.5, 7.125), unit="ms")
    shared = outputs_from_arrays(
        out.labels, probs=out.probs, stage_costs=[10, 20, 30], alone_costs=[10, 30, 60]
    )
    for original in (out, shared):
        path = tmp_path / f"outputs{suffix}"
        save_outputs(original, path, overwrite=True)  # the second pass replaces the first
        loaded = load_outputs(path)
        assert list(loaded) == ["all"]
        assert_same(loaded["all"], original)


def write_table(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_table_reads_stages_in_order_of_appearance_and_averages_measured_costs(tmp_path):
    path = tmp_path / "out.csv"
    header = ["id", "label", "split", "big.p0", "big.p1", "big.cost", "small.p0", "small.p1"]
    header.append("small.cost")
    write_table(
        path,
        header,
        [
            [7, 0, "test", 0.9, 0.1, 4.0, 0.6, 0.4, 1],
            [8, 1, "calibration", 0.2, 0.8, 6.0, 0.5, 0.5, 1],
            [9, 1, "test", 0.3, 0.7, 5.0, 0.7, 0.3, 1],
        ],
    )
    loaded = load_outputs(path, cost_unit="ms")
    assert list(loaded) == ["test", "calibration"]
    test = loaded["test"]
    assert test.names == ["big", "small"]  # first appearance, not sorted
    assert test.costs.classifier_macs == [5, 1]  # mean of the per-sample measurements
    assert test.costs.unit == "ms"
    assert test.labels.tolist() == [0, 1]
    assert test.probs[1].tolist() == [[0.3, 0.7], [0.7, 0.3]]
    overridden = load_outputs(path, stage_costs=[2, 3])["calibration"]
    assert overridden.costs.classifier_macs == [2, 3]


def test_table_of_logits(tmp_path):
    path = tmp_path / "out.csv"
    write_table(path, ["label", "a.logit0", "a.logit1", "b.logit0", "b.logit1"], [[1, 0, 1, 2, 0]])
    out = load_outputs(path, stage_costs=[1, 2])["all"]
    expected = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64).softmax(-1)
    assert torch.equal(out.probs[0], expected)


@pytest.mark.parametrize(
    ("header", "row", "kwargs", "message"),
    [
        (["y", "a.p0", "a.p1", "b.p0", "b.p1"], [0, 1, 0, 1, 0], {}, "has no 'label' column"),
        (["label", "a.p0", "a.p1", "b.p0"], [0, 1, 0, 1], {}, "lacks column 'b.p1'"),
        (["label", "a.p0", "a.p1", "b.p0", "b.p2"], [0, 1, 0, 1, 0], {}, "lacks column 'a.p2'"),
        (["label", "a.p0", "a.p1", "b.logit0", "b.logit1"], [0, 1, 0, 1, 0], {}, "mixes"),
        (["label", "a.prob0", "a.p1"], [0, 1, 0], {}, "column 'a.prob0' is not <stage>.p<c>"),
        (["label", "id"], [0, 1], {}, "has no stage columns"),
        (["label", "a.p0", "a.p1", "b.p0", "b.p1"], [0, 1, 0, 1, 0], {}, "pass stage_costs="),
        (
            ["label", "a.p0", "a.p1", "a.cost", "b.p0", "b.p1"],
            [0, 1, 0, 1, 1, 0],
            {},
            "lacks column 'b.cost'",
        ),
        (
            ["label", "split", "a.p0", "a.p1", "b.p0", "b.p1"],
            [0, "holdout", 1, 0, 1, 0],
            {"stage_costs": [1, 2]},
            "split 'holdout': split names must be among \\['train', 'fit', 'val', 'calibration'",
        ),
        (
            ["label", "a.p0", "a.p1", "b.p0", "b.p1"],
            [0, "high", 0, 1, 0],
            {"stage_costs": [1, 2]},
            "column 'a.p0' row 1 is 'high', not a number",
        ),
        (
            ["label", "a.p0", "a.p1", "b.p0", "b.p1"],
            [0, 0.9, 0.2, 1, 0],
            {"stage_costs": [1, 2]},
            "probs\\[0, 0\\] \\(stage 0 \\('a'\\), sample 0\\) is not a probability vector",
        ),
    ],
)
def test_bad_tables_are_refused_naming_the_column(tmp_path, header, row, kwargs, message):
    path = tmp_path / "bad.csv"
    write_table(path, header, [row])
    with pytest.raises(ValueError, match=message):
        load_outputs(path, **kwargs)


def test_bad_paths_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="must end in .npz, .csv or .parquet, got '.*out.json'"):
        load_outputs(tmp_path / "out.json")
    with pytest.raises(ValueError, match="must end in .npz, .csv or .parquet"):
        save_outputs(hand_outputs(), tmp_path / "out.txt")
    with pytest.raises(FileNotFoundError, match="no outputs file at '.*missing.csv'"):
        load_outputs(tmp_path / "missing.csv")
    np.savez(tmp_path / "nolabels.npz", probs=PROBS)
    with pytest.raises(ValueError, match="has no 'labels' array"):
        load_outputs(tmp_path / "nolabels.npz")
    with pytest.raises(ValueError, match="split names must be among"):
        save_outputs({"holdout": hand_outputs()}, tmp_path / "out.npz")
    with pytest.raises(ValueError, match="outputs\\['test'\\] is another cascade"):
        save_outputs({"val": hand_outputs(), "test": named(hand_outputs())}, tmp_path / "o.npz")
    save_outputs(hand_outputs(), tmp_path / "out.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ValueError, match="reading .parquet needs pyarrow: pip install pyarrow"):
        load_outputs(tmp_path / "out.parquet")


# --- bad input found by a probe: each is refused naming the argument, file, column, row ---


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (  # a misspelt split column would let a fit read test rows
            ["label", "splt", "a.p0", "a.p1", "b.p0", "b.p1"],
            [[0, "test", 1, 0, 1, 0]],
            "column 'splt' is unknown: .* did you mean 'split'\\?",
        ),
        (
            ["label", "a.p0", "a.p1", "a.p0", "b.p0", "b.p1"],
            [[0, 1, 0, 0.5, 1, 0]],
            "has two columns named 'a.p0'",
        ),
        (["label", "a.p0", "a.p1", "b.p0", "b.p1"], [], "has a header but no rows"),
        (
            ["label", "a.p0", "a.p1", "a.cost", "b.p0", "b.p1", "b.cost"],
            [[0, 1, 0, 1.5, 1, 0, 3], [1, 0, 1, 1.5, 0, 1, -3]],
            "column 'b.cost' row 2 is -3.0: every cost must be a finite number > 0",
        ),
        (
            ["label", "a.p0", "a.p1", "a.cost", "b.p0", "b.p1", "b.cost"],
            [[0, 1, 0, "nan", 1, 0, 3]],
            "column 'a.cost' row 1 is nan",
        ),
        (
            ["label", "a.p0", "a.p1", "a.cost", "b.p0", "b.p1", "b.cost"],
            [[0, 1, 0, 0, 1, 0, 3]],
            "column 'a.cost' row 1 is 0.0",
        ),
        (  # errors raised while building the outputs name the file and the split
            ["label", "split", "a.p0", "a.p1", "a.cost", "b.p0", "b.p1", "b.cost"],
            [[0, "val", 1, 0, 1, 1, 0, 3], [1e20, "test", 0, 1, 1, 0, 1, 3]],
            "'.*bad.csv' split 'test': labels must be class indices in \\[0, 2\\) "
            "\\(2 classes\\), got labels\\[0\\]=1e\\+20",
        ),
    ],
)
def test_probed_bad_tables_are_refused(tmp_path, header, rows, message, recwarn):
    path = tmp_path / "bad.csv"
    write_table(path, header, rows)
    with pytest.raises(ValueError, match=message):
        load_outputs(path)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_duplicate_and_unknown_parquet_columns_are_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_arrays(
        [pa.array([0]), pa.array([1.0]), pa.array([0.0]), pa.array([0.5])],
        names=["label", "a.p0", "a.p1", "a.p0"],
    )
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="'.*dup.parquet' has two columns named 'a.p0'"):
        load_outputs(tmp_path / "dup.parquet", stage_costs=[1, 2])


def test_no_samples_and_odd_costs_and_huge_labels_are_refused(tmp_path, recwarn):
    with pytest.raises(ValueError, match="probs must hold at least one sample"):
        outputs_from_arrays([], probs=np.zeros((0, 2, 2)), stage_costs=[1, 2])
    empty = CascadeOutputs(
        torch.zeros(0, 3, 3), torch.zeros(0, dtype=torch.long), StageCosts([1, 2, 3])
    )
    with pytest.raises(ValueError, match="outputs\\['test'\\] has 0 samples"):
        save_outputs({"val": hand_outputs(), "test": empty}, tmp_path / "o.npz")
    for costs in ([1, True, 3], ["1", "2", "3"], np.array([True, True, True]), "123"):
        with pytest.raises(ValueError, match="stage_costs must be 3 numbers .* not bools or text"):
            outputs_from_arrays([0], probs=np.full((1, 3, 2), 0.5), stage_costs=costs)
    with pytest.raises(ValueError, match="got labels\\[1\\]=1e\\+20"):
        outputs_from_arrays([0, 1e20], probs=np.full((2, 2, 2), 0.5), stage_costs=[1, 2])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_save_outputs_keeps_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("mine\n")
    with pytest.raises(FileExistsError, match="'.*out.csv' already exists: pass overwrite=True"):
        save_outputs(hand_outputs(), path)
    assert path.read_text() == "mine\n"
    save_outputs(named(hand_outputs()), path, overwrite=True)
    assert_same(load_outputs(path)["all"], named(hand_outputs()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no temporary left


def test_npz_is_written_under_the_given_name_whatever_the_case(tmp_path):
    path = tmp_path / "OUT.NPZ"
    save_outputs(named(hand_outputs()), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT.NPZ"]
    assert_same(load_outputs(path)["all"], named(hand_outputs()))


def test_bad_path_types_and_garbage_npz_are_refused(tmp_path):
    for bad in (5, None):
        with pytest.raises(TypeError, match="path must be a str or a path, got"):
            load_outputs(bad)
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ValueError, match="'.*junk.npz' is not a readable .npz outputs file"):
        load_outputs(tmp_path / "junk.npz")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet either")
    with pytest.raises(ValueError, match="'.*junk.parquet' is not a readable .parquet file"):
        load_outputs(tmp_path / "junk.parquet")
