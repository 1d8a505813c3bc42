"""Time-to-first-spike (TTFS) neuron: one spike at most per neuron, its time carrying the value.
Exact mapping after Stanojevic et al. (Neural Networks 2023, arXiv 2212.12522; Nat. Commun.
2024, arXiv 2306.08744), discretised on the time grid as docs/science.md section 10 states.

Layer n owns a window of K steps, [s_n, s_n + K), opening when the windows of every layer
feeding it have closed (``graph.slot_schedule``, ``SpikingLayer.place``; s_n = 0 for a layer
the input alone feeds, K x its depth when every layer has the same K). A
unit whose membrane holds V when its window opens (V = W x + b of its inputs' decoded values,
settled because every source's window has closed) fires once, at the first offset k with

    V + (k + 1/2) theta / K >= theta          (a ramp of slope theta / K, half a step ahead)

so its level is j = K - k = clamp(floor(V K / theta + 1/2), 0, K) and it codes
x = theta j / K (``ttfs_transfer``: clip to [0, theta], round to the nearest of K levels). With
a ``floor`` f > 0 (a dead zone, for spike budgets below the share of positive activations) a
unit whose level is below j_min = max(1, ceil(f K)) stays silent: its ramp may fire only up to
offset K - j_min, and it codes 0. A
spike at s + k drives a constant synaptic current theta / K into each target from then to the end
of the window; the target's membrane integrates it, so the charge a source delivers by step t,
``theta / K x (steps since its spike, at most j)``, is what this layer emits: it rises to x and
stays (the spike response, shared by all its targets). Max pooling of those charges passes the
earliest spike, exactly; average pooling, batch norm and residual sums are linear. Events are
the spikes; each costs its fan-out in synaptic additions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import math

import torch

from ann2snn.neurons import if_neuron
from ann2snn.neurons.layer import SpikingLayer, TransferLayer, per_channel
from ann2snn.neurons.neuron import PERCENTILE, POSITIVE, Bound, Neuron, Precision, StepOps
from ann2snn.neurons.readout import Readout

if TYPE_CHECKING:
    from ann2snn.conversion.statistics import LayerStats


class TTFSParams(NamedTuple):
    threshold: torch.Tensor  # theta, scalar or broadcastable per channel
    levels: int  # K: steps of the window, levels of the code
    start: int  # s: the window's first step
    lowest: int = 1  # j_min: the lowest level that fires (offsets up to K - j_min)


class TTFSState(NamedTuple):
    t: int  # steps taken
    v: torch.Tensor | None  # the membrane when the window opened (None before)
    fired: torch.Tensor  # bool: the unit has spiked
    count: torch.Tensor  # steps of the window since its spike (integers as floats)


def ttfs_init(current: torch.Tensor) -> TTFSState:
    return TTFSState(0, None, torch.zeros_like(current, dtype=torch.bool), torch.zeros_like(current))


def lowest_level(floor: float, levels: int) -> int:
    """j_min = max(1, ceil(floor K)): the lowest level a unit with this dead zone sends."""
    return max(1, math.ceil(float(floor) * int(levels) - 1e-9))


def ramp_crosses(v: torch.Tensor, k, p: TTFSParams) -> torch.Tensor:
    """Whether the ramp from ``v`` reaches theta at window offset ``k`` (an int or a tensor)."""
    return v + (k + 0.5) * (p.threshold / p.levels) >= p.threshold


def ttfs_step(current: torch.Tensor, state: TTFSState, p: TTFSParams
              ) -> tuple[torch.Tensor, torch.Tensor, TTFSState]:
    """Advance one step; returns (spikes, the charge emitted, the new state)."""
    k = state.t - p.start
    if k < 0:  # the inputs are still arriving
        zero = torch.zeros_like(current)
        return zero, zero, state._replace(t=state.t + 1)
    v = current if k == 0 else state.v
    if k < p.levels:
        spikes = ramp_crosses(v, k, p) & ~state.fired if k <= p.levels - p.lowest else torch.zeros_like(state.fired)
        fired = state.fired | spikes
        count = state.count + fired.to(current.dtype)
    else:
        spikes, fired, count = torch.zeros_like(state.fired), state.fired, state.count
    return spikes.to(current.dtype), (p.threshold / p.levels) * count, TTFSState(state.t + 1, v, fired, count)


def ttfs_transfer(x: torch.Tensor, threshold: torch.Tensor, levels: int, floor: float = 0.0) -> torch.Tensor:
    """What a unit codes for membrane ``x``: theta / K x clamp(floor(x K / theta + 1/2), 0, K),
    0 below level j_min (``floor``), computed as ``ttfs_step`` computes it (first ramp crossing;
    float rounding included)."""
    p = TTFSParams(threshold, int(levels), 0, lowest_level(floor, levels))
    return (p.threshold / p.levels) * (p.levels - first_crossing(x, p))


def first_crossing(v: torch.Tensor, p: TTFSParams) -> torch.Tensor:
    """The window offset k in [0, K - j_min] at which the ramp from ``v`` first reaches theta,
    else K (never): the closed form, corrected by one step either way where float rounding moved
    it, so that it is the offset ``ttfs_step`` fires at (the crossing test is monotone in k)."""
    h = p.threshold / p.levels
    k = torch.ceil((p.threshold - v) / h - 0.5).clamp(0, p.levels)
    k = torch.nan_to_num(k, nan=float(p.levels))
    for _ in range(2):
        k = torch.where((k > 0) & ramp_crosses(v, k - 1, p), k - 1, k)
        k = torch.where((k < p.levels) & ~ramp_crosses(v, k, p), k + 1, k)
    return torch.where(k > p.levels - p.lowest, float(p.levels), k)


class TTFSNeuron(SpikingLayer):
    """Stateful wrapper of ``ttfs_step``. Its backend is "fused": ``scan`` computes a chunk in
    closed form (``first_crossing``), the same spikes and charges the step gives."""

    backend = "fused"
    scans_chunks = True

    def __init__(self, threshold: float | list, levels: int, floor: float = 0.0):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.levels = self.window = int(levels)
        self.lowest = lowest_level(floor, levels)
        self.start = 0

    def place(self, start: int) -> None:
        self.start = int(start)

    def params_like(self, current: torch.Tensor) -> TTFSParams:
        return TTFSParams(per_channel(self.threshold, current), self.levels, self.start, self.lowest)

    def initial_state(self, current: torch.Tensor) -> TTFSState:
        return ttfs_init(current)

    def step(self, current: torch.Tensor) -> torch.Tensor:
        self.spikes, out, self.state = ttfs_step(current, self.state, self.params_like(current))
        return out

    def scan(self, current: torch.Tensor, steps: int, batch: int, fan: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` calls of ``forward`` at once: outputs as steps x batch time-major rows, and
        per-step [spikes, synaptic operations] counts. A chunk wholly before the window or after
        it has a constant output (zero, or the held charge): it is returned as ``batch`` rows,
        which the engine repeats where it meets values that change (``engine.MatchRows``)."""
        constant = current.shape[0] != steps * batch
        first = current[:batch]
        if self.state is None:
            self.state = self.initial_state(first)
        p, t0 = self.params_like(first), self.state.t
        v = self.state.v
        if v is None and t0 <= p.start < t0 + steps:
            j = p.start - t0
            v = current if constant else current[j * batch:(j + 1) * batch]
        offsets = torch.arange(t0, t0 + steps, device=first.device) - p.start  # window offset of each step
        counts = torch.zeros(steps, 2, dtype=torch.float64, device=first.device)
        self.spikes = None
        if v is None:  # the window has not opened in this chunk
            self.state = self.state._replace(t=t0 + steps)
            return first.new_zeros(first.shape), counts
        if t0 - p.start >= p.levels:  # the window has closed: the charge holds
            self.state = self.state._replace(t=t0 + steps)
            return (p.threshold / p.levels) * self.state.count, counts
        k = first_crossing(v, p)  # the offset each unit fires at (K: never)
        shape = (steps,) + (1,) * first.dim()
        at = offsets.clamp(max=p.levels - 1).view(shape).to(first.dtype)
        count = (at - k + 1).clamp(min=0) * (offsets >= 0).view(shape)
        out = ((p.threshold / p.levels) * count).reshape(steps * batch, *first.shape[1:])
        fires = (k + p.start - t0)  # the chunk step each unit fires at
        inside = (k < p.levels) & (fires >= 0) & (fires < steps)
        idx = fires[inside].long()
        weights = fan.double().expand(batch, -1).reshape(inside.shape)[inside]
        counts[:, 0] = torch.bincount(idx, minlength=steps).double()
        counts[:, 1] = torch.bincount(idx, weights=weights, minlength=steps)
        # copies: views would keep the chunk's whole input and output alive until the next batch
        self.state = TTFSState(t0 + steps, v.clone(), k <= offsets[-1].clamp(max=p.levels - 1), count[-1].clone())
        return out, counts


class STETransfer(TransferLayer):
    """``ttfs_transfer`` forward; backward the gradient of clamp(x, 0, theta) (straight through the
    rounding): what ``finetune`` trains a TTFS network with."""

    def __init__(self, threshold: float | list, levels: int, floor: float = 0.0):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.levels, self.floor = int(levels), float(floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = per_channel(self.threshold, x)
        smooth = torch.minimum(x.clamp(min=0), t)
        return smooth + (ttfs_transfer(x, t, self.levels, self.floor) - smooth).detach()


DEFAULTS = {"percentile": 99.9, "levels": 32, "per_channel": True, "floor": 0.0}
FLOORS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15)  # the dead zones a --budget search tries with every K


def fit(stats: "LayerStats", options: dict) -> dict:
    """theta: IF's threshold for the same options (the percentile, per channel if asked); K the
    ``levels`` option; the ``floor`` option (a share of theta)."""
    theta = if_neuron.fit(stats, {**if_neuron.DEFAULTS, "percentile": options["percentile"],
                                  "per_channel": options.get("per_channel", False)})["threshold"]
    return {"threshold": theta, "levels": int(options["levels"]), "floor": float(options.get("floor", 0.0))}


def build(params: dict) -> TTFSNeuron:
    return TTFSNeuron(params["threshold"], params["levels"], params.get("floor", 0.0))


def transfer_module(params: dict) -> STETransfer:
    return STETransfer(params["threshold"], params["levels"], params.get("floor", 0.0))


def readout(options: dict) -> Readout:
    """The output layer's value at step t: complete once the last window has closed."""
    return Readout(hold=True)


NEURON = Neuron(
    name="ttfs", defaults=DEFAULTS, fit=fit, build=build, readout=readout,
    precision=Precision("levels", (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128), budget_grid={"floor": FLOORS},
                        code=lambda c: (c["levels"], lowest_level(c["floor"], c["levels"]))),
    default_timesteps=256, transfer_module=transfer_module, exact_transfer=True, window=lambda params: int(params["levels"]),
    bounds={"percentile": PERCENTILE, "threshold": POSITIVE, "levels": Bound(1, 4096, integer=True),
            "per_channel": Bound(flag=True), "floor": Bound(0, 1, hi_open=True)},
    param_options=("levels",),
    # per step: V += I (the held currents) and the test of V against the layer's ramped threshold
    # theta - (k + 1/2) theta / K (one value per layer and step); each spike sets the unit's fired flag.
    # Windowed: a unit is updated only in its sources' window and its own
    step_ops=StepOps(mac_per_step=0, add_per_step=2, add_per_spike=1, event_driven="windows"),
)
