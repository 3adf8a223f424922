"""``python -m policycascade.bench_gpu``: the joint REINFORCE step on a GPU, eager vs compiled.

One short run (a few minutes, most of it compiling) for a session that has a GPU. For
the digits cascade (batch 64) and the CIFAR ResNet-8/20/56/110 cascade (batch 128) it
times, each side by side with the cross-entropy step (ratio = joint / cross-entropy):

- ``eager-sync``: eager, NaN checks read as they are made (host syncs every step);
- ``eager``: eager, NaN checks deferred (read once per 10 steps here; the training
  epoch reads them every ``FINITE_CHECKS_EVERY`` steps);
- ``compiled``: classifiers and agent through ``maybe_compile`` (``torch.compile``);
- ``cuda-graphs``: the same with ``mode="reduce-overhead"`` (CUDA graphs).

Each line also gives the compiled variants' first-call (compile) seconds and the joint
loss of one fixed batch against eager's, which must agree to rounding. ``--device cpu
--no-compile --threads 1 --reps 2`` is the smoke test.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence

import torch

from policycascade.bench import CIFAR_SHAPE, DIGITS_SHAPE, time_side_by_side, training_steps
from policycascade.cli_support import OneLineParser
from policycascade.compiled import maybe_compile

CASES = {"digits": (DIGITS_SHAPE, 64), "cifar-resnet": (CIFAR_SHAPE, 128)}
VARIANTS = {  # name -> (defer NaN checks, torch.compile options or None)
    "eager-sync": (False, None),
    "eager": (True, None),
    "compiled": (True, {}),
    "cuda-graphs": (True, {"mode": "reduce-overhead"}),
}


def fixed_batch_loss(algorithm, idx: torch.Tensor) -> float:
    """The joint loss on ``idx`` without a step, from a fixed sample generator."""
    h = algorithm.harness
    state = h.sample_generator.get_state()
    h.sample_generator.manual_seed(123)
    x, y = h.split_on_device("train")
    with torch.no_grad():
        logits = h.classify(algorithm.train_cascade, h.inputs(x[idx], False))
        step = algorithm.agent(logits, y[idx], algorithm.cumulative_costs, h.sample_generator)
    h.sample_generator.set_state(state)
    return float(step.loss)


def bench_variant(cascade: str, variant: str, device: torch.device, reps: int) -> dict:
    """One variant of one cascade's joint step, timed against the cross-entropy step."""
    shape, batch_size = CASES[cascade]
    defer, options = VARIANTS[variant]
    reinforce_step, cross_entropy_step = training_steps(cascade, shape, batch_size, device, defer)
    algorithm = reinforce_step.algorithm
    idx = torch.arange(batch_size, device=device)
    eager_loss = fixed_batch_loss(algorithm, idx)
    compile_s = None
    if options is not None:
        what = f"{cascade} {variant}"
        classifiers, agent = algorithm.train_cascade, algorithm.agent
        algorithm.train_cascade = maybe_compile(classifiers, True, f"{what} classifiers", **options)
        agent.forward = maybe_compile(agent.forward, True, f"{what} agent", **options)
    start = time.perf_counter()
    loss = fixed_batch_loss(algorithm, idx)  # the same weights as eager_loss's
    if options is not None:
        reinforce_step(), reinforce_step()  # compiles with grad; the second call settles graphs
        compile_s = time.perf_counter() - start

    def checks():  # deferred: read once per 10 steps, as the steps' own blocks nest in this one
        return algorithm.harness.check_finite_deferred(True) if defer else contextlib.nullcontext()

    def joint():
        with checks():
            for _ in range(10):
                reinforce_step()

    def cross_entropy():
        with checks():
            for _ in range(10):
                cross_entropy_step()

    joint_s, ce_s = time_side_by_side(joint, cross_entropy, reps, device)
    return {
        "cascade": cascade,
        "variant": variant,
        "joint_step_ms": joint_s / 10 * 1e3,
        "cross_entropy_step_ms": ce_s / 10 * 1e3,
        "ratio": joint_s / ce_s,
        "compile_s": compile_s,
        "fixed_batch_loss": loss,
        "eager_fixed_batch_loss": eager_loss,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per (cascade, variant)."""
    parser = OneLineParser(prog="policycascade bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of 10 steps")
    parser.add_argument("--cascades", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--no-compile", action="store_true", help="eager variants only")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = [v for v in VARIANTS if not (args.no_compile and VARIANTS[v][1] is not None)]
    if device.type != "cuda":
        variants = [v for v in variants if v != "cuda-graphs"]
    print(f"torch {torch.__version__}, {device}", flush=True)
    for cascade in args.cascades:
        for variant in variants:
            r = bench_variant(cascade, variant, device, args.reps)
            compile_s = "" if r["compile_s"] is None else f"  compile {r['compile_s']:.0f} s"
            print(
                f"{cascade:<13} {variant:<12} joint {r['joint_step_ms']:7.2f} ms  "
                f"cross-entropy {r['cross_entropy_step_ms']:7.2f} ms  ratio {r['ratio']:.2f}  "
                f"loss {r['fixed_batch_loss']:.6f} (eager {r['eager_fixed_batch_loss']:.6f})"
                + compile_s,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
