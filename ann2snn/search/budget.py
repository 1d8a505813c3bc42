"""Operating-point search for a spike budget on the calibration images.

``search``: try each value of the neuron's precision knob (ASN: m_f, VSN: the error/spike
trade-off), simulate, and keep the setting within the budget whose output is closest to the
ANN's: the least relative output error sum ||a y_snn - y_ann||^2 / sum ||y_ann - mean y_ann||^2
over the search images, after the best single gain a on y_snn (``OutputError``; regression:
the least NMSE against the targets). Accuracy on a few hundred training images saturates (most
candidates tie near 100%), so ranking by it picked the sparsest setting whatever the budget;
the output error is continuous and falls as the SNN gets closer to the ANN. Per-layer scales are
refitted for every candidate, since the measured transfer function depends on the knob.

``search_arousal``: the arousal threshold. Raising it arouses more inputs, so spikes (and
accuracy) grow with it; bisection finds the largest threshold within the budget."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import fx

from ann2snn.conversion import bias_ramp, layer_calibration
from ann2snn.sim import distributed
from ann2snn.sim.arousal import ArousalController, start_layers
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.store.artifact import build_neurons
from ann2snn.conversion.bias_ramp import BiasRampRecord
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.conversion.statistics import LayerStats
from ann2snn.conversion.graph import to_snn
from ann2snn.io.data import TensorData
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons import Neuron
from ann2snn.store.profile import ProfileLayer, SearchRecord
from ann2snn.sim.network import Fanouts, Network, build_network
from ann2snn.sim.simulate import ieee_float32, nmse


def fitted_layers(stats: dict[str, LayerStats], neuron: Neuron, options: dict) -> list[ProfileLayer]:
    """The layers fitted to ``stats`` with ``options`` (as a profile would hold them)."""
    return [ProfileLayer(name=name, activation=s.activation, neurons=s.neurons, params=neuron.fit(s, options))
            for name, s in stats.items()]


RAMP_SAMPLES = 256  # images the bias ramps are fitted on


def fit_ramps(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer], data: TensorData, timesteps: int,
              device: torch.device) -> list[BiasRampRecord]:
    """The bias ramps of the SNN of ``layers``, fitted on the first ``RAMP_SAMPLES`` images of
    ``data`` over ``timesteps`` steps (``bias_ramp.fit``)."""
    x, _ = next(data.head(RAMP_SAMPLES).batches(RAMP_SAMPLES))
    try:
        return ieee_float32(bias_ramp.fit)(gm, to_snn(gm, build_neurons(neuron, layers)),
                                           [layer.name for layer in layers], x, timesteps, device)
    except torch.OutOfMemoryError:
        raise UserError(f"fitting the bias ramps: {len(x)} images of this network do not fit in {device} memory at "
                        "once; run on the CPU or calibrate with --param bias_ramp=false") from None


def fit_layer_calibration(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer], data: TensorData,
                          timesteps: int, samples: int, device: torch.device,
                          ramps: list[BiasRampRecord] | None = None,
                          on_layer: Callable[[], None] | None = None) -> LayerCalibrationRecord:
    """The layer calibration of the SNN of ``layers`` (with its bias ramps), fitted on the first
    ``samples`` images of ``data`` over ``timesteps`` steps (``layer_calibration.fit``)."""
    x, _ = next(data.head(samples).batches(samples))
    try:
        snn = to_snn(gm, build_neurons(neuron, layers), ramps=ramps)
        return ieee_float32(layer_calibration.fit)(gm, snn, [layer.name for layer in layers], x, timesteps, device,
                                                       on_layer=on_layer)
    except torch.OutOfMemoryError:
        raise UserError(f"fitting the layer calibration: this network does not fit in {device} memory; run on the "
                        "CPU or calibrate with --layer-calibration 0") from None


def spiking_network(gm: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer], options: dict,
                    data: TensorData, timesteps: int, device: torch.device, fanouts: Fanouts) -> Network:
    """The network of ``layers`` (``network.build_network``) with, when ``options`` ask for them
    (``bias_ramp``), its bias ramps (``fit_ramps`` on ``data``)."""
    ramps = fit_ramps(gm, neuron, layers, data, timesteps, device) if options.get("bias_ramp") else None
    return build_network(gm, neuron, layers, options, timesteps, fanouts, ramps=ramps)


def search(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, data: TensorData,
           budget: float, timesteps: int, batch_size: int, device: torch.device) -> tuple[dict, SearchRecord]:
    """Returns (options with the chosen knob value, a record of every candidate)."""
    if neuron.precision is None:
        raise OptionError("budget", f": neuron {neuron.name!r} has no precision knob to search (use asn)")
    if budget <= 0:
        raise OptionError("budget", f"{budget}: must be positive")
    if timesteps <= 0:
        raise OptionError("timesteps", f"{timesteps}: must be positive")
    knob, values = neuron.precision.knob, neuron.precision.values
    regression = data.task == "regression"
    metric = "nmse" if regression else "accuracy"
    fanouts = Fanouts(gm, data.sample_shape)
    reference = None if regression else ann_outputs(gm, data, batch_size, device)
    ranks = distributed.current()  # under torchrun the ranks share the candidates, each all the images
    mine = []
    with ranks.phase():  # a rank that fails ends every rank here, before the exchange
        for value in values[ranks.rank::ranks.world]:
            opts = {**options, knob: value}
            net = spiking_network(gm, neuron, fitted_layers(stats, neuron, opts), opts, data, timesteps, device,
                                  fanouts)
            observer = None if regression else OutputError(reference, timesteps)
            sim = net.simulate(data, timesteps, batch_size, device, observers=[observer] if observer else [],
                               label=f"budget search {knob}={value:g}")
            quality = nmse(float(sim.metric[-1]), data) if regression else float(sim.metric[-1]) / len(data)
            mine.append({knob: value, "spikes_per_sample": float(sim.spikes.sum()) / len(data), metric: quality,
                         **({} if regression else {"output_error": observer.relative()})})
    done = {t[knob]: t for share in ranks.gather(mine) for t in share}
    tried = [done[v] for v in values]
    within = [t for t in tried if t["spikes_per_sample"] <= budget]
    error = "nmse" if regression else "output_error"
    chosen = min(within, key=lambda t: (t[error], t["spikes_per_sample"])) if within else \
        min(tried, key=lambda t: t["spikes_per_sample"])
    record = SearchRecord(budget_spikes_per_sample=budget, timesteps=timesteps, samples=len(data), knob=knob,
                          candidates=tried, chosen=chosen, budget_met=bool(within))
    return {**options, knob: chosen[knob]}, record


@ieee_float32
@torch.inference_mode()
def ann_outputs(gm: fx.GraphModule, data: TensorData, batch_size: int, device: torch.device) -> torch.Tensor:
    """The ANN's outputs [N, outputs] on ``data``, in float64 on the CPU."""
    gm = gm.to(device).eval()
    return torch.cat([gm(x.to(device)).reshape(len(x), -1).double().cpu() for x, _ in data.batches(batch_size)])


class Agreement:
    """A ``simulate.Observer``: per step, the samples whose readout argmax is the ANN's class
    ``ann_class``. Unlike accuracy it does not credit an SNN for errors that land on samples the
    ANN gets wrong too."""

    def __init__(self, ann_class: torch.Tensor, timesteps: int):
        self.ann_class, self.last = ann_class, timesteps - 1
        self.per_step = torch.zeros(timesteps, dtype=torch.float64)
        self.done = self.start = 0

    def reset(self, batch: int, device: torch.device) -> None:
        self.start, self.batch = self.done, batch
        self._count = torch.zeros(self.last + 1, dtype=torch.float64, device=device)

    def __call__(self, t: int, score: torch.Tensor) -> None:
        ref = self.ann_class[self.start:self.start + self.batch].to(score.device)
        self._count[t] += (score.reshape(len(ref), -1).argmax(1) == ref).sum()
        if t == self.last:
            self.per_step += self._count.cpu()
            self.done = self.start + self.batch


class OutputError:
    """A ``simulate.Observer``: after every step it accumulates <y_snn(t), y_ann> and
    ||y_snn(t)||^2 over the batch's samples."""

    def __init__(self, reference: torch.Tensor, timesteps: int):
        self.reference, self.last = reference, timesteps - 1
        self.done = self.start = 0
        self.cross = torch.zeros(timesteps, dtype=torch.float64)
        self.own = torch.zeros(timesteps, dtype=torch.float64)
        self._cross = self._own = None

    def reset(self, batch: int, device: torch.device) -> None:
        self.start, self.batch = self.done, batch
        self._cross = torch.zeros(self.last + 1, dtype=torch.float64, device=device)
        self._own = torch.zeros_like(self._cross)

    def __call__(self, t: int, score: torch.Tensor) -> None:
        ref = self.reference[self.start:self.start + self.batch].to(score.device)
        out = score.reshape(len(ref), -1).double()
        self._cross[t] += (out * ref).sum()
        self._own[t] += (out * out).sum()
        if t == self.last:  # the batch is whole
            self.cross += self._cross.cpu()
            self.own += self._own.cpu()
            self.done = self.start + self.batch

    def relative(self) -> float:
        """The error after the last step (``per_step``)."""
        return float(self.per_step()[-1])

    def per_step(self) -> torch.Tensor:
        """min_a sum ||a y_snn(t) - y_ann||^2 / sum ||y_ann - mean y_ann||^2 at every step t: the
        error left after the best single gain a (a low-pass readout has not settled after t
        steps, and a class decision does not depend on scale); 0 when the SNN reproduces the
        ANN's outputs."""
        r = self.reference[:self.done]  # the samples seen so far (all of them after a whole run)
        fitted = torch.where(self.own > 0, self.cross ** 2 / self.own.clamp(min=1e-300), torch.zeros_like(self.own))
        residual = (float((r * r).sum()) - fitted).clamp(min=0.0)
        return residual / max(float(((r - r.mean(0)) ** 2).sum()), 1e-30)


def search_arousal(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict,
                   policy: ArousalPolicy, data: TensorData, budget: float, timesteps: int, batch_size: int,
                   device: torch.device, bisections: int = 6) -> tuple[ArousalPolicy, SearchRecord]:
    """Returns (``policy`` with the chosen threshold, a record of every threshold tried). The
    network is built as ``evaluate --arousal`` builds it: layers fitted with ``options``, then
    started at the policy's start precision (ASN: m_f = ``policy.low``). Needs class scores
    (``arousal.check_class_scores``) and a neuron with ``precision_control``."""
    control = neuron.precision_control
    params = start_layers(control, policy, fitted_layers(stats, neuron, options))
    net = build_network(gm, neuron, params, options, timesteps, Fanouts(gm, data.sample_shape))  # no bias ramps:
    tried: list[dict] = []  # evaluate runs arousal without them

    ranks = distributed.current()  # under torchrun each rank simulates its shard of the images
    part = ranks.shard(len(data))
    shard = data.subset(torch.arange(part.start, part.stop))

    def run(threshold: float) -> dict:
        controller = ArousalController(replace(policy, threshold=threshold), control)
        with ranks.phase():
            sim = net.simulate(shard, timesteps, batch_size, device, controller=controller,
                               label=f"arousal threshold {threshold:.3g}")
        spikes, correct, aroused = ranks.sum(torch.tensor([float(sim.spikes.sum()), float(sim.metric[-1]),
                                                           controller.count()], dtype=torch.float64)).tolist()
        tried.append({"threshold": threshold, "spikes_per_sample": spikes / len(data),
                      "accuracy": correct / len(data), "fraction_aroused": aroused / len(data)})
        return tried[-1]

    none, every = run(0.0), run(1.0)  # certainty < 0: nobody aroused; < 1: (nearly) everybody
    chosen = every if every["spikes_per_sample"] <= budget else none
    if none["spikes_per_sample"] <= budget < every["spikes_per_sample"]:
        lo, hi = 0.0, 1.0
        for _ in range(bisections):
            mid = run((lo + hi) / 2)
            if mid["spikes_per_sample"] <= budget:
                lo, chosen = mid["threshold"], mid
            else:
                hi = mid["threshold"]
    record = SearchRecord(budget_spikes_per_sample=budget, timesteps=timesteps, samples=len(data), knob="threshold",
                          candidates=sorted(tried, key=lambda t: t["threshold"]), chosen=chosen,
                          budget_met=chosen["spikes_per_sample"] <= budget)
    return replace(policy, threshold=chosen["threshold"]), record
