"""Bias ramps: each layer's constant input offset follows the gain of its spiking input
(docs/science.md section 7).

A converted layer receives c_k(t) = W_k psc_{k-1}(t) + b_k: the bias b_k (the current with every
input at zero; conv bias, folded batch norm, summed over residual paths) is there in full from
the first step, while the spiking part builds up as the layers below fill their postsynaptic
currents (for ASN over tau_beta = 50 ms and more in deep layers). Until then the bias outweighs
the signal and the output leans towards the classes the biases favour, which a readout summed
from step 1 keeps. The ramp scales the offset with the signal:

    c'_k(t) = c_k(t) - (1 - g_k(t)) b_k,   g_k(t) = <c_k(t) - b_k, z_k - b_k> / ||z_k - b_k||^2

where z_k is the ANN's pre-activation of the same samples, so c'_k(t) ~ g_k(t) z_k: the ANN's
current at the gain the layer actually receives. g_k(t) is fitted once, at calibration, on
calibration images, layer after layer within each step (each layer sees the ramps below it
applied), and stored per layer and step; beyond the fitted steps the last value holds. The
offset is stored per channel (dim 1); a layer whose zero-input current is not constant per
channel (e.g. a Linear on [N, tokens, features]) gets no ramp, nor does a layer whose input is
the constant image (g = 1). Cost: per layer and step one multiply per channel (g(t) b); the add
per unit is the bias add that happens anyway, so nothing is counted separately.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from ann2snn.errors import UserError
from ann2snn.neurons.layer import StatefulLayer

OUTPUT = "output"  # the key of the network output's ramp (the readout layer)


@dataclass(kw_only=True)
class BiasRampRecord:
    """The input offset (per channel) of ``layer`` (a spiking layer, or ``OUTPUT``) and the gain
    it follows at steps 1, 2, ..."""

    layer: str
    offset: list[float]
    gain: list[float]

    def __post_init__(self):
        if not self.gain or not self.offset:
            raise ValueError("offset and gain must not be empty")
        if not all(math.isfinite(v) and abs(v) < 1e30 for v in (*self.offset, *self.gain)):
            raise ValueError("offset and gain must be finite numbers")


class BiasRamp(StatefulLayer):
    """c -> c - (1 - g(t)) b with its own step clock (``reset`` starts it at step 1). With
    ``reference`` set (fitting), g(t) is measured from the input and appended to ``fitted``."""

    def __init__(self, offset: torch.Tensor, gain: torch.Tensor, layer: str = ""):
        super().__init__()
        self.layer = layer
        self.register_buffer("offset", offset.float(), persistent=False)  # rebuilt from the metadata
        self.register_buffer("gain", gain.float(), persistent=False)
        self.t = 0
        self.reference: torch.Tensor | None = None
        self.fitted: list[float] = []

    def reset(self) -> None:
        self.t = 0

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if current.dim() < 2 or current.shape[1] != len(self.offset):
            raise UserError(f"bias ramp of {self.layer}: {len(self.offset)} offsets for an input of shape "
                            f"{tuple(current.shape[1:])}")
        b = self.offset.view((1, -1) + (1,) * (current.dim() - 2))
        if self.reference is not None:
            target = self.reference - b
            norm = float((target * target).sum())
            g = float(((current - b) * target).sum()) / norm if norm > 0 else 1.0
            self.fitted.append(g)
        else:
            g = self.gain[min(self.t, len(self.gain) - 1)]
        self.t += 1
        return current - (1 - g) * b


def modules(records: list[BiasRampRecord], layers: list[str]) -> dict[str, BiasRamp]:
    """The ramp modules of ``records``, refused if one names no spiking layer (nor the output);
    an offset that does not fit its layer is refused when the layer first runs."""
    check_named_layers([r.layer for r in records], [*layers, OUTPUT], "bias ramp", "bias ramps")
    return {r.layer: BiasRamp(torch.tensor(r.offset), torch.tensor(r.gain), r.layer) for r in records}


def check_named_layers(names: list[str], layers: list[str], what: str, plural: str) -> None:
    """Refuse per-layer records (``what``) that name a layer outside ``layers``, or one layer twice."""
    unknown = next((n for n in names if n not in layers), None)
    if unknown is not None:
        raise UserError(f"{what} for {unknown!r}, which is not a spiking layer of the network")
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise UserError(f"two {plural} for {twice!r}")


def attach(snn: fx.GraphModule, ramps: dict[str, nn.Module], kind: str = "bias_ramp") -> fx.GraphModule:
    """Insert each module of ``ramps`` before the layer it names (``OUTPUT``: before the network
    output), in place, as the submodule ``{layer}_{kind}``."""
    for node in list(snn.graph.nodes):
        name = OUTPUT if node.op == "output" else str(node.target) if node.op == "call_module" else None
        if name not in ramps or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        target = f"{name}_{kind}"
        snn.add_submodule(target, ramps[name])
        with snn.graph.inserting_before(node):
            ramped = snn.graph.call_module(target, (node.args[0],))
        node.args = (ramped, *node.args[1:])
    snn.recompile()
    return snn


def _currents(gm: fx.GraphModule, layers: list[str], x: torch.Tensor, silent: bool) -> dict[str, torch.Tensor]:
    """Each layer's input current and the output for input ``x``; ``silent``: every layer
    outputs zero (so the currents are the offsets)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args, out):
            seen[name] = args[0].detach()
            return torch.zeros_like(out) if silent else None
        return record

    handles = [gm.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        seen[OUTPUT] = gm(x).detach()
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def fit(gm: fx.GraphModule, snn: fx.GraphModule, layers: list[str], x: torch.Tensor, timesteps: int,
        device: torch.device) -> list[BiasRampRecord]:
    """Ramps for ``snn`` (converted from ``gm``, no ramps yet) fitted on the inputs ``x`` over
    ``timesteps`` steps; layers with no offset or a gain that stays 1 get none."""
    gm, snn, x = gm.to(device).eval(), snn.to(device).eval(), x.to(device)
    zero = _currents(gm, layers, torch.zeros_like(x[:1]), silent=True)
    reference = _currents(gm, layers, x, silent=False)
    probes = {}
    for name, v in zero.items():
        b = v[0].flatten(1).mean(1) if v.dim() > 2 else v[0]
        if v.dim() < 2 or not bool(b.any()) or not torch.allclose(v[0], b.view((-1,) + (1,) * (v.dim() - 2))
                                                                  .expand_as(v[0]), rtol=1e-5, atol=1e-6):
            continue  # no offset, or one that is not constant per channel (dim 1): not ramped
        probes[name] = BiasRamp(b, torch.ones(1, device=device), name).to(device)
        probes[name].reference = reference[name]
    probe_net = attach(copy.deepcopy(snn), probes)
    for m in probe_net.modules():
        if isinstance(m, StatefulLayer):
            m.reset()
    for _ in range(timesteps):
        probe_net(x)
    return [BiasRampRecord(layer=name, offset=p.offset.cpu().tolist(), gain=p.fitted)
            for name, p in probes.items() if max(abs(g - 1.0) for g in p.fitted) > 1e-4]
