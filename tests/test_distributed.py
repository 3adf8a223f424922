"""DistributedDataParallel on CPU: two gloo processes train one run together."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policycascade.config import ReinforceConfig, TrainConfig

DEFAULT = {"pretrain_epochs": 2, "epochs": 2}
# Frozen classifiers (no batch norm in training mode) and the exact, sampling-free policy
# gradient: two half batches must give the single process's full-batch updates.
SPLIT_INVARIANT = {
    "pretrain_epochs": 0,
    "epochs": 2,
    "freeze_classifiers": True,
    "policy_gradient": "exact",
}


def _config(options: dict) -> TrainConfig:
    return TrainConfig(
        device="cpu", agent="reinforce", reinforce=ReinforceConfig(alpha=[0.01], **options)
    )


def _parameters(harness) -> dict[str, torch.Tensor]:
    params = {f"cascade.{k}": v.clone() for k, v in harness.cascade.state_dict().items()}
    agent = harness.algorithm.agent.state_dict()
    params.update({f"agent.{k}": v.clone() for k, v in agent.items()})
    return params


def _worker(rank: int, store_path: str, root: str) -> None:
    """Both settings' runs, one after the other, in one process group of two."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        from torch.utils.tensorboard import SummaryWriter

        from policycascade.harness import RunHarness

        for name, options in SETTINGS.items():
            run_dir = Path(root) / name
            harness = RunHarness(_config(options), run_dir, 0.01, show_progress=False)
            start = _parameters(harness)
            writer = SummaryWriter(str(run_dir)) if harness.dist.is_main else None

            def log(metrics, step, writer=writer):
                for tag, value in metrics.items():
                    writer.add_scalar(tag, value, step)

            harness.run(log if writer is not None else None)
            if writer is not None:
                writer.close()
            end = _parameters(harness)
            torch.save({"start": start, "end": end}, Path(root) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


SETTINGS = {"default": DEFAULT, "split": SPLIT_INVARIANT}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Each setting trained by two gloo processes (forked: no second import of torch)."""
    root = tmp_path_factory.mktemp("distributed")
    for name in SETTINGS:
        (root / name).mkdir()
    mp.start_processes(
        _worker, args=(str(root / "store"), str(root)), nprocs=2, join=True, start_method="fork"
    )
    return root


def test_two_processes_keep_identical_parameters_and_write_one_run(two_process_runs):
    root = two_process_runs
    a = torch.load(root / "default-rank0.pt")["end"]
    b = torch.load(root / "default-rank1.pt")["end"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the classifiers did train (not merely stay at a shared initialisation): every stage moved
    start = torch.load(root / "default-rank0.pt")["start"]
    for stage in range(4):
        keys = [k for k in a if k.startswith(f"cascade.classifiers.{stage}.")]
        assert keys, stage
        moved = max(float((a[k].float() - start[k].float()).abs().max()) for k in keys)
        assert moved > 1e-3, f"classifier stage {stage} did not train"
    single = root / "default"
    assert [p.name for p in single.glob("checkpoint.pt")] == ["checkpoint.pt"]
    assert len(list(single.glob("events.out.tfevents.*"))) == 1
    assert not list(single.glob(".checkpoint.pt.tmp-*"))
    checkpoint = torch.load(single / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 4
    for key, value in checkpoint["state"]["cascade"].items():
        torch.testing.assert_close(value, a[f"cascade.{key}"], rtol=0, atol=0)


def test_two_processes_equal_single_process_training_up_to_the_batch_split(
    two_process_runs, tmp_path
):
    from policycascade.harness import RunHarness

    single = RunHarness(_config(SPLIT_INVARIANT), tmp_path, 0.01, show_progress=False)
    agent = single.algorithm.agent
    start = {k: v.clone() for k, v in agent.state_dict().items()}
    single.run()
    two = torch.load(two_process_runs / "split-rank0.pt")["end"]
    moved = 0.0
    for key, value in agent.state_dict().items():
        torch.testing.assert_close(
            two[f"agent.{key}"], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
        moved = max(moved, float((value - start[key]).abs().max()))
    assert moved > 1e-3  # the stopping modules did train
