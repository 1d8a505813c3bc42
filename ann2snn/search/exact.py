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
    tried once); then, from the best of those and the knob values beside it, dead zones per layer
    (``refine``: raise the lowest level of the layer that costs the least output error per spike
    saved, until the budget holds). Each candidate is measured with its layer calibration
    (``layer_calibration.fit_transfer``: the mean error the dead zones and the rounding leave, cancelled
    layer after layer), unless ``correction_samples`` is 0. Among those within the budget, the
    least output error against the ANN; where none is, the sparsest (the same rule as the
    simulated search).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
from torch import fx

from ann2snn import progress
from ann2snn.conversion import layer_calibration
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.conversion.statistics import LayerStats
from ann2snn.errors import OptionError
from ann2snn.io.data import TensorData, calibration_subset
from ann2snn.neurons import Neuron
from ann2snn.search.budget import ann_outputs, fitted_layers
from ann2snn.search.operating_point import MARGINS
from ann2snn.search.transfer_training import with_transfer
from ann2snn.sim.simulate import ieee_float32
from ann2snn.store.profile import ExactChoiceRecord, ProfileLayer

BAR = MARGINS[-1] / 100  # share of images allowed to disagree with the ANN


def transfer_network(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer],
                     calibration: LayerCalibrationRecord | None = None) -> fx.GraphModule:
    """``gm`` with each slot's transfer function (``with_transfer``) and the layer calibration's
    shifts before them: what the SNN computes at its answer step."""
    return layer_calibration.apply(with_transfer(gm, neuron, layers), calibration, [layer.name for layer in layers])


@ieee_float32
@torch.inference_mode()
def correction(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer], x: torch.Tensor,
               device: torch.device, targets: dict | None = None) -> LayerCalibrationRecord:
    """The layer calibration of ``layers``' transfer network on images ``x`` (``correction_images``;
    ``targets``: the ANN's channel means on them, if known)."""
    names = [layer.name for layer in layers]
    try:
        return layer_calibration.fit_transfer(gm, with_transfer(gm, neuron, layers), names, x, device, targets)
    except torch.OutOfMemoryError:
        raise OptionError("layer_calibration_samples", f": fitting the layer calibration, {len(x)} images of this "
                                                       f"network do not fit in {device} memory at once; lower "
                                                       "{{layer_calibration_samples}}") from None


def correction_images(data: TensorData, samples: int) -> torch.Tensor:
    """The layer calibration's images: all of ``data``, or a seeded random ``samples`` of them (not its head:
    a data set may be sorted by class)."""
    part = data if samples >= len(data) else calibration_subset(data, samples, 0)
    return next(part.batches(len(part)))[0]


@ieee_float32
@torch.inference_mode()
def measure(gm: fx.GraphModule, neuron: Neuron, options: dict, stats: dict[str, LayerStats], data: TensorData,
            reference: torch.Tensor, batch_size: int, device: torch.device, layers: list[ProfileLayer] | None = None,
            calibration: LayerCalibrationRecord | None = None) -> dict:
    """One candidate (``layers``, default: fitted with ``options``; and its layer calibration):
    accuracy, share of images whose class is not the ANN's, relative output error against the ANN,
    and spikes per sample (units whose coded value is above zero)."""
    layers = fitted_layers(stats, neuron, options) if layers is None else layers
    net = transfer_network(gm, neuron, layers, calibration).to(device).eval()
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


def with_floors(layers: list[ProfileLayer], lowest: list[int], levels: int) -> list[ProfileLayer]:
    """``layers`` with per-layer dead zones: layer i sends levels ``lowest[i]`` and up
    (floor (j - 1/2) / K, whose ``lowest_level`` is j; 0 where j = 1)."""
    return [replace(layer, params={**layer.params, "floor": (j - 0.5) / levels if j > 1 else 0.0})
            for layer, j in zip(layers, lowest)]


class Candidates:
    """Measures candidates on the search images (each with its layer calibration, unless
    ``samples`` is 0) and keeps every one tried."""

    def __init__(self, gm, stats, neuron, options, data, batch_size, device, samples: int):
        self.gm, self.stats, self.neuron, self.options, self.data = gm, stats, neuron, options, data
        self.batch_size, self.device, self.samples = batch_size, device, samples
        self.reference = ann_outputs(gm, data, batch_size, device)
        self.tried: list[dict] = []
        self.images = self.targets = None  # the layer calibration's, drawn once

    def measure(self, setting: dict, layers: list[ProfileLayer] | None = None) -> dict:
        opts = {**self.options, **setting}
        layers = fitted_layers(self.stats, self.neuron, opts) if layers is None else layers
        calibration = None
        if self.samples:
            if self.images is None:
                self.images = correction_images(self.data, self.samples).to(self.device)
                with torch.inference_mode():
                    self.targets = ieee_float32(layer_calibration.ann_means)(
                        self.gm.to(self.device).eval(), list(self.stats), self.images, len(self.images))
            calibration = correction(self.gm, self.neuron, layers, self.images, self.device, self.targets)
        t = {**setting, **measure(self.gm, self.neuron, opts, self.stats, self.data, self.reference,
                                  self.batch_size, self.device, layers, calibration)}
        self.tried.append(t)
        return {**t, "_layers": layers, "_calibration": calibration}


RANKING_SAMPLES = 512  # search images each step of the walk is ranked on (a seeded random part)
MAX_STEPS = 8  # steps of the walk at each knob value


def refine(pool: Candidates, quick: Candidates, levels: int, budget: float, on_pass=None) -> dict:
    """Dead zones per layer at ``levels``: from none, raise the lowest level of one layer at a time
    by max(1, K / 24), the layer whose step costs the least output error per spike saved (ranked
    on ``quick``'s images, uncorrected: one forward pass a step), until the spikes are within
    ``budget``, no step saves any, or after ``MAX_STEPS``; the walk's end is measured on ``pool``'s
    images with its layer calibration (a candidate)."""
    knob = pool.neuron.precision.knob
    base = fitted_layers(pool.stats, pool.neuron, {**pool.options, knob: levels, "floor": 0.0})
    lowest, step = [1] * len(base), max(1, levels // 24)
    setting = lambda low: {knob: levels, "floor": 0.0, "layer_lowest": list(low)}  # noqa: E731
    current = quick.measure(setting(lowest), base)
    for _ in range(MAX_STEPS):
        if current["spikes_per_sample"] <= budget:  # within on the ranking images: measure it as a candidate
            final = pool.measure(setting(lowest), with_floors(base, lowest, levels))
            if final["spikes_per_sample"] <= budget:
                return final
            pool.tried.pop()  # over on all the images, corrected: walk on
        best = None
        for i in range(len(base)):
            if lowest[i] + step > levels:
                continue
            trial = [*lowest[:i], lowest[i] + step, *lowest[i + 1:]]
            t = quick.measure(setting(trial), with_floors(base, trial, levels))
            if on_pass:
                on_pass()
            saved = current["spikes_per_sample"] - t["spikes_per_sample"]
            if saved > 0 and (best is None or (t["output_error"] - current["output_error"]) / saved < best[0]):
                best = ((t["output_error"] - current["output_error"]) / saved, trial, t)
        if best is None:
            break
        _, lowest, current = best
    return pool.measure(setting(lowest), with_floors(base, lowest, levels))


def choose(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, data: TensorData,
           budget: float | None, batch_size: int, device: torch.device, correction_samples: int | None = None
           ) -> tuple[dict, ExactChoiceRecord, list[ProfileLayer], LayerCalibrationRecord | None]:
    """Returns (``options`` with the chosen resolution, the record of every candidate, the chosen
    layers, their layer calibration on ``correction_samples`` images, default all, 0 none).
    Without a budget nothing is corrected (the bar is on the code as it is)."""
    knob = neuron.precision.knob
    samples = (len(data) if correction_samples is None else correction_samples) if budget else 0
    pool = Candidates(gm, stats, neuron, options, data, batch_size, device, samples)
    sets = candidates(neuron, options, budget)
    measured = []
    with progress.task(f"{neuron.label} {knob}: forward passes (candidates)", len(sets)) as shown:
        for c in sets:
            measured.append(pool.measure(c))
            shown.advance(1)
    bar = None
    if budget is None:
        key = "output_error" if data.task == "regression" else "disagreement"
        bar = bar_for([t[key] for t in measured], len(data), data.task == "regression")
        met = [t for t in measured if t[key] <= bar + 1e-12]
        chosen = met[0] if met else measured[-1]
    else:
        best = lambda ts: min(ts, key=lambda t: (t["output_error"], t["spikes_per_sample"]))  # noqa: E731
        met = [t for t in measured if t["spikes_per_sample"] <= budget]
        around = best(met)[knob] if met else min(measured, key=lambda t: t["spikes_per_sample"])[knob]
        values = list(neuron.precision.values)
        near = values[max(0, values.index(around) - 1):values.index(around) + 2] \
            if "floor" in neuron.precision.budget_grid else []
        with progress.task(f"{neuron.label}: dead zones per layer at {knob} " + ", ".join(map(str, near)),
                           None) as shown:
            ranking = data if len(data) <= RANKING_SAMPLES else calibration_subset(data, RANKING_SAMPLES, 0)
            quick = Candidates(gm, stats, neuron, options, ranking, batch_size, device, 0)
            measured += [refine(pool, quick, k, budget, lambda: shown.advance(1)) for k in near]
        met = [t for t in measured if t["spikes_per_sample"] <= budget]
        chosen = best(met) if met else min(measured, key=lambda t: t["spikes_per_sample"])
    record = ExactChoiceRecord(knob=knob, samples=len(data), bar=bar, budget_spikes_per_sample=budget,
                               candidates=pool.tried, chosen={k: v for k, v in chosen.items() if not k.startswith("_")},
                               met=bool(met))
    return {**options, **{k: chosen[k] for k in sets[0]}}, record, chosen["_layers"], chosen["_calibration"]
