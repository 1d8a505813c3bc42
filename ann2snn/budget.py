"""Operating-point search for a spike budget: try each value of the neuron's precision knob
(ASN: m_f), simulate the calibration images, and keep the most accurate setting whose spikes
per sample stay within the budget (ties: fewer spikes). Per-layer scales are refitted for
every candidate, since the measured transfer function depends on the knob."""

from __future__ import annotations

import torch
from torch import fx

from . import neurons
from .artifact import build_neurons
from .convert import to_snn
from .data import TensorData
from .energy import fanout_maps
from .errors import UserError
from .simulate import nmse, simulate


def search(gm: fx.GraphModule, stats: dict[str, dict], neuron: str, options: dict, data: TensorData,
           budget: float, timesteps: int, batch_size: int, device: torch.device) -> tuple[dict, dict]:
    """Returns (options with the chosen knob value, a record of every candidate)."""
    kind = neurons.get(neuron)
    if not hasattr(kind, "PRECISION"):
        raise UserError(f"--budget: neuron {neuron!r} has no precision knob to search (use asn)")
    if budget <= 0:
        raise UserError(f"--budget {budget}: must be positive")
    if timesteps <= 0:
        raise UserError(f"--timesteps {timesteps}: must be positive")
    knob, values = kind.PRECISION
    regression = data.task == "regression"
    metric = "nmse" if regression else "accuracy"
    layers = list(stats)
    fan = fanout_maps(gm, data.sample_shape)
    tried = []
    for value in values:
        opts = {**options, knob: value}
        params = [{"name": name, "params": kind.fit(stats[name], opts)} for name in layers]
        snn = to_snn(gm, build_neurons({"type": neuron, "options": opts}, params))
        readout = kind.readout({**kind.DEFAULTS, **opts}).within(timesteps)
        sim = simulate(snn, layers, fan, data, timesteps, batch_size, device, readout)
        quality = nmse(float(sim.metric[-1]), data) if regression else float(sim.metric[-1]) / len(data)
        tried.append({knob: value, "spikes_per_sample": float(sim.spikes.sum()) / len(data), metric: quality})
    within = [t for t in tried if t["spikes_per_sample"] <= budget]
    sign = -1 if regression else 1  # higher accuracy, lower NMSE
    chosen = max(within, key=lambda t: (sign * t[metric], -t["spikes_per_sample"])) if within else \
        min(tried, key=lambda t: t["spikes_per_sample"])
    record = {"budget_spikes_per_sample": budget, "timesteps": timesteps, "samples": len(data), "knob": knob,
              "candidates": tried, "chosen": chosen, "budget_met": bool(within)}
    return {**options, knob: chosen[knob]}, record
