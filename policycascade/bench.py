"""``python -m policycascade.bench [--json] [--quick]``: what a cascade saves, in seconds.

One run measures four things on this machine and prints a table (``--json``
prints a JSON object on stdout instead and sends the table to stderr):

1. early-exit inference against the most expensive classifier alone, wall clock
   next to the speed-up the MACs predict, for the digits cascade and the CIFAR
   ResNet-8/20/56/110 cascade (random weights, random inputs, max-softmax
   thresholds set so that about 50/25/15/10% of the inputs exit at stages 0-3);
2. environment steps per second of ``CascadeStoppingVectorEnv`` against
   gymnasium's ``SyncVectorEnv`` over single ``CascadeStoppingEnv`` copies;
3. one joint REINFORCE training step against one cross-entropy step;
4. wall time and peak memory of the default training job (not with ``--quick``);
5. the default job's classifier training (the continuation learner's unit) alone and next
   to a CPU-bound neighbour process, with torch's default threads and with the count
   :mod:`policycascade.runtime` chooses, and the slow-down ratios (not with ``--quick``;
   ``--contention`` runs this case only);

and, where CUDA is present, samples per second of the ResNet cascade's training steps
on the GPU. ``--threads N`` sets torch's CPU threads (1 is steadier on a shared machine).

Timings are medians of repeated runs after a warm-up, with the two contenders
timed alternately so that a busy machine slows both alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from gymnasium.vector import SyncVectorEnv

from policycascade.agents.reinforce_training import STEP_SCALARS, step_scalars
from policycascade.agents.thresholds import ThresholdRule, confidence
from policycascade.cascade import Cascade
from policycascade.cli_support import OneLineParser
from policycascade.config import TrainConfig
from policycascade.data import DataSplits, Split
from policycascade.envs import CascadeStoppingEnv, CascadeStoppingVectorEnv
from policycascade.harness import RunHarness
from policycascade.inference import early_exit_predict
from policycascade.models import build_cascade
from policycascade.models.resnet import cifar_resnet

EXIT_SHARES = (0.50, 0.25, 0.15, 0.10)  # target share of inputs exiting at each stage
RESNET_DEPTHS = (8, 20, 56, 110)
CIFAR_SHAPE = (3, 32, 32)
DIGITS_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does: the full run, ``--quick``, or the tests' ``--tiny``."""

    digits_pool: int  # random inputs the digits thresholds are calibrated on
    digits_batches: dict[int, int]  # batch size -> inputs timed per repetition
    resnet_pool: int
    resnet_batches: dict[int, int]
    reps: int  # timed repetitions of the digits and env measurements (median)
    resnet_reps: int
    num_envs: int
    vector_steps: int  # vector steps per repetition, batched env
    sync_steps: int  # vector steps per repetition, SyncVectorEnv
    train_reps: int  # timed steps of each training step kind on digits
    resnet_train_batch: int | None  # None: leave out the ResNet training step on CPU
    cuda_train_batch: int
    train_job: bool
    contention: bool = False  # (5): the training step alone and next to a busy neighbour
    note: str = field(default="")


PLANS = {
    "full": Plan(
        digits_pool=1024,
        digits_batches={1: 256, 64: 1024, 1024: 1024},
        resnet_pool=1024,
        resnet_batches={1: 32, 64: 256, 1024: 1024},
        reps=5,
        resnet_reps=3,
        num_envs=1024,
        vector_steps=200,
        sync_steps=20,
        train_reps=20,
        resnet_train_batch=128,
        cuda_train_batch=128,
        train_job=True,
        contention=True,
    ),
    "quick": Plan(
        digits_pool=1024,
        digits_batches={1: 128, 64: 512, 1024: 1024},
        resnet_pool=128,
        resnet_batches={1: 16, 64: 128},
        reps=3,
        resnet_reps=3,
        num_envs=1024,
        vector_steps=100,
        sync_steps=10,
        train_reps=10,
        resnet_train_batch=None,
        cuda_train_batch=128,
        train_job=False,
        note="--quick: ResNet early exit at batch 1 and 64 only, no ResNet training step on CPU, "
        "no training job",
    ),
    "tiny": Plan(
        digits_pool=64,
        digits_batches={1: 8, 16: 64},
        resnet_pool=4,
        resnet_batches={1: 1, 2: 2},
        reps=1,
        resnet_reps=1,
        num_envs=64,
        vector_steps=5,
        sync_steps=2,
        train_reps=2,
        resnet_train_batch=None,
        cuda_train_batch=8,
        train_job=False,
        note="--tiny: smoke-test sizes, the numbers mean nothing",
    ),
}


# -- timing -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(
    first: Callable[[], Any],
    second: Callable[[], Any],
    reps: int,
    device: torch.device = CPU,
    warmup: bool = True,
) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately ``reps`` times, warmed up."""
    if warmup:
        first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(reps):
        order = (0, 1) if rep % 2 == 0 else (1, 0)  # neither always runs right after the other
        for which in order:
            _sync(device)
            start = time.perf_counter()
            (first, second)[which]()
            _sync(device)
            times[which].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


# -- the machine ------------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """CPU model, cores and how busy they already are, torch version and threads, the GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cores,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": str(torch.__version__),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda_device": cuda,
        "bench_device": "cpu",
    }


# -- (1) early exit ---------------------------------------------------------------------------


def digits_cascade() -> Cascade:
    """The digits cascade with random weights."""
    return build_cascade("digits", DIGITS_SHAPE, NUM_CLASSES)


def resnet_cascade() -> Cascade:
    """CIFAR ResNet-8/20/56/110 with random weights, cheapest first."""
    return Cascade(
        [cifar_resnet(depth, NUM_CLASSES) for depth in RESNET_DEPTHS],
        CIFAR_SHAPE,
        NUM_CLASSES,
        [f"resnet{depth}" for depth in RESNET_DEPTHS],
    )


def settle_batch_norm(cascade: Cascade, x: torch.Tensor) -> None:
    """Give every batch norm the statistics of ``x`` with one forward pass in train mode.

    Freshly initialised batch norms hold mean 0 and variance 1, so in eval mode a
    deep random ResNet never normalises: its logits reach 1e6 and every softmax is
    exactly 1, which leaves no confidence to set thresholds on. A trained network's
    statistics come from data; one pass over random inputs stands in for that.
    """
    norms = [m for m in cascade.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the pass
    cascade.train()
    with torch.no_grad():
        cascade(x)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    cascade.eval()


def calibrate_thresholds(
    cascade: Cascade, x: torch.Tensor, exit_shares: Sequence[float] = EXIT_SHARES
) -> ThresholdRule:
    """Max-softmax thresholds under which about ``exit_shares[t]`` of ``x`` exit at stage t.

    Stage t's threshold is the quantile of its confidence over the inputs still
    running that stops the wanted share of them; each stage only runs on those
    inputs, so calibrating costs no more than one early-exit pass.
    """
    cascade.eval()
    thresholds, remaining = [], 1.0
    with torch.inference_mode():
        for t, clf in enumerate(list(cascade.classifiers)[:-1]):
            conf = confidence(clf(x).softmax(-1), "max-softmax").double()
            stop_fraction = min(1.0, exit_shares[t] / remaining)
            threshold = float(torch.quantile(conf, 1.0 - stop_fraction)) if len(conf) else 1.0
            thresholds.append(threshold)
            x, remaining = x[conf < threshold], remaining - exit_shares[t]
    return ThresholdRule("max-softmax", thresholds)


def bench_early_exit(cascade: Cascade, pool: int, batches: dict[int, int], reps: int) -> dict:
    """Per-input seconds of early exit and of the most expensive classifier, at each batch size.

    The inputs are ``pool`` random samples; batch norms are settled on the first 64 and
    the thresholds calibrated on all of them. ``batches`` maps each batch size to how
    many of the inputs one timed repetition goes through.
    """
    x = torch.randn(pool, *cascade.input_shape)
    settle_batch_norm(cascade, x[:64])
    rule = calibrate_thresholds(cascade, x)
    costs = cascade.costs(rule.policy_macs())
    reference = cascade.classifiers[costs.classifier_macs.index(costs.reference_macs)].eval()
    rows = []
    for batch_size, samples in batches.items():
        chunks = x[:samples].split(batch_size)

        last: dict[str, list] = {}

        def early_exit(chunks=chunks, last=last):
            last["results"] = [early_exit_predict(cascade, rule, c, costs) for c in chunks]

        def reference_alone(chunks=chunks):
            with torch.inference_mode():
                return [reference(chunk) for chunk in chunks]

        early_exit(chunks[:1]), reference_alone(chunks[:1])  # warm-up on one batch
        ee_s, ref_s = time_side_by_side(early_exit, reference_alone, reps, warmup=False)
        exit_stage = torch.cat([r.exit_stage for r in last["results"]])
        macs = torch.cat([r.macs for r in last["results"]]).double()
        share = torch.bincount(exit_stage, minlength=cascade.num_stages) / len(exit_stage)
        rows.append(
            {
                "batch_size": batch_size,
                "samples": len(exit_stage),
                "early_exit_s_per_sample": ee_s / len(exit_stage),
                "reference_s_per_sample": ref_s / len(exit_stage),
                "speedup": ref_s / ee_s,
                "macs_speedup": costs.reference_macs / float(macs.mean()),
                "exit_share": share.tolist(),
            }
        )
    return {
        "stage_names": list(cascade.names),
        "classifier_macs": costs.classifier_macs,
        "thresholds": rule.thresholds,
        "rows": rows,
    }


# -- (2) vector env ---------------------------------------------------------------------------


def bench_vector_env(cascade: Cascade, plan: Plan) -> dict:
    """Env steps per second: the batched env against SyncVectorEnv, same outputs, random actions."""
    x = torch.randn(plan.digits_pool, *cascade.input_shape)
    y = torch.randint(NUM_CLASSES, (plan.digits_pool,))
    outputs = cascade.outputs(x, y, cascade.costs())
    n = plan.num_envs
    actions = np.random.default_rng(0).integers(
        0, 2, size=(max(plan.vector_steps, plan.sync_steps), n)
    )
    batched = CascadeStoppingVectorEnv(n, outputs, device="cpu")
    sync = SyncVectorEnv([functools.partial(CascadeStoppingEnv, outputs) for _ in range(n)])
    batched.reset(seed=0), sync.reset(seed=0)
    torch_actions = torch.from_numpy(actions)

    def run_batched():
        for t in range(plan.vector_steps):
            batched.step(torch_actions[t])

    def run_sync():
        for t in range(plan.sync_steps):
            sync.step(actions[t])

    batched_s, sync_s = time_side_by_side(run_batched, run_sync, plan.reps)
    sync.close()
    vector_rate = n * plan.vector_steps / batched_s
    sync_rate = n * plan.sync_steps / sync_s
    return {
        "num_envs": n,
        "vector_env_steps_per_s": vector_rate,
        "sync_vector_env_steps_per_s": sync_rate,
        "ratio": vector_rate / sync_rate,
    }


# -- (3) training steps -----------------------------------------------------------------------


def training_steps(
    cascade_name: str,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: torch.device,
    defer_checks: bool | None = None,
    policy_gradient: str | None = None,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The REINFORCE algorithm's own joint step and its own cross-entropy step, each on a batch.

    The run harness is built on random data of ``input_shape`` with the default
    configuration and ``policy_split="train"`` (one data stream, as in Guan et al.), so
    the joint step is every classifier's forward, the agent's loss plus the cross-entropy
    of all stages, one backward and both optimisers' steps. Each step does what the
    training epoch does per step: its NaN checks deferred, its logged scalars summed on
    the device (the epoch reads both once; here each step's checks are read as it ends).
    ``defer_checks`` is passed to ``check_finite_deferred`` (default: deferred off the CPU).
    ``policy_gradient`` overrides the default estimator (``exact``; ``score-function``: the
    paper's). Both steps carry the algorithm they drive as their ``algorithm`` attribute.
    """
    defaults = TrainConfig()
    gradient = policy_gradient or defaults.reinforce.policy_gradient
    config = dataclasses.replace(
        defaults,
        agent="reinforce",
        cascade=cascade_name,
        device=str(device),
        batch_size=batch_size,
        reinforce=dataclasses.replace(
            defaults.reinforce, policy_split="train", policy_gradient=gradient
        ),
    )
    n = max(4 * batch_size, 64)
    split = Split(torch.randn(n, *input_shape), torch.randint(NUM_CLASSES, (n,)))
    data = DataSplits("random", split, split, split, NUM_CLASSES)
    with tempfile.TemporaryDirectory() as run_dir:
        harness = RunHarness(config, run_dir, 1e-3, show_progress=False, data=data)
    algorithm = harness.algorithm
    generator = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:
        return torch.randperm(n, generator=generator)[:batch_size].to(device)

    sums = torch.zeros(len(STEP_SCALARS), dtype=torch.float64, device=device)

    def reinforce_step() -> None:
        idx = batch()
        with harness.check_finite_deferred(defer_checks):
            step, supervised = algorithm.joint_step(idx, idx)
            sums.add_(step_scalars(step, supervised) * len(idx))

    def cross_entropy_step() -> None:
        idx = batch()
        with harness.check_finite_deferred(defer_checks):
            sums[0].add_(algorithm.pretrain_step(idx).detach().double() * len(idx))

    reinforce_step.algorithm = cross_entropy_step.algorithm = algorithm
    return reinforce_step, cross_entropy_step


def bench_training_step(
    cascade_name: str,
    input_shape: tuple[int, ...],
    batch_size: int,
    reps: int,
    device: torch.device = CPU,
    policy_gradient: str | None = None,
) -> dict:
    """Median seconds of one joint REINFORCE step and one cross-entropy step, side by side."""
    reinforce_step, cross_entropy_step = training_steps(
        cascade_name, input_shape, batch_size, device, policy_gradient=policy_gradient
    )
    reinforce_step(), cross_entropy_step()  # warm-up: optimiser state, kernels
    reinforce_s, cross_entropy_s = time_side_by_side(
        reinforce_step, cross_entropy_step, reps, device, False
    )
    return {
        "cascade": cascade_name,
        "batch_size": batch_size,
        "device": str(device),
        "reinforce_step_s": reinforce_s,
        "cross_entropy_step_s": cross_entropy_s,
        "ratio": reinforce_s / cross_entropy_s,
        "reinforce_samples_per_s": batch_size / reinforce_s,
        "cross_entropy_samples_per_s": batch_size / cross_entropy_s,
    }


# -- (4) the training job ---------------------------------------------------------------------


def bench_train_job(threads: int | None = None, alphas: Sequence[str] = ("1e-3",)) -> dict:
    """Wall time and peak resident memory of ``python -m policycascade.train --alpha 1e-3``.

    ``threads`` (``OMP_NUM_THREADS`` of the job) defaults to torch's own choice; ``alphas``
    are the job's alphas (several: one run each, classifiers trained once).
    """
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as logdir:
        command = [sys.executable, "-c", _PEAK_REPORTING_LAUNCHER, "--alpha", *alphas]
        command += ["--no-progress", "--logdir", logdir]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed with status {done.returncode}:\n{done.stderr[-2000:]}"
        )
    # The job's own high-water mark (VmHWM of its address space after exec). getrusage's
    # RUSAGE_CHILDREN would also count the pages the child shared with this process right
    # after fork: measured here, 2,984 MiB against 0.96 GB from /usr/bin/time.
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK_KIB ")]
    if peaks:
        max_rss_kib = int(peaks[-1])
    else:  # no /proc: fall back to the (over-counting) rusage figure
        max_rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    command_text = "python -m policycascade.train " + " ".join(command[3:])
    return {"command": command_text, "wall_s": wall_s, "max_rss_mib": max_rss_kib / 1024}


SIX_ALPHAS = ("1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "3e-1")


def bench_alpha_sharing(reps: int = 2, threads: int | None = 1) -> dict[str, Any]:
    """The main job with one alpha and with six, alternating rep by rep; the wall-time ratio."""
    one, six = [], []
    for _ in range(reps):
        one.append(bench_train_job(threads, ("1e-3",))["wall_s"])
        six.append(bench_train_job(threads, SIX_ALPHAS)["wall_s"])
    one_s, six_s = statistics.median(one), statistics.median(six)
    return {
        "one_alpha_s": one,
        "six_alphas_s": six,
        "alphas": list(SIX_ALPHAS),
        "ratio_six_to_one": six_s / one_s,
    }


# Runs ``python -m policycascade.train ARGS`` and, on exit, prints its peak resident memory.
_PEAK_REPORTING_LAUNCHER = """
import atexit, runpy, sys
def _report_peak():
    try:
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmHWM:'):
                    sys.stderr.write('PEAK_KIB ' + line.split()[1] + '\\n')
    except OSError:
        pass
atexit.register(_report_peak)
sys.argv = ['policycascade.train'] + sys.argv[1:]
runpy.run_module('policycascade.train', run_name='__main__')
"""


# -- (5) a busy neighbour ---------------------------------------------------------------------

# A CPU-bound neighbour: one core's worth of pure-Python work until it is killed.
NEIGHBOUR_CODE = "while True:\n    pass\n"


def start_neighbours(count: int) -> list[subprocess.Popen]:
    """``count`` CPU-bound processes, each spinning on one core until stopped."""
    procs = [
        subprocess.Popen([sys.executable, "-c", NEIGHBOUR_CODE], stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]
    time.sleep(0.3)  # let them start spinning before anything is timed
    return procs


def stop_neighbours(procs: list[subprocess.Popen]) -> None:
    """Kill the neighbours started by :func:`start_neighbours` and reap them."""
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def digits_training_unit(epochs: int) -> Callable[[], None]:
    """The default job's classifier training on digits (``train_reference``), ``epochs`` long.

    Each call trains a fresh copy of the digits cascade from the same initial weights,
    with per-epoch validation and best-epoch keeping, as the continuation learner's first
    unit does.
    """
    from policycascade.crossfit import train_reference
    from policycascade.data import load_dataset

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    initial = digits_cascade()
    state = {k: v.clone() for k, v in initial.state_dict().items()}
    defaults = TrainConfig()

    def unit() -> None:
        cascade = digits_cascade()
        cascade.load_state_dict(state)
        train_reference(
            cascade, data.train, data.val, epochs, defaults.lr, defaults.batch_size,
            defaults.weight_decay, 0,
        )  # fmt: skip

    return unit


def bench_contention(
    unit: Callable[[], None],
    reps: int,
    neighbours: int = 1,
    thread_counts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Median seconds of ``unit`` alone and next to ``neighbours`` busy processes, per setting.

    ``thread_counts`` maps a label to torch's intra-op thread count (default: torch's own
    default, the cores, and the count :func:`~policycascade.runtime.choose_threads` picks
    for the digits job). Alone and busy runs alternate rep by rep, so drift in the
    machine's other load hits both alike. The process's thread count is restored after.
    """
    from policycascade.runtime import available_cores

    if thread_counts is None:
        thread_counts = {"torch default": available_cores(), "chosen": 1}
    previous = torch.get_num_threads()
    rows = []
    try:
        for label, threads in thread_counts.items():
            torch.set_num_threads(threads)
            unit()  # warm-up at this thread count
            alone, busy = [], []
            for _ in range(reps):
                start = time.perf_counter()
                unit()
                alone.append(time.perf_counter() - start)
                procs = start_neighbours(neighbours)
                try:
                    start = time.perf_counter()
                    unit()
                    busy.append(time.perf_counter() - start)
                finally:
                    stop_neighbours(procs)
            alone_s, busy_s = statistics.median(alone), statistics.median(busy)
            rows.append(
                {
                    "setting": label,
                    "threads": threads,
                    "alone_s": alone_s,
                    "with_neighbours_s": busy_s,
                    "ratio": busy_s / alone_s,
                    "alone_all_s": alone,
                    "with_neighbours_all_s": busy,
                }
            )
    finally:
        torch.set_num_threads(previous)
    return {"neighbours": neighbours, "reps": reps, "rows": rows}


def _contention(epochs: int = 3, reps: int = 3) -> dict[str, Any]:
    report = bench_contention(digits_training_unit(epochs), reps)
    report["unit"] = f"digits classifier training, {epochs} epochs (train_reference)"
    return report


# -- the run ----------------------------------------------------------------------------------


def run(plan: Plan, threads: int | None = None) -> dict[str, Any]:
    """Every measurement of ``plan``, as a JSON-ready dict (``section_s``: seconds each took).

    ``threads`` sets torch's CPU threads for the run and the training job (default: torch's
    choice); the process's setting is restored afterwards.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(plan, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _run(plan: Plan, threads: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    started = time.perf_counter()
    section_s: dict[str, float] = {}

    def section(name: str, measure: Callable[[], dict]) -> dict:
        start = time.perf_counter()
        result = measure()
        section_s[name] = time.perf_counter() - start
        return result

    resnet = resnet_cascade()
    skipped = {"skipped": plan.note}
    report: dict[str, Any] = {"machine": describe_machine(), "plan": asdict(plan)}
    report["early_exit"] = {
        "digits": section(
            "early_exit/digits",
            lambda: bench_early_exit(
                digits_cascade(), plan.digits_pool, plan.digits_batches, plan.reps
            ),
        ),
        "resnet": section(
            "early_exit/resnet",
            lambda: bench_early_exit(
                resnet, plan.resnet_pool, plan.resnet_batches, plan.resnet_reps
            ),
        ),
    }
    report["vector_env"] = section("vector_env", lambda: bench_vector_env(digits_cascade(), plan))
    report["training_step"] = {
        "digits": section(
            "training_step/digits",
            lambda: bench_training_step("digits", DIGITS_SHAPE, 64, plan.train_reps),
        ),
        "digits-sf": section(  # the paper's score-function estimator (the default is exact)
            "training_step/digits-sf",
            lambda: bench_training_step(
                "digits", DIGITS_SHAPE, 64, plan.train_reps, policy_gradient="score-function"
            ),
        ),
        "resnet": skipped
        if plan.resnet_train_batch is None
        else section(
            "training_step/resnet",
            lambda: bench_training_step(
                "cifar-resnet", CIFAR_SHAPE, plan.resnet_train_batch, plan.resnet_reps
            ),
        ),
    }
    report["cuda"] = None
    if torch.cuda.is_available():
        report["cuda"] = section(
            "cuda",
            lambda: bench_training_step(
                "cifar-resnet", CIFAR_SHAPE, plan.cuda_train_batch, plan.reps, torch.device("cuda")
            ),
        )
    report["train_job"] = (
        section("train_job", lambda: bench_train_job(threads)) if plan.train_job else skipped
    )
    report["contention"] = section("contention", _contention) if plan.contention else skipped
    report["section_s"] = section_s
    report["bench_wall_s"] = time.perf_counter() - started
    return report


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned text tables."""
    lines = _format_machine(report)
    lines += ["", *_format_early_exit(report["early_exit"])]
    v = report["vector_env"]
    lines += [
        "",
        f"(2) env steps per second, {v['num_envs']} envs, uniform random actions",
        f"CascadeStoppingVectorEnv {v['vector_env_steps_per_s']:>12,.0f}/s   "
        f"SyncVectorEnv {v['sync_vector_env_steps_per_s']:>10,.0f}/s   ratio {v['ratio']:.0f}x",
        "",
        *_format_training_steps(report),
    ]
    job = report["train_job"]
    lines += ["", "(4) training job"]
    if "skipped" in job:
        lines.append(f"skipped: {job['skipped']}")
    else:
        lines.append(
            f"{job['command']}: {job['wall_s']:.1f} s, peak RSS {job['max_rss_mib']:,.0f} MiB"
        )
    lines += ["", *format_contention(report.get("contention"))]
    sections = ", ".join(f"{name} {s:.0f} s" for name, s in report["section_s"].items())
    lines += ["", f"bench wall time {report['bench_wall_s']:.1f} s ({sections})"]
    return "\n".join(lines)


def _format_machine(report: dict[str, Any]) -> list[str]:
    """The machine line, a warning when it was already busy, and the plan's note."""
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), benchmarks on cpu"
        + (f", GPU {m['cuda_device']}" if m["cuda_device"] else ""),
    ]
    load = m["load_average_1min"]
    if load is not None and load >= 1.0:
        lines.append(
            f"warning: load average {load:.1f} before the run; other processes share these "
            "cores, so timings are noisy (--threads 1 suffers least)"
        )
    if report["plan"]["note"]:
        lines.append(report["plan"]["note"])
    return lines


def _format_early_exit(early_exit: dict[str, Any]) -> list[str]:
    """Case (1) as lines of text."""
    lines = [
        "(1) early exit vs the most expensive classifier alone, per input "
        "(target exits 50/25/15/10%)",
        f"{'cascade':<8} {'batch':>5} {'inputs':>6}  {'exits 0/1/2/3 (%)':<18} "
        f"{'early exit':>11} {'reference':>11} {'speed-up':>8} {'by MACs':>8}",
    ]
    for name, result in early_exit.items():
        for row in result["rows"]:
            exits = "/".join(f"{100 * s:.0f}" for s in row["exit_share"])
            lines.append(
                f"{name:<8} {row['batch_size']:>5} {row['samples']:>6}  {exits:<18} "
                f"{_us(row['early_exit_s_per_sample']):>11} "
                f"{_us(row['reference_s_per_sample']):>11} "
                f"{row['speedup']:>7.2f}x {row['macs_speedup']:>7.2f}x"
            )
    return lines


def _format_training_steps(report: dict[str, Any]) -> list[str]:
    """Case (3), with the CUDA training step where there is one, as lines of text."""
    lines = [
        "(3) one training step: joint REINFORCE (policy_split=train; exact gradient, digits-sf: "
        "score-function) vs cross-entropy only"
    ]
    steps = dict(report["training_step"])
    if report["cuda"] is not None:
        steps["resnet-cuda"] = report["cuda"]
    for name, s in steps.items():
        if "skipped" in s:
            lines.append(f"{name:<12} skipped: {s['skipped']}")
            continue
        lines.append(
            f"{name:<12} batch {s['batch_size']:>4}  REINFORCE {_us(s['reinforce_step_s']):>10}  "
            f"cross-entropy {_us(s['cross_entropy_step_s']):>10}  ratio {s['ratio']:.2f}  "
            f"({s['reinforce_samples_per_s']:,.0f} samples/s)"
        )
    return lines


def format_contention(result: dict[str, Any] | None) -> list[str]:
    """Case (5) as lines of text."""
    if result is None:
        return []
    lines = ["(5) the training step alone and next to a CPU-bound neighbour process"]
    if "skipped" in result:
        return [*lines, f"skipped: {result['skipped']}"]
    lines[0] += f" ({result['neighbours']} neighbour(s), median of {result['reps']})"
    lines.append(result.get("unit", ""))
    for row in result["rows"]:
        lines.append(
            f"{row['setting']:<14} {row['threads']:>2} thread(s)  alone {row['alone_s']:6.2f} s  "
            f"with neighbour {row['with_neighbours_s']:6.2f} s  ratio {row['ratio']:.2f}x"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print it; returns the exit status."""
    parser = OneLineParser(
        prog="policycascade bench",
        description="Measure early-exit speed-ups, vector-env throughput, training-step cost "
        "and the training job's time and memory on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    parser.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads, also for the training job (default: torch's choice; 1 is steadier "
        "on a busy machine)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="smoke-test sizes in seconds (the numbers mean nothing)"
    )
    parser.add_argument(
        "--contention",
        action="store_true",
        help="run only case (5): the training step alone and next to a busy neighbour",
    )
    parser.add_argument(
        "--alphas",
        action="store_true",
        help="run only the alpha-sharing case: the main job with one alpha and with six "
        f"({', '.join(SIX_ALPHAS)}), alternating, and their wall-time ratio",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.alphas:
        result = bench_alpha_sharing(threads=args.threads or 1)
        table = (
            f"main job, one alpha: {statistics.median(result['one_alpha_s']):.1f} s; six "
            f"alphas: {statistics.median(result['six_alphas_s']):.1f} s; ratio "
            f"{result['ratio_six_to_one']:.2f}x (median of {len(result['one_alpha_s'])})"
        )
        print_report(result, table, args.json)
        return 0
    if args.contention:
        result = {"machine": describe_machine(), "contention": _contention()}
        table = "\n".join(format_contention(result["contention"]))
        print_report(result, table, args.json)
        return 0
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    report = run(plan, args.threads)
    print_report(report, format_table(report), args.json)
    return 0


def print_report(report: dict[str, Any], table: str, as_json: bool) -> None:
    """The table on stdout, or with ``as_json`` the JSON on stdout and the table on stderr."""
    if as_json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)


if __name__ == "__main__":
    sys.exit(main())
