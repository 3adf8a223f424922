"""Bring-your-own cascade outputs: arrays or files from any framework -> ``CascadeOutputs``.

Every policy is fitted and evaluated on cached softmaxes, so predictions made by
scikit-learn, XGBoost or an LLM API serve as well as a torch cascade's. Layouts
(``.npz``, CSV, Parquet) are documented in ``docs/outputs-format.md``.
"""

from __future__ import annotations

import csv
import difflib
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policycascade.cascade import CascadeOutputs
from policycascade.costs import COST_UNITS, StageCosts

SPLITS = ("train", "fit", "val", "calibration", "test")
ALL = "all"  # the key of a file without a split column
SIMPLEX_ATOL = (
    1e-3  # probabilities may be rounded (an API's 3 decimals); rows must sum to 1 +- this
)
_PLAIN_COLUMNS = ("label", "split", "cost_unit", "id")  # the columns without a dot (id ignored)
_COLUMN = re.compile(
    r"^(?P<stage>.+)\.(?:(?P<kind>p|logit)(?P<cls>\d+)|(?P<cost>cost|alone_cost))$"
)


def outputs_from_arrays(
    labels: Any,
    *,
    probs: Any = None,
    logits: Any = None,
    stage_costs: Sequence[float] | Any,
    stage_names: Sequence[str] | None = None,
    cost_unit: str = "MACs",
    alone_costs: Sequence[float] | None = None,
) -> CascadeOutputs:
    """Cached outputs from plain arrays (numpy, torch or nested lists).

    Args:
        labels: (N,) true classes, integers in [0, C).
        probs: (N, K, C) probabilities of each stage (rows on the simplex); or
        logits: (N, K, C) scores, turned into probabilities by a softmax. Exactly one.
        stage_costs: K finite numbers > 0: the cost of running each stage's classifier
            after the earlier ones (incremental), in ``cost_unit``.
        stage_names: K names, cheapest stage first (default ``stage0``, ``stage1``, ...).
        cost_unit: ``"MACs"`` (counted) or ``"ms"`` (measured latency).
        alone_costs: K costs of each classifier used on its own, where stages share
            computation (default: ``stage_costs``).

    Float32/float64 inputs keep their precision, float16 becomes float32, integers float64.
    """
    if (probs is None) == (logits is None):
        raise ValueError(
            "pass exactly one of probs= (probabilities) or logits= (scores before the softmax), "
            f"got {'both' if probs is not None else 'neither'}"
        )
    name = "probs" if probs is not None else "logits"
    scores = _float_array(probs if probs is not None else logits, name)
    if scores.ndim != 3 or scores.shape[1] < 2 or scores.shape[2] < 2:
        raise ValueError(
            f"{name} must be (sample, stage, class) with >= 2 stages and >= 2 classes, "
            f"got shape {scores.shape}"
        )
    if not np.isfinite(scores).all():
        n, k, c = np.argwhere(~np.isfinite(scores))[0]
        raise ValueError(f"{name}[{n}, {k}, {c}] is {scores[n, k, c]}: every value must be finite")
    n, k, c = scores.shape
    if n == 0:
        raise ValueError(f"{name} must hold at least one sample, got shape {scores.shape}")
    if logits is not None:
        probs_t = torch.from_numpy(scores).softmax(-1)
    else:
        _check_simplex(scores, stage_names)
        probs_t = torch.from_numpy(scores)
    labels_t = _labels(labels, n, c)
    costs = _stage_costs(stage_costs, k, cost_unit, alone_costs)
    names = _stage_names(stage_names, k)
    return CascadeOutputs(probs_t, labels_t, costs, names)


def load_outputs(
    path: str | Path,
    *,
    stage_costs: Sequence[float] | None = None,
    cost_unit: str | None = None,
) -> dict[str, CascadeOutputs]:
    """Outputs in ``path`` (.npz, .csv or .parquet), keyed by split (``"all"`` without one).

    ``stage_costs`` overrides the costs stored in the file and ``cost_unit`` its unit
    (default: the file's, else ``"MACs"``).
    """
    path = _path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise ValueError(f"path must end in .npz, .csv or .parquet, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no outputs file at {str(path)!r}")
    if suffix == ".npz":
        arrays = _read_npz(path)
    else:
        columns = _read_csv(path) if suffix == ".csv" else _read_parquet(path)
        arrays = _table_to_arrays(columns, path)
    if stage_costs is not None:
        arrays["stage_costs"] = stage_costs
        arrays.pop("alone_costs", None)
    if cost_unit is not None:
        arrays["cost_unit"] = cost_unit
    if arrays.get("stage_costs") is None:
        raise ValueError(
            f"{str(path)!r} holds no stage costs: pass stage_costs= (one per stage: "
            f"{arrays['stage_names']})"
        )
    return _split(arrays, path)


def save_outputs(
    outputs: CascadeOutputs | Mapping[str, CascadeOutputs],
    path: str | Path,
    *,
    overwrite: bool = False,
) -> None:
    """Write outputs (one split, or several keyed by split) as .npz, .csv or .parquet.

    The stored costs are the classifiers' (and, where they differ, the classifiers'
    alone); a stopping rule's own cost is not part of the outputs. An existing ``path``
    is replaced only with ``overwrite=True``; the file is written whole or not at all.
    """
    path = _path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv", ".parquet"):
        raise ValueError(f"path must end in .npz, .csv or .parquet, got {str(path)!r}")
    refuse_existing(path, overwrite)
    parts = _check_parts(outputs)
    write_atomically(path, lambda tmp: _write(parts, tmp, suffix))


def refuse_existing(path: Path, overwrite: bool) -> None:
    """FileExistsError when ``path`` exists and ``overwrite`` is not True."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{str(path)!r} already exists: pass overwrite=True to replace it")


def write_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then move it onto ``path``.

    A failed write leaves ``path`` as it was (a crash cannot leave half a file there).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(parts: dict[str, CascadeOutputs], path: Path, suffix: str) -> None:
    """Write ``parts`` to ``path`` in the layout of ``suffix`` (whatever ``path`` ends in)."""
    first = next(iter(parts.values()))
    names = first.names or [f"stage{t}" for t in range(first.num_stages)]
    costs = first.costs
    probs = np.concatenate([o.probs.detach().cpu().numpy() for o in parts.values()])
    labels = np.concatenate([o.labels.detach().cpu().numpy() for o in parts.values()])
    split = None
    if list(parts) != [ALL]:
        split = np.concatenate([np.full(o.num_samples, key) for key, o in parts.items()])
    alone = costs.alone_macs if costs.alone_macs != costs.classifier_macs else None
    if suffix == ".npz":
        arrays: dict[str, Any] = {
            "labels": labels,
            "probs": probs,
            "stage_costs": np.asarray(costs.classifier_macs),
            "stage_names": np.asarray(names),
            "cost_unit": np.asarray(costs.unit),
        }
        if alone is not None:
            arrays["alone_costs"] = np.asarray(alone)
        if split is not None:
            arrays["split"] = split
        with path.open("wb") as f:  # a handle: np.savez would append .npz to other names
            np.savez(f, **arrays)
        return
    columns: dict[str, Any] = {"label": labels.tolist()}
    if split is not None:
        columns["split"] = split.tolist()
    if costs.unit != "MACs":
        columns["cost_unit"] = [costs.unit] * len(labels)
    for t, stage in enumerate(names):
        for c in range(probs.shape[2]):
            columns[f"{stage}.p{c}"] = probs[:, t, c]
        columns[f"{stage}.cost"] = np.full(len(labels), costs.classifier_macs[t])
        if alone is not None:
            columns[f"{stage}.alone_cost"] = np.full(len(labels), alone[t])
    if suffix == ".parquet":
        pa, pq = _pyarrow("writing")
        pq.write_table(pa.table(columns), str(path))
        return
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        # repr of a Python float reads back to the same float64 (float32 values included)
        cells = [
            col if isinstance(col, list) else [repr(v) for v in col.tolist()]
            for col in columns.values()
        ]
        writer.writerows(zip(*cells, strict=True))


def _check_parts(
    outputs: CascadeOutputs | Mapping[str, CascadeOutputs],
) -> dict[str, CascadeOutputs]:
    if isinstance(outputs, CascadeOutputs):
        if outputs.num_samples == 0:
            raise ValueError("outputs has 0 samples: need at least one sample")
        return {ALL: outputs}
    if not isinstance(outputs, Mapping) or not outputs:
        raise TypeError(
            "outputs must be CascadeOutputs or a non-empty dict of them keyed by split, "
            f"got {type(outputs).__name__}"
        )
    parts = dict(outputs)
    for key, value in parts.items():
        if not isinstance(value, CascadeOutputs):
            raise TypeError(f"outputs[{key!r}] must be CascadeOutputs, got {type(value).__name__}")
        if value.num_samples == 0:
            raise ValueError(f"outputs[{key!r}] has 0 samples: need at least one sample")
        if key not in SPLITS and list(parts) != [ALL]:
            raise ValueError(f"split names must be among {list(SPLITS)}, got {key!r}")
    first = next(iter(parts.values()))
    for key, value in parts.items():
        same = (
            value.num_stages == first.num_stages
            and value.num_classes == first.num_classes
            and value.names == first.names
            and value.costs.classifier_macs == first.costs.classifier_macs
            and value.costs.alone_macs == first.costs.alone_macs
            and value.costs.unit == first.costs.unit
        )
        if not same:
            raise ValueError(
                f"outputs[{key!r}] is another cascade than the first split's: every split must "
                "share the stages, classes, stage names and costs"
            )
    return parts


def _float_array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{name} must be a numeric (sample, stage, class) array: {err}") from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a numeric array, got dtype {array.dtype}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float32 if array.dtype == np.float16 else np.float64)
    return np.ascontiguousarray(array)


def _check_simplex(probs: np.ndarray, stage_names: Sequence[str] | None) -> None:
    """Every row is a probability vector; say which one is not, and hint at logits."""
    totals = probs.astype(np.float64).sum(-1)  # (N, K)
    bad_value = (probs < 0) | (probs > 1 + SIMPLEX_ATOL)
    bad_row = bad_value.any(-1) | (np.abs(totals - 1) > SIMPLEX_ATOL)
    if not bad_row.any():
        return
    n, k = np.argwhere(bad_row)[0]
    stage = f"stage {k}" + (f" ({stage_names[k]!r})" if stage_names is not None else "")
    row = np.array2string(probs[n, k], precision=4, threshold=8)
    hint = ""
    if bad_value.any() or np.abs(totals - 1).max() > 0.5:
        hint = "; these look like logits: pass logits= instead of probs="
    raise ValueError(
        f"probs[{n}, {k}] ({stage}, sample {n}) is not a probability vector: {row} sums to "
        f"{totals[n, k]:.6g} (rows must be >= 0 and sum to 1 +- {SIMPLEX_ATOL}){hint}"
    )


def _labels(labels: Any, n: int, c: int) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) (one per sample), got {array.shape}")
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        whole = np.isfinite(array) & (array == np.round(array))
        if not whole.all():
            i = int(np.argmin(whole))
            raise ValueError(f"labels must be integer class indices, got labels[{i}]={array[i]}")
    outside = (array < 0) | (array >= c)  # before the cast: 1e20 would overflow int64
    if outside.any():
        i = int(np.argmax(outside))
        value = array[i].item()
        raise ValueError(
            f"labels must be class indices in [0, {c}) ({c} classes), got labels[{i}]={value!r}"
        )
    return torch.from_numpy(array.astype(np.int64))


def _stage_costs(
    stage_costs: Any, k: int, unit: str, alone_costs: Sequence[float] | None
) -> StageCosts:
    if unit not in COST_UNITS:
        raise ValueError(f"cost_unit must be one of {list(COST_UNITS)}, got {unit!r}")
    costs = _cost_list(stage_costs, k, "stage_costs")
    alone = None if alone_costs is None else _cost_list(alone_costs, k, "alone_costs")
    return StageCosts(costs, None, alone, unit)


def _cost_list(values: Any, k: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if _has_bool_or_text(values):
        raise ValueError(
            f"{name} must be {k} numbers (one per stage), not bools or text, got {values!r}"
        )
    try:
        array = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        raise ValueError(f"{name} must be {k} numbers (one per stage), got {values!r}") from None
    if array.shape != (k,) or not (np.isfinite(array) & (array > 0)).all():
        raise ValueError(
            f"{name} must be {k} finite numbers > 0 (one per stage), got {array.tolist()}"
        )
    return array.tolist()


def _has_bool_or_text(values: Any) -> bool:
    """Whether ``values`` is or holds a bool or a string (numpy would read them as numbers)."""
    if isinstance(values, str | bytes | bool | np.bool_):
        return True
    if isinstance(values, np.ndarray):
        if values.dtype == bool or values.dtype.kind in "USa":
            return True
        if values.dtype != object:
            return False
        values = values.tolist()
    if isinstance(values, Sequence):
        return any(isinstance(v, str | bytes | bool | np.bool_) for v in values)
    return False


def _path(path: Any) -> Path:
    if isinstance(path, Path):
        return path
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or a path, got {type(path).__name__} {path!r}")
    return Path(path)


def _stage_names(names: Sequence[str] | None, k: int) -> list[str]:
    if names is None:
        return [f"stage{t}" for t in range(k)]
    names = [str(name) for name in names]
    if len(names) != k or len(set(names)) != k or not all(names):
        raise ValueError(f"stage_names must be {k} distinct non-empty names, got {names}")
    return names


def stored_stage_costs(path: str | Path) -> list[float]:
    """The per-stage costs of a ``.npz`` outputs file, read without its probabilities."""
    with np.load(Path(path), allow_pickle=False) as data:  # members load only when asked for
        return data["stage_costs"].tolist()


def _read_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):  # a bare .npy array saved under a .npz name
                raise ValueError("it holds one array, not named arrays")
            stored = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz outputs file: {err}") from None
    if "labels" not in stored:
        raise ValueError(f"{str(path)!r} has no 'labels' array (found {sorted(stored)})")
    if ("probs" in stored) == ("logits" in stored):
        raise ValueError(
            f"{str(path)!r} must hold exactly one of 'probs' and 'logits' (found {sorted(stored)})"
        )
    unit = stored.get("cost_unit")
    split = stored.get("split")
    return {
        "labels": stored["labels"],
        "probs": stored.get("probs"),
        "logits": stored.get("logits"),
        "stage_costs": stored.get("stage_costs"),
        "alone_costs": stored.get("alone_costs"),
        "stage_names": stored["stage_names"].tolist() if "stage_names" in stored else None,
        "cost_unit": str(unit) if unit is not None else "MACs",
        "split": split.astype(str) if split is not None else None,
    }


def _read_csv(path: Path) -> dict[str, list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{str(path)!r} is empty: expected a header row and one row per sample")
    header, body = rows[0], rows[1:]
    _refuse_duplicates(header, path)
    if not body:
        raise ValueError(f"{str(path)!r} has a header but no rows: expected one row per sample")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(
                f"{str(path)!r} line {i + 2} has {len(row)} cells, the header {len(header)}"
            )
    return {name: [row[j] for row in body] for j, name in enumerate(header)}


def _refuse_duplicates(header: Sequence[str], path: Path) -> None:
    seen = set()
    for name in header:
        if name in seen:
            raise ValueError(f"{str(path)!r} has two columns named {name!r}: rename one")
        seen.add(name)


def _pyarrow(action: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{action} .parquet needs pyarrow: pip install pyarrow") from None
    return pa, pq


def _read_parquet(path: Path) -> dict[str, Any]:
    _, pq = _pyarrow("reading")
    try:  # pyarrow raises its own error types for broken files
        names = pq.read_schema(path).names
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable .parquet file: {err}") from None
    _refuse_duplicates(names, path)  # before read_table, which fails on them obscurely
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable .parquet file: {err}") from None
    if table.num_rows == 0:
        raise ValueError(f"{str(path)!r} has columns but no rows: expected one row per sample")
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _numbers(column: Sequence, name: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(column, dtype=np.float64)
    except (ValueError, TypeError):
        for i, value in enumerate(column):
            try:
                float(value)
            except (ValueError, TypeError):
                raise ValueError(
                    f"{str(path)!r} column {name!r} row {i + 1} is {value!r}, not a number"
                ) from None
        raise


def _constant(column: Sequence, name: str, path: Path) -> str:
    values = sorted({str(v) for v in column})
    if len(values) != 1:
        raise ValueError(f"{str(path)!r} column {name!r} must hold one value, got {values}")
    return values[0]


def _class_column(columns: dict[str, Sequence], name: str, path: Path) -> np.ndarray:
    return _numbers(columns[name], name, path)


def _mean_cost(column: Sequence, name: str, path: Path) -> float:
    """The mean of a per-sample cost column, every cell finite and > 0."""
    cells = _numbers(column, name, path)
    bad = ~(np.isfinite(cells) & (cells > 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{str(path)!r} column {name!r} row {i + 1} is {float(cells[i])!r}: every cost must be "
            "a finite number > 0"
        )
    return float(cells.mean())


def _table_to_arrays(columns: dict[str, Sequence], path: Path) -> dict[str, Any]:
    """Table columns (``label``, ``split``, ``<stage>.p<c>``, ...) -> arrays by name."""
    if "label" not in columns:
        raise ValueError(f"{str(path)!r} has no 'label' column (columns: {list(columns)[:8]}...)")
    stages, kind = _stage_columns(columns, path)
    scores = _stage_scores(columns, stages, kind, path)  # (sample, stage, class)
    arrays: dict[str, Any] = {
        "labels": _numbers(columns["label"], "label", path),
        "probs": scores if kind == "probs" else None,
        "logits": scores if kind == "logits" else None,
        "stage_names": list(stages),
        "cost_unit": _constant(columns["cost_unit"], "cost_unit", path)
        if "cost_unit" in columns
        else None,
        "split": np.asarray(columns["split"], dtype=str) if "split" in columns else None,
    }
    for key, column in (("stage_costs", "cost"), ("alone_costs", "alone_cost")):
        have = [column in s for s in stages.values()]
        if any(have) and not all(have):
            stage = list(stages)[have.index(False)]
            raise ValueError(f"{str(path)!r} lacks column {f'{stage}.{column}'!r}")
        arrays[key] = (
            [_mean_cost(columns[s[column]], s[column], path) for s in stages.values()]
            if all(have)
            else None
        )
    return arrays


def _stage_columns(
    columns: dict[str, Sequence], path: Path
) -> tuple[dict[str, dict[str, Any]], str]:
    """Each stage's column names, and whether its scores are ``"probs"`` or ``"logits"``.

    A stage maps ``classes`` (class -> column) and, where given, ``cost`` and
    ``alone_cost`` to column names; unknown columns are refused.
    """
    stages: dict[str, dict[str, Any]] = {}  # in order of first appearance
    kinds = set()
    for name in columns:
        if "." not in name:
            if name not in _PLAIN_COLUMNS:
                close = difflib.get_close_matches(name, _PLAIN_COLUMNS, n=1)
                hint = f": did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"{str(path)!r} column {name!r} is unknown: a column without a dot must be "
                    f"one of {list(_PLAIN_COLUMNS)}{hint}"
                )
            continue
        match = _COLUMN.match(name)
        if match is None:
            raise ValueError(
                f"{str(path)!r} column {name!r} is not <stage>.p<c>, <stage>.logit<c>, "
                "<stage>.cost or <stage>.alone_cost"
            )
        stage = stages.setdefault(match["stage"], {"classes": {}})
        if match["cost"]:
            stage[match["cost"]] = name
        else:
            kinds.add(match["kind"])
            stage["classes"][int(match["cls"])] = name
    if not stages:
        raise ValueError(f"{str(path)!r} has no stage columns such as 'small.p0'")
    if len(kinds) != 1:
        raise ValueError(
            f"{str(path)!r} mixes probability (.p<c>) and logit (.logit<c>) columns: use one kind"
        )
    return stages, "probs" if kinds == {"p"} else "logits"


def _stage_scores(
    columns: dict[str, Sequence], stages: dict[str, dict[str, Any]], kind: str, path: Path
) -> np.ndarray:
    """The (sample, stage, class) scores; every stage needs one column per class."""
    suffix = "p" if kind == "probs" else "logit"
    num_classes = max(max(s["classes"], default=-1) + 1 for s in stages.values())
    classes = range(num_classes)
    for stage, info in stages.items():
        missing = [c for c in range(num_classes) if c not in info["classes"]]
        if missing:
            raise ValueError(
                f"{str(path)!r} lacks column {f'{stage}.{suffix}{missing[0]}'!r}: every stage "
                f"needs one column per class, {suffix}0 to {suffix}{num_classes - 1}"
            )
    return np.stack(
        [
            np.stack(
                [_numbers(columns[s["classes"][c]], s["classes"][c], path) for c in classes], 1
            )
            for s in stages.values()
        ],
        axis=1,
    )


def _split(arrays: dict[str, Any], path: Path) -> dict[str, CascadeOutputs]:
    labels = np.asarray(arrays["labels"])
    split = arrays.get("split")

    def build(rows: np.ndarray | slice, where: str = "") -> CascadeOutputs:
        probs, logits = arrays.get("probs"), arrays.get("logits")
        try:
            return outputs_from_arrays(
                labels[rows],
                probs=None if probs is None else probs[rows],
                logits=None if logits is None else logits[rows],
                stage_costs=arrays["stage_costs"],
                stage_names=arrays.get("stage_names"),
                cost_unit=arrays.get("cost_unit") or "MACs",
                alone_costs=arrays.get("alone_costs"),
            )
        except (ValueError, TypeError) as err:
            # row numbers are within the split where one is named
            raise type(err)(f"{str(path)!r}{where}: {err}") from None

    if split is None:
        return {ALL: build(slice(None))}
    split = np.asarray(split, dtype=str)
    if split.shape != labels.shape:
        raise ValueError(f"{str(path)!r}: split has shape {split.shape}, labels {labels.shape}")
    names = list(dict.fromkeys(split.tolist()))
    unknown = [s for s in names if s not in SPLITS]
    if unknown:
        raise ValueError(
            f"{str(path)!r} has split {unknown[0]!r}: split names must be among {list(SPLITS)}"
        )
    return {name: build(np.flatnonzero(split == name), f" split {name!r}") for name in names}


__all__ = ["ALL", "SPLITS", "load_outputs", "outputs_from_arrays", "save_outputs"]
