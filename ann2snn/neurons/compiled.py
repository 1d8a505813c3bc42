"""Fused neuron steps through ``torch.compile``: a neuron type's one functional step
(``asn_step``, ``vsn_step``, ``if_step``) compiled by Inductor, which fuses its chain of
elementwise operations (a dozen passes over the layer's state for ASN) into one loop: C++ with
OpenMP on the CPU, a Triton kernel on CUDA. The equations stay in one place: what runs is the
same function, compiled. Its float parameters travel as 0-dim tensors, so that one compiled
graph serves every parameter value (the operating-point candidates, arousal's switches) and,
with dynamic shapes, every layer.

Off by default (``enable``; the CLI's ``--compile``): compiling costs seconds per process and
neuron type, which a short run does not earn back (``scripts/bench_simulation.py`` measures
both). Where compiling fails (no C++ compiler, an unsupported platform) the step runs as it is,
and ``status()`` says why; the layers' backend reads "compiled" only where it compiled.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

_STATE = {"enabled": False, "failed": None}


def enable(on: bool = True) -> None:
    """Compile the neuron steps of layers built from now on (``SpikingLayer.backend``)."""
    _STATE["enabled"] = bool(on)


def enabled() -> bool:
    return _STATE["enabled"] and _STATE["failed"] is None


def status() -> str | None:
    """Why compiling was given up (None while it works or is off)."""
    return _STATE["failed"]


def backend() -> str:
    """The backend of a layer built now whose step has no kernel of its own."""
    return "compiled" if enabled() else "reference"


@functools.cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


@functools.lru_cache(maxsize=256)
def _as_tensors(p: NamedTuple, dtype: torch.dtype, device: torch.device) -> NamedTuple:
    return p._replace(**{f: torch.tensor(v, dtype=dtype, device=device)
                         for f, v in zip(p._fields, p) if isinstance(v, float)})


def run(layer_backend: str, fn: Callable, current: torch.Tensor, state, p: NamedTuple):
    """``fn(current, state, p)``, a neuron's functional step: compiled where the layer's backend
    is "compiled" (``p``'s floats as tensors); on a compiler failure, once, ``fn`` itself from
    then on for every layer, the reason kept for ``status``."""
    if layer_backend == "compiled" and _STATE["failed"] is None:
        try:
            return _compiled(fn)(current, state, _as_tensors(p, current.dtype, current.device))
        except torch.OutOfMemoryError:  # not the compiler's: the simulation retries the batch in halves
            raise
        except Exception as exc:  # the compiler's own failure (toolchain, platform): run the step as it is
            _STATE["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return fn(current, state, p)
