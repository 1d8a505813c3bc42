"""Operating-point search for a spike budget on the calibration images.

``search``: try each value of the neuron's precision knob (ASN: m_f), simulate, and keep the
most accurate setting whose spikes per sample stay within the budget (ties: fewer spikes).
Per-layer scales are refitted for every candidate, since the measured transfer function
depends on the knob.

``search_arousal``: the arousal threshold. Raising it arouses more inputs, so spikes (and
accuracy) grow with it; bisection finds the largest threshold within the budget."""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch import fx

from . import neurons
from .arousal import ArousalController, ArousalPolicy
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


def search_arousal(gm: fx.GraphModule, stats: dict[str, dict], options: dict, policy: ArousalPolicy,
                   data: TensorData, budget: float, timesteps: int, batch_size: int, device: torch.device,
                   bisections: int = 6) -> tuple[ArousalPolicy, dict]:
    """Returns (``policy`` with the chosen threshold, a record of every threshold tried). The
    network is built as ``evaluate --arousal`` builds it: scales fitted with ``options``, every
    layer started at m_f = ``policy.low``."""
    if data.task != "classification":
        raise UserError("--arousal: the uncertainty test needs class scores (a classification data set)")
    kind = neurons.get("asn")
    layers = list(stats)
    params = [{"name": name, "params": {**kind.fit(stats[name], options), "m_f": policy.low}} for name in layers]
    fan = fanout_maps(gm, data.sample_shape)
    readout = kind.readout({**kind.DEFAULTS, **options}).within(timesteps)
    tried: list[dict] = []

    def run(threshold: float) -> dict:
        control = ArousalController(replace(policy, threshold=threshold))
        snn = to_snn(gm, build_neurons({"type": "asn", "options": {**options, "m_f": policy.low}}, params))
        sim = simulate(snn, layers, fan, data, timesteps, batch_size, device, readout, controller=control)
        tried.append({"threshold": threshold, "spikes_per_sample": float(sim.spikes.sum()) / len(data),
                      "accuracy": float(sim.metric[-1]) / len(data), "fraction_aroused": control.fraction()})
        return tried[-1]

    none, every = run(0.0), run(1.0)  # margin < 0: nobody aroused; margin < 1: (nearly) everybody
    chosen = every if every["spikes_per_sample"] <= budget else none
    if none["spikes_per_sample"] <= budget < every["spikes_per_sample"]:
        lo, hi = 0.0, 1.0
        for _ in range(bisections):
            mid = run((lo + hi) / 2)
            if mid["spikes_per_sample"] <= budget:
                lo, chosen = mid["threshold"], mid
            else:
                hi = mid["threshold"]
    record = {"budget_spikes_per_sample": budget, "timesteps": timesteps, "samples": len(data),
              "knob": "threshold", "candidates": sorted(tried, key=lambda t: t["threshold"]), "chosen": chosen,
              "budget_met": chosen["spikes_per_sample"] <= budget}
    return replace(policy, threshold=chosen["threshold"]), record


def policy_record(policy: ArousalPolicy) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(policy).items()}
