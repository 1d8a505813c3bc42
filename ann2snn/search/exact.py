"""The precision of a code whose answer is a forward pass (``Neuron.exact_transfer``: TTFS).

A TTFS network's output at its answer step is, bit for bit, the ANN with every slot replaced
by the layer's transfer function (clip to [0, theta], round to K levels; tests check it), and
every unit whose coded value is above zero spikes exactly once. So accuracy, agreement with the
ANN and spikes per sample of each candidate resolution K come from one forward pass of that
network per batch - no simulation - and the choice can look at every calibration image:

  * no ``--budget``: the fewest levels whose answers differ from the ANN's on at most
    ``BAR`` of the search images (the tightest margin of ``operating_point.MARGINS``), or, where
    higher, on the best candidate's share plus its standard error (``bar_for``); for regression,
    whose output error against the ANN is at most ``BAR``, else the most levels tried;
  * ``--budget`` (spikes per sample): every value of the knob in combination with each of
    ``Precision.budget_grid`` (TTFS: its dead zone, ``floor``, which silences the small values
    when the budget is below the share of positive activations; combinations that code alike are
    tried once); among those within the budget, the least output error against the ANN; where
    none is, the sparsest (the same rule as the simulated search).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import fx

from ann2snn import progress
from ann2snn.conversion.statistics import LayerStats
from ann2snn.io.data import TensorData
from ann2snn.neurons import Neuron
from ann2snn.search.budget import ann_outputs, fitted_layers
from ann2snn.search.operating_point import MARGINS
from ann2snn.search.transfer_training import with_transfer
from ann2snn.sim.simulate import ieee_float32
from ann2snn.store.profile import ExactChoiceRecord

BAR = MARGINS[-1] / 100  # share of images allowed to disagree with the ANN


@ieee_float32
@torch.inference_mode()
def measure(gm: fx.GraphModule, neuron: Neuron, options: dict, stats: dict[str, LayerStats], data: TensorData,
            reference: torch.Tensor, batch_size: int, device: torch.device) -> dict:
    """One candidate: accuracy, share of images whose class is not the ANN's, relative output
    error against the ANN, and spikes per sample (units whose coded value is above zero)."""
    net = with_transfer(gm, neuron, fitted_layers(stats, neuron, options)).to(device).eval()
    spikes = torch.zeros((), dtype=torch.float64, device=device)

    def count(_m, _i, out):
        nonlocal spikes
        spikes = spikes + (out > 0).sum().double()

    hooks = [net.get_submodule(name).register_forward_hook(count) for name in stats]
    outs = []
    try:
        for x, _ in data.batches(batch_size):
            outs.append(net(x.to(device)).reshape(len(x), -1).double().cpu())
    finally:
        for h in hooks:
            h.remove()
    out = torch.cat(outs)
    error = {"output_error": float((out - reference).norm() / reference.norm().clamp_min(1e-30)),
             "spikes_per_sample": float(spikes) / max(len(data), 1)}
    if data.task == "regression":
        return error
    return {"accuracy": float((out.argmax(1) == data.targets).double().mean()),
            "disagreement": float((out.argmax(1) != reference.argmax(1)).double().mean()), **error}


def bar_for(errors: list[float], samples: int, regression: bool) -> float:
    """``BAR``, or, where higher, the best candidate's level plus its binomial standard error on
    ``samples`` images (as ``operating_point.bars`` raises its bars): the fewest levels that do as
    well as the best, within the noise of the images (on 2,000 images 0.1% is two images)."""
    if regression:
        return BAR
    best = min(errors)
    return max(BAR, best + math.sqrt(best * (1 - best) / max(samples, 1)))


def candidates(neuron: Neuron, options: dict, budget: float | None) -> list[dict]:
    """The option sets tried: each value of the precision knob, under a budget in every
    combination with ``budget_grid``, less those that code as an earlier one (``Precision.code``)."""
    knob, values, grid = neuron.precision.knob, neuron.precision.values, neuron.precision.budget_grid
    if budget is None:
        return [{knob: v} for v in values]
    out, seen = [], set()
    for combo in itertools.product(values, *grid.values()):
        c = dict(zip((knob, *grid), combo))
        key = neuron.precision.code(c) if neuron.precision.code else combo
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def choose(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, data: TensorData,
           budget: float | None, batch_size: int, device: torch.device) -> tuple[dict, ExactChoiceRecord]:
    """Returns (``options`` with the chosen resolution, the record of every candidate)."""
    knob = neuron.precision.knob
    reference = ann_outputs(gm, data, batch_size, device)
    tried, sets = [], candidates(neuron, options, budget)
    with progress.task(f"{neuron.label} {knob}: forward passes (candidates)", len(sets)) as shown:
        for c in sets:
            tried.append({**c, **measure(gm, neuron, {**options, **c}, stats, data, reference, batch_size, device)})
            shown.advance(1)
    bar = None
    if budget is None:
        key = "output_error" if data.task == "regression" else "disagreement"
        bar = bar_for([t[key] for t in tried], len(data), data.task == "regression")
        met = [t for t in tried if t[key] <= bar + 1e-12]
        chosen = met[0] if met else tried[-1]
    else:
        met = [t for t in tried if t["spikes_per_sample"] <= budget]
        chosen = min(met, key=lambda t: (t["output_error"], t["spikes_per_sample"])) if met else \
            min(tried, key=lambda t: t["spikes_per_sample"])
    record = ExactChoiceRecord(knob=knob, samples=len(data), bar=bar,
                               budget_spikes_per_sample=budget, candidates=tried, chosen=chosen, met=bool(met))
    return {**options, **{k: chosen[k] for k in sets[0]}}, record
