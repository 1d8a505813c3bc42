"""Integrate-and-fire neuron with reset by subtraction: the rate-coding baseline.

Rueckauer et al. 2017 (Front. Neurosci. 11:682), as in SpikingJelly's ``ann2snn``, sinabs and
SNN Toolbox. One step, for input current I[t]:

    v[t] = v[t-1] + I[t]
    s[t] = H(v[t] - theta)              (binary spike)
    v[t] = v[t] - theta * s[t]          (reset by subtraction; ``reset=zero``: v[t] = 0 after a spike)

with v[0] = v_init * theta. The layer emits ``theta * s[t]`` (spike height theta; on hardware
the height is folded into the next layer's weights). A burst neuron (``max_spikes`` k > 1)
emits s[t] = min(floor(v[t] / theta), k) spikes in one step, counted as s[t] spikes (each a
synaptic event; on hardware a burst is k events in one step, or one event with a small integer
payload), and subtracts s[t] theta. Its threshold is fitted k times lower (percentile / k), so
it codes the layer's range in k times finer steps: k spikes of height theta/k carry what one
spike of height theta does, and the same precision takes up to k times fewer steps. Thresholds
are one per layer, or one per channel of a convolution (``per_channel``: each channel's
percentile of its calibration sample, interpolated; the sample is the first 256 calibration
images, strided). Its rate transfer function, the mean
output as T -> inf, is ``clamp(I, 0, theta)``; theta is the layer's 99.9th-percentile ANN
activation (docs/science.md section 3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ann2snn.neurons.layer import SpikingLayer, per_channel
from ann2snn.neurons.kernels import if_scan
from ann2snn.neurons import compiled
from ann2snn.neurons.readout import Readout
from ann2snn.neurons.neuron import PERCENTILE, POSITIVE, Bound, NIRExport, Neuron, StepOps

if TYPE_CHECKING:
    from ann2snn.conversion.statistics import LayerStats


class IFParams(NamedTuple):
    threshold: torch.Tensor  # scalar or broadcastable per channel
    v_init: float = 0.5  # initial membrane, as a fraction of the threshold
    max_spikes: int = 1  # spikes one step may emit (a burst)
    reset_to_zero: bool = False  # v = 0 after a spike instead of v -= theta (NIR's and many chips' IF)


class IFState(NamedTuple):
    v: torch.Tensor


def if_init(current: torch.Tensor, p: IFParams) -> IFState:
    return IFState(v=torch.ones_like(current) * (p.v_init * p.threshold))


def if_step(current: torch.Tensor, state: IFState, p: IFParams) -> tuple[torch.Tensor, IFState]:
    """Advance one time step; returns binary spikes and the new state."""
    v = state.v + current
    if p.max_spikes == 1:
        spikes = (v >= p.threshold).to(current.dtype)
    else:
        spikes = torch.floor(v / p.threshold).clamp(0, p.max_spikes)
    if p.reset_to_zero:
        return spikes, IFState(v=torch.where(spikes > 0, torch.zeros_like(v), v))
    return spikes, IFState(v=v - spikes * p.threshold)


def if_chunk_step(current: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor], p: IFParams) -> torch.Tensor:
    """``if_step`` in place for a chunked scan: advances the membrane ``buffers[0]``, writes the
    output ``theta * s`` into ``buffers[1]``; returns the spikes summed over the batch (per unit)."""
    v, out = buffers
    spikes, state = if_step(current, IFState(v), p)
    out.copy_(spikes * p.threshold)
    v.copy_(state.v)
    return spikes.sum(0)


def if_transfer(current: torch.Tensor, p: IFParams) -> torch.Tensor:
    """Mean output ``theta * rate`` for a constant current, as T -> inf."""
    return torch.minimum(current.clamp(min=0), p.max_spikes * p.threshold)


class IFNeuron(SpikingLayer):
    """Stateful wrapper of ``if_step``. For one scalar threshold, binary spikes and reset by
    subtraction it scans whole chunks (``kernels.if_scan``): backend "fused", or "compiled" under
    ``compiled.enable`` (on the CPU the scan's step body through torch.compile, one loop instead of
    five passes; on CUDA the Triton kernel either way); other settings step by step, "reference"
    or "compiled"."""

    def __init__(self, threshold: float | list, v_init: float = 0.5, max_spikes: int = 1, reset: str = "subtract"):
        super().__init__()
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32))
        self.v_init, self.max_spikes, self.reset_mode = float(v_init), int(max_spikes), reset
        self.scans_chunks = self.max_spikes == 1 and not self.threshold.dim() and reset == "subtract"
        self.backend = "fused" if self.scans_chunks and not compiled.enabled() else compiled.backend()

    def params_like(self, current: torch.Tensor) -> IFParams:
        return IFParams(per_channel(self.threshold, current), self.v_init, self.max_spikes, self.reset_mode == "zero")

    def initial_state(self, current: torch.Tensor) -> IFState:
        return if_init(current, self.params_like(current))

    def step(self, current: torch.Tensor) -> torch.Tensor:
        p = self.params_like(current)
        self.spikes, self.state = compiled.run(self.backend, if_step, current, self.state, p)
        return self.spikes * p.threshold

    def scan(self, current: torch.Tensor, steps: int, batch: int, fan: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` calls of ``forward`` at once (``kernels.if_scan``): outputs as steps x batch
        time-major rows, and per-step [spikes, synaptic operations] counts."""
        if not self.scans_chunks:
            return super().scan(current, steps, batch, fan)
        if self.state is None:
            self.state = self.initial_state(current[:batch])
        v = self.state.v.contiguous() if current.is_cuda else self.state.v  # advanced in place (any layout on the CPU)
        body, p = None, self.params_like(current)
        if self.backend == "compiled":
            body = lambda x, v, out: compiled.run("compiled", if_chunk_step, x, (v, out), p)  # noqa: E731
        out, counts = if_scan(current, steps, batch, v, float(self.threshold), fan, body)
        self.state, self.spikes = IFState(v), None
        return out, counts


DEFAULTS = {"percentile": 99.9, "v_init": 0.5, "max_spikes": 1, "per_channel": False, "reset": "subtract"}


def fit(stats: "LayerStats", options: dict) -> dict:
    """Per-layer parameters from calibration statistics: theta = the chosen percentile
    (the maximum if the percentile is 0; 1.0 for a layer that never activates), divided by
    ``max_spikes``; with ``per_channel``, each convolution channel's percentile of its own
    activations (the layer's theta for a channel whose percentile is 0)."""
    threshold = stats.percentile if stats.percentile > 0 else stats.max
    threshold = (float(threshold) if threshold > 0 else 1.0) / int(options.get("max_spikes", 1))
    params = {"threshold": threshold, "v_init": float(options["v_init"]),
              "max_spikes": int(options.get("max_spikes", 1)), "reset": options.get("reset", "subtract")}
    if options.get("per_channel") and stats.shape and len(stats.shape) > 1:
        k = int(options.get("max_spikes", 1))
        channels = [t / k if t > 0 else threshold for t in
                    _channel_percentiles(stats, float(options.get("percentile", 99.9)))]
        if channels:  # no per-channel data (a profile without channel tables): one threshold
            params["threshold"] = channels
    return params


def _channel_percentiles(stats: "LayerStats", percentile: float) -> list[float]:
    """Each channel's ``percentile`` of its activations (zeros included): from the calibration
    sample, or from a stored profile's positive quantile tables and positive fractions."""
    q = percentile / 100
    if stats.channel_values is not None:
        return [float(torch.quantile(c.double(), q)) for c in stats.channel_values]
    out = []
    for table, positive in zip(stats.channel_quantiles or [], stats.channel_positive_fraction or []):
        level = 1 - (1 - q) / positive if positive > 0 else -1.0  # the level among positive values
        if level < 0 or not table:
            out.append(0.0)
            continue
        pos = level * (len(table) - 1)
        i = min(int(pos), len(table) - 2) if len(table) > 1 else 0
        out.append(float(table[i] + (pos - i) * (table[i + 1] - table[i])) if len(table) > 1 else float(table[0]))
    return out


def build(params: dict) -> IFNeuron:
    return IFNeuron(params["threshold"], params.get("v_init", DEFAULTS["v_init"]), params.get("max_spikes", 1),
                    params.get("reset", "subtract"))


NIR_DT = 1e-4  # seconds per step in a NIR file; R = 1/NIR_DT makes v += I per step


def nir_problems(params: dict) -> list[str]:
    """What keeps an IF layer from being NIR's IF node exactly, step for step."""
    fix = []
    if params.get("reset", "subtract") != "zero":
        fix.append("reset=zero (NIR's IF resets to a value, not by subtraction)")
    if params.get("v_init", 0.5) != 0:
        fix.append("v_init=0 (NIR has no initial membrane)")
    if isinstance(params["threshold"], list):
        fix.append("one threshold per layer (not per_channel)")
    if params.get("max_spikes", 1) != 1:
        fix.append("max_spikes=1")
    return fix


def nir_node(nir, shape: tuple, params: dict):
    """NIR's IF for units shaped ``shape`` (R = 1/NIR_DT, reset to 0); NIR fires at v > v_threshold,
    ann2snn at v >= theta: v_threshold is the next float32 below theta."""
    import numpy as np

    full = lambda v: np.full(shape, v, dtype=np.float32)  # noqa: E731
    below = np.nextafter(np.float32(params["threshold"]), np.float32(-np.inf))
    return nir.IF(r=full(1.0 / NIR_DT), v_threshold=full(below), v_reset=full(0.0))


def readout(options: dict) -> Readout:
    """The accumulated output: the rate code's estimate of the ANN output."""
    return Readout(tau=None, start=int(options.get("start_ms", 0)))


NEURON = Neuron(name="if", defaults=DEFAULTS, fit=fit, build=build, readout=readout,
                bounds={"percentile": PERCENTILE, "v_init": Bound(-1, 1), "threshold": POSITIVE,
                        "max_spikes": Bound(1, 255, integer=True), "per_channel": Bound(flag=True),
                        "reset": Bound(words=("subtract", "zero"))},
                param_options=("v_init", "max_spikes", "reset"), default_timesteps=64, layer_calibration=32,
                step_ops=StepOps(mac_per_step=0, add_per_step=2, add_per_spike=1),  # v += I; v >= theta; v -= theta
                nir=NIRExport(nir_problems, "calibrate with --param reset=zero --param v_init=0 and convert again",
                              nir_node, lambda params: float(params["threshold"])))
