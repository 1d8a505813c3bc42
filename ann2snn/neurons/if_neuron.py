"""Integrate-and-fire neuron with reset by subtraction: the rate-coding baseline.

Rueckauer et al. 2017 (Front. Neurosci. 11:682), as in SpikingJelly's ``ann2snn``, sinabs and
SNN Toolbox. One step, for input current I[t]:

    v[t] = v[t-1] + I[t]
    s[t] = H(v[t] - theta)              (binary spike)
    v[t] = v[t] - theta * s[t]          (reset by subtraction)

with v[0] = v_init * theta. The layer emits ``theta * s[t]`` (spike height theta; on hardware
the height is folded into the next layer's weights). Its rate transfer function, the mean
output as T -> inf, is ``clamp(I, 0, theta)``; theta is the layer's 99.9th-percentile ANN
activation (docs/science.md section 3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..kernels import if_scan
from ..readout import Readout
from .neuron import PERCENTILE, POSITIVE, Bound, Neuron, StepOps

if TYPE_CHECKING:
    from ..calibration import LayerStats


class IFParams(NamedTuple):
    threshold: torch.Tensor  # scalar or broadcastable per channel
    v_init: float = 0.5  # initial membrane, as a fraction of the threshold


class IFState(NamedTuple):
    v: torch.Tensor


def if_init(current: torch.Tensor, p: IFParams) -> IFState:
    return IFState(v=torch.ones_like(current) * (p.v_init * p.threshold))


def if_step(current: torch.Tensor, state: IFState, p: IFParams) -> tuple[torch.Tensor, IFState]:
    """Advance one time step; returns binary spikes and the new state."""
    v = state.v + current
    spikes = (v >= p.threshold).to(current.dtype)
    return spikes, IFState(v=v - spikes * p.threshold)


def if_transfer(current: torch.Tensor, p: IFParams) -> torch.Tensor:
    """Mean output ``theta * rate`` for a constant current, as T -> inf."""
    return torch.minimum(current.clamp(min=0), p.threshold)


class IFNeuron(nn.Module):
    """Stateful wrapper of ``if_step``: keeps the state between calls and the last spikes."""

    def __init__(self, threshold: float, v_init: float = 0.5):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.v_init = float(v_init)
        self.state: IFState | None = None
        self.spikes: torch.Tensor | None = None

    @property
    def params(self) -> IFParams:
        return IFParams(self.threshold, self.v_init)

    def reset(self) -> None:
        self.state, self.spikes = None, None

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.state is None:
            self.state = if_init(current, p)
        self.spikes, self.state = if_step(current, self.state, p)
        return self.spikes * p.threshold

    def scan(self, current: torch.Tensor, steps: int, batch: int, fan: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` calls of ``forward`` at once (``kernels.if_scan``): outputs as steps x batch
        time-major rows, and per-step [spikes, synaptic operations] counts."""
        p = self.params
        if self.state is None:
            self.state = if_init(current[:batch], p)
        v = self.state.v.contiguous()  # the layer's own membrane: advanced in place
        out, counts = if_scan(current, steps, batch, v, float(p.threshold), fan)
        self.state, self.spikes = IFState(v), None
        return out, counts


DEFAULTS = {"percentile": 99.9, "v_init": 0.5}


def fit(stats: "LayerStats", options: dict) -> dict:
    """Per-layer parameters from calibration statistics: theta = the chosen percentile
    (the maximum if the percentile is 0; 1.0 for a layer that never activates)."""
    threshold = stats.percentile if stats.percentile > 0 else stats.max
    return {"threshold": float(threshold) if threshold > 0 else 1.0, "v_init": float(options["v_init"])}


def build(params: dict) -> IFNeuron:
    return IFNeuron(params["threshold"], params.get("v_init", DEFAULTS["v_init"]))


def readout(options: dict) -> Readout:
    """The accumulated output: the rate code's estimate of the ANN output."""
    return Readout(tau=None, start=int(options.get("start_ms", 0)))


NEURON = Neuron(name="if", defaults=DEFAULTS, fit=fit, build=build, readout=readout,
                bounds={"percentile": PERCENTILE, "v_init": Bound(-1, 1), "threshold": POSITIVE},
                param_options=("v_init",), default_timesteps=64,
                step_ops=StepOps(mac_per_step=0, add_per_step=2, add_per_spike=1))  # v += I; v >= theta; v -= theta
