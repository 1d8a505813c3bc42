"""The operating point ``calibrate`` chooses by itself when the user names no precision and no
spike budget (docs/science.md sections 6 and 8).

The yardstick is the rate-coded baseline (IF at its defaults, run for its default steps) on the
search images (drawn from the calibration split, never the test set). For a classifier the
measure is the disagreement with the ANN - the share of images whose SNN class is not the ANN's,
which bounds the accuracy gap and, being paired, is less noisy on a few thousand images - with
one bar per margin of ``MARGINS``; for regression it is the output error against the ANN
(``budget.OutputError``), IF's final error the one bar. Each of the neuron's candidate option
sets (``Neuron.operating_points``) is simulated on the same images with its own fitted layer
scales. A classifier's bar is raised where the margin is below the best level a run shows
(``bars``): IF's final disagreement, or, where a candidate holds a lower one over the second
half of its run, that level plus one standard error (the noise of n images) - a network on which IF falls short
of the ANN gets the candidate that comes closest to it, not one as far off as IF. At every bar a
run costs the spikes per sample it has spent by the step from which it stays within the bar
(IF, where it never does, its whole run's: a lower bound on what it would need), and a
candidate's cost is its worst ratio to IF's over the bars. The cheapest candidate within every
bar for at least the second half of its steps wins (one that settles near its end may be
noise); otherwise ``fallback``, and the record says so.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ann2snn.sim import distributed
from ann2snn.search.budget import Agreement, OutputError, ann_outputs, fitted_layers, spiking_network
from ann2snn.conversion.statistics import LayerStats
from ann2snn.io.data import TensorData
from ann2snn.neurons import Neuron
from ann2snn.store.profile import OperatingPointRecord
from ann2snn.sim.network import Fanouts

MARGINS = (0.3, 0.1)  # accuracy points below the ANN's, loosest first, as the README's reports state them


def setting_text(candidate: dict) -> str:
    """A candidate's options as text, e.g. 'm_f=0.3 tau_gamma=2'; unset options (None) left out."""
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                    for k, v in candidate.items() if v is not None)


def settled(error: torch.Tensor, bar: float) -> int | None:
    """The first step index from which ``error`` stays at or below ``bar`` (None: never)."""
    above = (~(error <= bar * (1 + 1e-9) + 1e-12)).nonzero()  # NaN counts as above
    first = int(above[-1]) + 1 if len(above) else 0
    return first if first < len(error) else None


def reached(error: torch.Tensor, spikes: torch.Tensor, bars: list[float]) -> dict:
    """Per bar: the step (1-based) from which ``error`` stays within it and the spikes per sample
    spent by then (None where it never does)."""
    at = [settled(error, bar) for bar in bars]
    return {"settled_steps": [None if i is None else i + 1 for i in at],
            "spikes_by_then": [None if i is None else float(spikes[i]) for i in at]}


def cost(candidate: dict, baseline: dict, bars: int | None = None, by: int | None = None) -> float | None:
    """The worst ratio, over the bars (the first ``bars`` of them), of the candidate's spikes to
    the baseline's by the step each stays within the bar - the baseline's whole run where it
    never does (None if the candidate misses one, or, given ``by``, is not within one from step
    ``by`` on)."""
    pairs = list(zip(candidate["settled_steps"], candidate["spikes_by_then"], baseline["spikes_by_then"]))[:bars]
    if any(step is None or (by is not None and step > by) for step, _, _ in pairs):
        return None
    return max(c / max(b if b is not None else baseline["spikes_per_sample"], 1e-12) for _, c, b in pairs)


def late_error(error: torch.Tensor) -> float:
    """The lowest bar a run stays within for the second half of its steps: its worst error there."""
    return float(error[len(error) // 2:].max())


def bars(margins: tuple[float, ...], baseline_final: float, best_late: float, samples: int) -> list[float]:
    """A classifier's disagreement bars: each margin (in accuracy points, as a share), raised where
    it is below the best level a run shows - the baseline's final disagreement, or, where lower,
    the best candidate's ``late_error`` (its worst over the second half of its run) plus its
    binomial standard error sqrt(e (1 - e) / n): on n images a level is known to about that, and
    a bar at the best run's own level would pass the single luckiest candidate."""
    floor = min(baseline_final, best_late + math.sqrt(best_late * (1 - best_late) / max(samples, 1)))
    return [max(m / 100, floor) for m in margins]


FEW_IMAGES = 3  # a bar that allows fewer disagreeing images than this is decided by one image more or less


def few_image_bars(record: OperatingPointRecord) -> list[tuple[float, int, int]]:
    """The disagreement bars that allow fewer than ``FEW_IMAGES`` of the search images to
    disagree, each with that number and the search images on which the same bar would allow
    ``FEW_IMAGES`` (rounded up to two significant digits): which candidate stays within such a
    bar is partly chance (a count of k images varies by about sqrt(k) from one image set to the
    next). More search images narrow that noise; they do not lower a bar no candidate can meet,
    and a bar raised to a candidate's level plus its standard error moves with them
    (docs/science.md section 6)."""
    if not record.baseline["margins"]:
        return []
    out = []
    for bar in dict.fromkeys(record.baseline["bars"]):  # two margins raised to one level: said once
        allowed = math.floor(bar * record.samples + 1e-9)
        if allowed < FEW_IMAGES and bar > 0:
            need = math.ceil(FEW_IMAGES / bar - 1e-9)
            unit = 10 ** max(0, len(str(need)) - 2)
            out.append((bar, allowed, unit * math.ceil(need / unit)))
    return out


def fallback(tried: list[dict], baseline: dict) -> dict:
    """Where no candidate stays within every bar from the first half of its run on: the cheapest
    (worst ratio to the baseline) of those within every bar from a later step, else of those
    within the most bars, loosest first; where none is within any, the least final error."""
    def within(t: dict) -> int:
        return next((i for i, s in enumerate(t["spikes_by_then"]) if s is None), len(t["spikes_by_then"]))
    most = max(within(t) for t in tried)
    if most == 0:
        return min(tried, key=lambda t: (t["final_error"], t["spikes_per_sample"]))
    return min((t for t in tried if within(t) == most), key=lambda t: (cost(t, baseline, most), t["final_error"]))


def choose(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, baseline: Neuron,
           data: TensorData, batch_size: int, device: torch.device) -> tuple[dict, OperatingPointRecord]:
    """Returns (``options`` with the chosen candidate's values, the record of every candidate)."""
    reference = ann_outputs(gm, data, batch_size, device)
    fanouts = Fanouts(gm, data.sample_shape)
    classify = data.task == "classification"

    def run(kind: Neuron, opts: dict, timesteps: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(share of samples whose class is not the ANN's, or output error, after each step;
        spikes per sample by then)"""
        net = spiking_network(gm, kind, fitted_layers(stats, kind, opts), opts, data, timesteps, device, fanouts)
        observer = Agreement(reference.argmax(1), timesteps) if classify else OutputError(reference, timesteps)
        sim = net.simulate(data, timesteps, batch_size, device, observers=[observer],
                           label=f"operating point: {label}")
        error = 1.0 - observer.per_step / len(data) if classify else observer.per_step()
        return error, sim.spikes.sum(0).cumsum(0) / len(data)

    base_options = baseline.options({"percentile": options["percentile"]} if "percentile" in baseline.defaults
                                    and "percentile" in options else {})
    base_error, base_spikes = run(baseline, base_options, baseline.default_timesteps, f"{baseline.label} bar")
    steps = neuron.default_timesteps
    ranks = distributed.current()  # under torchrun the ranks share the candidates, each all the images
    mine = []
    with ranks.phase():
        for i in range(ranks.rank, len(neuron.operating_points), ranks.world):
            candidate = neuron.operating_points[i]
            error, spikes = run(neuron, {**options, **candidate}, steps, setting_text(candidate))
            mine.append((i, error.cpu(), spikes.cpu()))  # gathered across ranks: no device tensors
    runs = sorted((r for share in ranks.gather(mine) for r in share), key=lambda r: r[0])
    final = float(base_error[-1])
    limits = (bars(MARGINS, final, min(late_error(e) for _, e, _ in runs), len(data)) if classify else [final])
    base = {"neuron": baseline.name, "options": base_options, "timesteps": baseline.default_timesteps,
            "measure": "disagreement" if classify else "output error",
            "margins": list(MARGINS) if classify else None, "bars": limits, "final_error": final,
            "spikes_per_sample": float(base_spikes[-1]), **reached(base_error, base_spikes, limits)}
    tried = []
    for i, error, spikes in runs:
        row = {**neuron.operating_points[i], "final_error": float(error[-1]), "late_error": late_error(error),
               "spikes_per_sample": float(spikes[-1]), **reached(error, spikes, limits)}
        tried.append({**row, "cost": cost(row, base, by=steps // 2 + 1)})
    keys = list(neuron.operating_points[0])
    met = [t for t in tried if t["cost"] is not None]
    chosen = min(met, key=lambda t: (t["cost"], t["final_error"])) if met else fallback(tried, base)
    record = OperatingPointRecord(baseline=base, timesteps=steps, samples=len(data), candidates=tried,
                                  chosen=chosen, bar_met=bool(met))
    return {**options, **{k: chosen[k] for k in keys}}, record
