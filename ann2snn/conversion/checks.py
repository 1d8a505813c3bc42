"""Checks of a run's inputs against the network before the long work: does the model take the
data, how many outputs does it have, will the per-step results fit in memory."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

import torch

from ann2snn.errors import OptionError


@contextlib.contextmanager
def fx_errors_unprinted() -> Iterator[None]:
    """torch.fx prints its own traceback to stderr when a graph module's forward raises; the
    error that follows says what matters, in one line."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def model_outputs(gm: torch.nn.Module, shape: tuple[int, ...], dataset: str) -> int:
    """Run one blank input through the network; returns its number of outputs."""
    try:
        with torch.no_grad(), fx_errors_unprinted():
            return gm(torch.zeros((1, *shape))).shape[-1]
    except Exception as exc:
        raise OptionError("dataset", f"{dataset}: the model does not accept inputs of shape {shape} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                          ) from None


def check_memory(timesteps: int, layers: int, runs: int) -> None:
    """Refuse a number of steps whose per-step curves would not fit in free memory."""
    per_step = 8 * 2 * (2 * layers + 1) + 700 * runs  # counters, and one curve row per run (report, CSV)
    need = timesteps * per_step
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free and need > free // 2:
        raise OptionError("timesteps", f"{timesteps}: the per-step results of {runs} run(s) would need about "
                                       f"{need / 2 ** 30:.1f} GiB, more than half the {free / 2 ** 30:.1f} GiB "
                                       "of free memory")
