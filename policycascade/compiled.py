"""An optional ``torch.compile`` of a hot function or module, eager wherever compiling fails.

``maybe_compile(fn, enabled, what)`` returns a callable to use instead of ``fn``. Keep
the original module for ``state_dict`` and checkpoints (a compiled module's keys carry an
``_orig_mod.`` prefix); call through the returned callable only. ``torch.compile`` traces
and compiles on the first call (and again for new shapes), so a failure can come then:
the callable prints one line on stderr and runs ``fn`` eagerly from then on. Random draws
from a ``torch.Generator`` stay outside the compiled graphs (dynamo breaks the graph
there), so a compiled step samples the same numbers as the eager one; its floating-point
results agree to rounding, not bit for bit (fused kernels round differently).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

COMPILE_SETTINGS = ("auto", "on", "off")  # what a config's ``compile`` option may say


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this could not be compiled", not "the code is wrong"."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)  # unsupported code, backend failures (inductor)
    except ImportError:
        pass
    try:
        from torch._inductor import exc as inductor_exc

        errors += [inductor_exc.CppCompileError, inductor_exc.InvalidCxxCompiler]
        errors.append(inductor_exc.OperatorIssue)
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def resolve_enabled(
    enabled: bool | Literal["auto", "on", "off"], device: torch.device | str | None = None
) -> bool:
    """Whether to compile: ``True``/``"on"``, ``False``/``"off"``, or ``"auto"``: on CUDA only.

    On the CPU compiling takes tens of seconds (about 26 s for a one-line function on the
    2-core development machine, first call) and the digits cascade's kernels are too small
    for fusion to repay it within a short run, so ``"auto"`` leaves the CPU eager.
    """
    if enabled in (True, "on"):
        return True
    if enabled in (False, "off"):
        return False
    if enabled != "auto":
        raise ValueError(
            f"compile must be one of {list(COMPILE_SETTINGS)} or a bool, got {enabled!r}"
        )
    return device is not None and torch.device(device).type == "cuda"


def maybe_compile(
    fn: Callable[..., Any],
    enabled: bool | Literal["auto", "on", "off"],
    what: str,
    *,
    device: torch.device | str | None = None,
    **options: Any,
) -> Callable[..., Any]:
    """``fn`` (a function or module) through ``torch.compile`` if ``enabled``, else ``fn``.

    ``what`` names it in the notice printed when compiling fails; ``device`` decides
    ``"auto"``; ``options`` go to ``torch.compile`` (``mode="reduce-overhead"`` adds CUDA
    graphs on CUDA). Any failure to compile, at wrapping or at a call, prints one line on
    stderr and falls back to eager for good; errors of ``fn`` itself propagate. A call
    that fails after a graph before the break already ran is rerun eagerly, so that one
    call's side effects (random draws, batch-norm statistics) happen twice.
    """
    if not resolve_enabled(enabled, device):
        return fn
    try:
        compiled = torch.compile(fn, **options)
    except Exception as error:  # no dynamo on this Python, no backend: eager
        _notice(what, error)
        return fn
    return _FallBackToEager(fn, compiled, what)


class _FallBackToEager:
    """Calls the compiled function until compiling fails once, then the eager one."""

    def __init__(self, eager: Callable[..., Any], compiled: Callable[..., Any], what: str):
        self.eager, self.compiled, self.what = eager, compiled, what
        self.failed = False
        self.compile_s: float | None = None  # seconds of the first call (mostly compiling)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.eager(*args, **kwargs)
        start = time.perf_counter()
        try:
            result = self.compiled(*args, **kwargs)
        except _compile_errors() as error:
            self.failed = True
            _notice(self.what, error)
            return self.eager(*args, **kwargs)
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - start
        return result


def _notice(what: str, error: BaseException) -> None:
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    print(
        f"torch.compile of {what} unavailable ({type(error).__name__}: {first_line}); "
        "running it eagerly",
        file=sys.stderr,
    )
