"""Calibration statistics: exact activation statistics of every ReLU slot (``LayerStats``).

Percentiles are exact order statistics of all activations of a layer over the calibration
set (nearest rank: the smallest value v with at least q% of the activations <= v), found in a
few streaming passes - a count/max pass, bucket histograms that narrow the interval holding
the k-th value, and a final pass that collects only that interval and sorts it. Counts are
integers, so the result depends neither on batch size nor on data order, and memory stays
bounded whatever the size of the set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from ann2snn import progress
from ann2snn.conversion.graph import Slot, analog_fed, slot_activations, spiking_layers
from ann2snn.io.data import TensorData
from ann2snn.errors import UserError

BINS = 4096
COLLECT_CAP = 2_000_000
MAX_PASSES = 10
SAMPLE_IMAGES = 256  # the first images' positive activations are kept for transfer fits
SAMPLE_CAP = 400_000
QUANTILES = 257
CHANNEL_QUANTILES = 33


@dataclass(kw_only=True)
class LayerStats:
    """What a neuron's ``fit`` sees of one spiking layer: its activation, size and statistics,
    and ``sample``, positive activations of the first calibration images (from a profile: its
    quantile table of them); per channel, the activations (``channel_values``) or, from a
    profile, quantile tables and positive fractions."""

    activation: str = "relu"
    neurons: int
    shape: list[int] = field(default_factory=list)
    max: float
    mean: float = 0.0
    percentile: float
    zero_fraction: float = 0.0
    sample: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    sample_positive_fraction: float = 1.0
    negative_energy_fraction: float = 0.0
    analog_input: bool | None = None  # reached by the analog input through no other slot (graph.analog_fed); None: not known
    channel_values: torch.Tensor | None = None  # [channels, values], calibration activations
    channel_quantiles: list[list[float]] | None = None
    channel_positive_fraction: list[float] | None = None


class ExactQuantile:
    """Streaming exact nearest-rank quantile of non-negative values over repeated passes."""

    def __init__(self, q: float):
        self.q = q
        self.n, self.zeros, self.max, self.sum = 0, 0, 0.0, 0.0
        self.phase, self.lo, self.hi, self.k = "scan", 0.0, 0.0, 0
        self.value: float | None = None
        self._begin()

    def _begin(self) -> None:
        self.below = 0
        self.hist = torch.zeros(BINS, dtype=torch.long)
        self.kept: list[torch.Tensor] = []
        if self.phase in ("hist", "collect"):
            self.edges = torch.linspace(self.lo, self.hi, BINS + 1, dtype=torch.float64).float()
            self.edges[0], self.edges[-1] = self.lo, self.hi

    @property
    def done(self) -> bool:
        return self.value is not None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float()
        if self.phase == "scan":
            self.n += x.numel()
            self.zeros += int((x <= 0).sum())
            self.max = max(self.max, float(x.max())) if x.numel() else self.max
            self.sum += float(x.double().sum())
            return
        lo, hi = self.edges[0].to(x.device), self.edges[-1].to(x.device)
        self.below += int((x <= lo).sum())
        inside = x[(x > lo) & (x <= hi)]
        if self.phase == "hist":
            idx = torch.bucketize(inside, self.edges.to(x.device), right=False) - 1
            self.hist += torch.bincount(idx.clamp(0, BINS - 1), minlength=BINS).cpu()
        else:
            self.kept.append(inside.cpu())

    def end_pass(self, passes: int) -> None:
        if self.phase == "scan":
            self.k = min(max(math.ceil(self.q / 100.0 * self.n), 1), self.n)
            if self.n == 0 or self.k <= self.zeros:
                self.value = 0.0
                return
            self.phase, self.lo, self.hi = "hist", 0.0, self.max
        elif self.phase == "hist":
            cum = self.below + torch.cumsum(self.hist, 0)
            b = int(torch.searchsorted(cum, torch.tensor(self.k)))
            b = min(b, BINS - 1)
            new_lo, new_hi = float(self.edges[b]), float(self.edges[b + 1])
            count = int(self.hist[b])
            self.lo, self.hi = new_lo, new_hi
            if count <= COLLECT_CAP or new_hi <= new_lo or passes >= MAX_PASSES - 1:
                self.phase = "collect"
        else:
            values = torch.cat(self.kept).sort().values if self.kept else torch.zeros(0)
            i = self.k - self.below - 1
            if values.numel() == 0:
                self.value = float(self.lo)
            else:
                self.value = float(values[min(max(i, 0), values.numel() - 1)])
            return
        self._begin()


class _SlotRecorder:
    """A forward hook on one slot that gathers, over the calibration passes, its output shape,
    its ``ExactQuantile`` and, on the first pass, what the first ``SAMPLE_IMAGES`` images give:
    positive activations, per-channel activations and the energy below zero."""

    def __init__(self, name: str, percentile: float, seen: dict):
        self.name, self.seen = name, seen  # seen: images run so far, whether in the first pass
        self.quant = ExactQuantile(percentile)
        self.shape: tuple | None = None
        self.kept: list[torch.Tensor] = []
        self.channels: list[torch.Tensor] = []
        self.entries = 0
        self.energy = torch.zeros(2, dtype=torch.float64)  # sum out^2 below 0, sum out^2

    def __call__(self, _m, _inp, out: torch.Tensor) -> None:
        self.shape = tuple(out.shape[1:])
        if self.seen["first_pass"] and not bool(torch.isfinite(out).all()):
            raise UserError(f"layer {self.name}: its activations overflow (infinite or NaN) on the calibration "
                            "data; check the input normalisation and the weights")
        if self.seen["first_pass"] and self.seen["images"] < SAMPLE_IMAGES:
            self._sample(out[:SAMPLE_IMAGES - self.seen["images"]].detach().clone())  # kept: never a view
        if not self.quant.done:
            self.quant.update(out)

    def _sample(self, head: torch.Tensor) -> None:
        self.channels.append(head.transpose(0, 1).reshape(head.shape[1], -1).float().cpu())
        head = head.flatten()
        self.kept.append(head[head > 0].float().cpu())
        self.entries += head.numel()
        sq = head.double() ** 2
        self.energy += torch.stack([sq[head < 0].sum(), sq.sum()]).cpu()

    def stats(self, activation: str, analog_input: bool) -> LayerStats:
        q = self.quant
        return LayerStats(
            activation=activation, neurons=math.prod(self.shape), shape=list(self.shape), max=q.max,
            analog_input=analog_input,
            negative_energy_fraction=float(self.energy[0] / self.energy[1].clamp(min=1e-300)),
            mean=q.sum / max(q.n, 1), percentile=q.value, zero_fraction=q.zeros / max(q.n, 1),
            sample=_strided(torch.cat(self.kept) if self.kept else torch.zeros(0), SAMPLE_CAP),
            sample_positive_fraction=sum(k.numel() for k in self.kept) / max(self.entries, 1),
            channel_values=_strided_columns(torch.cat(self.channels, 1), SAMPLE_CAP))


def activation_stats(gm: fx.GraphModule, data: TensorData, percentile: float, batch_size: int = 256,
                     device: str = "cpu") -> dict[str, LayerStats]:
    """Run ``data`` through the normalised ANN; per ReLU slot: neurons, max, mean, exact percentile,
    and ``sample``, the positive activations of the first ``SAMPLE_IMAGES`` images (strided down
    to ``SAMPLE_CAP`` values) that transfer-function and threshold fits use, with
    ``sample_positive_fraction``, the fraction of those images' activations that are positive, and
    ``negative_energy_fraction``, the share of sum(out^2) below zero (GELU, SiLU: what a gate
    that passes positive values only drops)."""
    gm = gm.to(device).eval()
    seen = {"images": 0, "first_pass": True}
    recorders = {name: _SlotRecorder(name, percentile, seen) for name in spiking_layers(gm)}
    hooks = []
    for name, recorder in recorders.items():
        module = gm.get_submodule(name)
        assert isinstance(module, Slot)
        hooks.append(module.register_forward_hook(recorder))
    try:
        _run_passes(gm, data, [r.quant for r in recorders.values()], seen, batch_size, device)
    finally:
        for h in hooks:
            h.remove()
    acts, analog = slot_activations(gm), analog_fed(gm)
    return {name: r.stats(acts[name], name in analog) for name, r in recorders.items()}


def _run_passes(gm: fx.GraphModule, data: TensorData, quants: list[ExactQuantile], seen: dict,
                batch_size: int, device: str) -> None:
    """Pass ``data`` through ``gm`` (its hooks record) until every quantile is found."""
    with torch.no_grad(), progress.task("calibration statistics (images, all passes)", None) as shown:
        for passes in range(MAX_PASSES + 2):
            if all(q.done for q in quants):
                break
            for x, _ in data.batches(batch_size):
                gm(x.to(device))
                seen["images"] += len(x)
                shown.advance(len(x))
            seen["first_pass"] = False
            for q in quants:
                if not q.done:
                    q.end_pass(passes)


def _strided_columns(values: torch.Tensor, cap: int) -> torch.Tensor:
    if values.numel() <= cap:
        return values
    cols = max(cap // values.shape[0], 1)
    return values[:, torch.linspace(0, values.shape[1] - 1, cols).long()]


def _strided(values: torch.Tensor, cap: int) -> torch.Tensor:
    if values.numel() <= cap:
        return values
    return values[torch.linspace(0, values.numel() - 1, cap).long()]


def quantile_table(sample: torch.Tensor, n: int = QUANTILES) -> list[float]:
    """An evenly spaced quantile table of the positive activations (kept in profiles so that
    options can be re-fitted later without the calibration data)."""
    if sample.numel() == 0:
        return []
    q = torch.quantile(sample.double()[torch.linspace(0, sample.numel() - 1, min(sample.numel(), 1 << 24)).long()],
                       torch.linspace(0, 1, n, dtype=torch.float64))
    return [float(f"{v:.6g}") for v in q.tolist()]
