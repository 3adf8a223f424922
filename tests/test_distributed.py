"""DistributedDataParallel on CPU: two gloo processes train one run together."""

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from policycascade.config import TrainConfig


def _worker(rank: int, store_path: str, run_dir: str, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        from torch.utils.tensorboard import SummaryWriter

        from policycascade.trainer import Trainer

        config = dataclasses.replace(TrainConfig(), pretrain_epochs=2, epochs=2, device="cpu")
        trainer = Trainer(config, 0.01, Path(run_dir), show_progress=False)
        writer = SummaryWriter(run_dir) if trainer.dist.is_main else None
        trainer.run(writer)
        if writer is not None:
            writer.close()
        params = {f"cascade.{k}": v for k, v in trainer.cascade.state_dict().items()}
        params.update({f"agent.{k}": v for k, v in trainer.agent.state_dict().items()})
        torch.save(params, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_keep_identical_parameters_and_write_one_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mp.spawn(
        _worker,
        args=(str(tmp_path / "store"), str(run_dir), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    # the classifiers did train (not merely stay at a shared initialisation)
    single = Path(run_dir)
    assert [p.name for p in single.glob("checkpoint.pt")] == ["checkpoint.pt"]
    assert len(list(single.glob("events.out.tfevents.*"))) == 1
    assert not list(single.glob(".checkpoint.pt.tmp-*"))
    checkpoint = torch.load(single / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 4
    for key, value in checkpoint["cascade"].items():
        torch.testing.assert_close(value, a[f"cascade.{key}"], rtol=0, atol=0)
