"""Post-training layer calibration: bias correction, layer after layer (docs/science.md section 9).

Li et al., "A free lunch from ANN: towards efficient, accurate spiking neural networks
calibration", ICML 2021 (arXiv 2106.06984), section 4 ("light calibration"). A converted layer's
output averaged over T steps, s_l = (1/T) sum_t out_l[t], differs from the ANN activation a_l it
stands for: the time grid, the transient while membranes fill, clipping at the threshold, and the
errors of the layers below, which compound with depth. Walking the spiking layers in depth order,
with the corrections of the layers below already in place, each layer gets a constant input
current per channel c (dim 1), the mean error over the calibration images n and positions p:

    delta_l[c] = E_{n,p}[a_l[n, c, p]] - E_{n,p}[s_l[n, c, p]]
    I_l(t) = W_l x_{l-1}(t) + b_l + delta_l

so the layer's expected output error is cancelled to first order, at the T it was fitted for.
For a code whose answer is a forward pass of its transfer network (TTFS: clip and round, with a
dead zone), s_l is that network's output, and ``fit_transfer`` fits delta_l in one pass.
Each further ``round`` measures the remaining error and adds it. A layer whose error is within
float rounding (an SNN that already equals its ANN, such as VSN at T = 1 with zero thresholds)
is left as it is. The correction folds into the layer's bias (b_l + delta_l), so it costs no
operation beyond the bias add the layer makes anyway. The fit simulates each layer's prefix of
the network only (the step stops at the layer being fitted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from ann2snn.conversion.bias_ramp import attach, check_named_layers
from ann2snn.errors import UserError
from ann2snn.neurons.layer import StatefulLayer

RELATIVE_TOLERANCE = 1e-5  # errors below this fraction of the layer's largest mean are float rounding


@dataclass(kw_only=True)
class LayerCorrection:
    """The constant current (per channel) added to the input of spiking layer ``layer``, and its
    mean absolute error per channel against the ANN before correction (on the fit images)."""

    layer: str
    shift: list[float]
    error_before: float

    def __post_init__(self):
        if not self.shift:
            raise ValueError("shift must not be empty")
        if not all(math.isfinite(v) and abs(v) < 1e30 for v in self.shift):
            raise ValueError("shift must hold finite numbers")


@dataclass(kw_only=True)
class LayerCalibrationRecord:
    """The corrections and how they were fitted: ``timesteps`` steps on ``samples`` images, ``rounds``."""

    timesteps: int
    samples: int
    rounds: int
    corrections: list[LayerCorrection]


class CurrentShift(nn.Module):
    """c -> c + delta, delta per channel (dim 1)."""

    def __init__(self, shift: torch.Tensor, layer: str = ""):
        super().__init__()
        self.layer = layer
        self.register_buffer("shift", shift.float(), persistent=False)  # rebuilt from the metadata

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if current.dim() < 2 or current.shape[1] != len(self.shift):
            raise UserError(f"layer calibration of {self.layer}: {len(self.shift)} values for an input of shape "
                            f"{tuple(current.shape[1:])}")
        return current + self.shift.view((1, -1) + (1,) * (current.dim() - 2))


def modules(record: LayerCalibrationRecord | None, layers: list[str]) -> dict[str, CurrentShift]:
    """The shift modules of ``record``, refused if one names no spiking layer or one layer twice."""
    if record is None:
        return {}
    check_named_layers([c.layer for c in record.corrections], layers, "layer calibration", "layer calibrations")
    return {c.layer: CurrentShift(torch.tensor(c.shift), c.layer) for c in record.corrections}


def apply(snn: fx.GraphModule, record: LayerCalibrationRecord | None, layers: list[str]) -> fx.GraphModule:
    """Insert ``record``'s shifts before the layers they name, in place."""
    shifts = modules(record, layers)
    return attach(snn, shifts, "layer_calibration") if shifts else snn


def channel_sum(x: torch.Tensor) -> torch.Tensor:
    """Per channel (dim 1): the mean over every other dim but 0, summed over dim 0 (float64)."""
    return x.double().transpose(0, 1).reshape(x.shape[1], len(x), -1).mean(2).sum(1)


class _Stop(Exception):
    """Ends a step once the layer being fitted has run (the layers above it do not matter)."""


def ann_means(gm: fx.GraphModule, layers: list[str], x: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Each slot's ANN output, averaged per channel over ``x``."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, out):
            sums[name] = sums[name] + channel_sum(out) if name in sums else channel_sum(out)
        return record

    handles = [gm.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        for i in range(0, len(x), batch):
            gm(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / len(x) for name in layers}


def _snn_mean(snn: fx.GraphModule, layer: str, x: torch.Tensor, timesteps: int, batch: int) -> torch.Tensor:
    """``layer``'s output averaged over ``timesteps`` steps, per channel over ``x`` (its prefix only)."""
    total: list[torch.Tensor] = []

    def record(mod, args, out):
        total.append(channel_sum(out))
        raise _Stop

    handle = snn.get_submodule(layer).register_forward_hook(record)
    try:
        for i in range(0, len(x), batch):
            for m in snn.modules():
                if isinstance(m, StatefulLayer):
                    m.reset()
            for _ in range(timesteps):
                try:
                    snn(x[i:i + batch])
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.stack(total).sum(0) / (timesteps * len(x))


def _tolerance(target: torch.Tensor) -> float:
    """Errors at most this are float rounding: ``RELATIVE_TOLERANCE`` of the layer's largest mean."""
    return RELATIVE_TOLERANCE * max(float(target.abs().max()) if len(target) else 0.0, 1e-12)


@torch.no_grad()
def fit(gm: fx.GraphModule, snn: fx.GraphModule, layers: list[str], x: torch.Tensor, timesteps: int,
        device: torch.device, rounds: int = 1, batch: int = 256,
        on_layer: Callable[[], None] | None = None) -> LayerCalibrationRecord:
    """The corrections of ``snn`` (converted from ``gm``) fitted on inputs ``x`` over ``timesteps``
    steps, layer after layer in the order of ``layers`` (depth order), ``rounds`` passes per layer."""
    gm, x = gm.to(device).eval(), x.to(device)
    targets = ann_means(gm, layers, x, batch)
    shifts = {name: CurrentShift(torch.zeros(len(targets[name]), device=device), name).to(device) for name in layers}
    net = attach(snn.to(device).eval(), shifts, "layer_calibration")
    corrections = []
    for name in layers:
        target = targets[name]
        tolerance = _tolerance(target)
        error = target - _snn_mean(net, name, x, timesteps, batch)
        before = float(error.abs().mean())
        for r in range(rounds):
            if float(error.abs().max()) <= tolerance:
                break
            shifts[name].shift += error.float()
            if r + 1 < rounds:
                error = target - _snn_mean(net, name, x, timesteps, batch)
        if bool(shifts[name].shift.any()):
            corrections.append(LayerCorrection(layer=name, shift=shifts[name].shift.cpu().tolist(), error_before=before))
        if on_layer is not None:
            on_layer()
    return LayerCalibrationRecord(timesteps=timesteps, samples=len(x), rounds=rounds, corrections=corrections)


@torch.inference_mode()
def fit_transfer(gm: fx.GraphModule, net: fx.GraphModule, layers: list[str], x: torch.Tensor,
                 device: torch.device, targets: dict[str, torch.Tensor] | None = None) -> LayerCalibrationRecord:
    """The corrections of the transfer network ``net`` (``gm`` with each slot's transfer
    function), fitted on ``x`` in one forward pass: at each slot in depth order, with the
    corrections below already applied, delta_l = E[a_l] - E[transfer_l(v)] is added to its input v
    (``x`` is one batch: the channel means are over all of it; ``targets``: the ANN's, if known).
    ``timesteps`` is recorded as 0."""
    gm, net, x = gm.to(device).eval(), net.to(device).eval(), x.to(device)
    targets = ann_means(gm, layers, x, len(x)) if targets is None else targets
    corrections = []

    def correct(name):
        def hook(module, args):
            v, target = args[0], targets[name]
            error = target - channel_sum(module.forward(v)) / len(v)  # forward: not its hooks again
            if float(error.abs().max()) <= _tolerance(target):
                return None
            corrections.append(LayerCorrection(layer=name, shift=error.float().cpu().tolist(),
                                               error_before=float(error.abs().mean())))
            return (CurrentShift(error.float(), name)(v), *args[1:])
        return hook

    handles = [net.get_submodule(name).register_forward_pre_hook(correct(name)) for name in layers]
    try:
        net(x)
    finally:
        for h in handles:
            h.remove()
    return LayerCalibrationRecord(timesteps=0, samples=len(x), rounds=1, corrections=corrections)


def layer_error(gm: fx.GraphModule, snn: fx.GraphModule, layer: str, x: torch.Tensor, timesteps: int,
                batch: int = 256) -> float:
    """Mean absolute error per channel of ``layer``'s time-averaged output against the ANN's on ``x``."""
    with torch.no_grad():
        target = ann_means(gm.eval(), [layer], x, batch)[layer]
        return float((target - _snn_mean(snn.eval(), layer, x, timesteps, batch)).abs().mean())
