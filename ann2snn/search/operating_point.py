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
noise); otherwise ``fallback``, and the record says so. On 512 search images or more the
candidates race (``race.py``): the worse half leaves after each round of images, and the choice
is made among the two that ran on every image.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ann2snn.search import race
from ann2snn.sim import distributed
from ann2snn.search.budget import ann_outputs, fitted_layers, spiking_network
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


def bars_within(row: dict) -> int:
    """How many of the bars, loosest first, a run stays within (from some step on)."""
    return next((i for i, s in enumerate(row["spikes_by_then"]) if s is None), len(row["spikes_by_then"]))


def fallback(tried: list[dict], baseline: dict) -> dict:
    """Where no candidate stays within every bar from the first half of its run on: the cheapest
    (worst ratio to the baseline) of those within every bar from a later step, else of those
    within the most bars, loosest first; where none is within any, the least final error."""
    most = max(bars_within(t) for t in tried)
    if most == 0:
        return min(tried, key=lambda t: (t["final_error"], t["spikes_per_sample"]))
    return min((t for t in tried if bars_within(t) == most),
               key=lambda t: (cost(t, baseline, most), t["final_error"]))


def ranked(runs: list[tuple[int, torch.Tensor, torch.Tensor]], base_error: torch.Tensor, base_spikes: torch.Tensor,
           images: int, steps: int) -> list[int]:
    """The candidates of ``runs`` (index, error, spikes per sample after each step, on ``images``
    search images) best first, as the race ranks them (``race.py``): within the bars widened by
    two standard errors from the first half of the run on, by cost; then by the bars they stay
    within and their final error."""
    limits = race.widened(bars(MARGINS, float(base_error[-1]), min(late_error(e) for _, e, _ in runs), images),
                          images)
    base = {"spikes_per_sample": float(base_spikes[-1]), **reached(base_error, base_spikes, limits)}
    keys = []
    for i, error, spikes in runs:
        row = {"spikes_per_sample": float(spikes[-1]), **reached(error, spikes, limits)}
        c = cost(row, base, by=steps // 2 + 1)
        keys.append(((0, c, float(error[-1])) if c is not None else (1, -bars_within(row), float(error[-1])), i))
    return [i for _, i in sorted(keys)]


def choose(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, baseline: Neuron,
           data: TensorData, batch_size: int, device: torch.device) -> tuple[dict, OperatingPointRecord]:
    """Returns (``options`` with the chosen candidate's values, the record of every candidate).
    The candidates race (``race.py``): those out of it after a round are recorded with the
    images they ran on."""
    reference = ann_outputs(gm, data, batch_size, device)
    fanouts = Fanouts(gm, data.sample_shape)
    classify = data.task == "classification"

    def entrant(kind: Neuron, opts: dict, timesteps: int) -> race.Entrant:
        net = spiking_network(gm, kind, fitted_layers(stats, kind, opts), opts, data, timesteps, device, fanouts)
        return race.Entrant(net, reference, timesteps, classify)

    base_options = baseline.options({"percentile": options["percentile"]} if "percentile" in baseline.defaults
                                    and "percentile" in options else {})
    base = entrant(baseline, base_options, baseline.default_timesteps)
    steps, points = neuron.default_timesteps, neuron.operating_points
    ranks = distributed.current()  # under torchrun candidate i runs on rank i % world, on all the images
    mine: dict[int, race.Entrant] = {}
    alive, left = list(range(len(points))), {}
    for images in race.rounds(len(data), not classify):
        images = images if len(alive) > race.KEEP else len(data)
        base.run_to(data, images, batch_size, device, f"operating point: {baseline.label} bar")
        with ranks.phase():
            for i in (i for i in alive if i % ranks.world == ranks.rank):
                mine[i] = mine.get(i) or entrant(neuron, {**options, **points[i]}, steps)
                mine[i].run_to(data, images, batch_size, device, f"operating point: {setting_text(points[i])}")
        runs = sorted((r for share in ranks.gather([(i, *mine[i].curves()) for i in alive if i in mine])
                       for r in share), key=lambda r: r[0])  # gathered across ranks: CPU tensors
        if images == len(data):
            break
        setter = min(runs, key=lambda r: (late_error(r[1]), r[0]))[0]
        keep = race.survivors(ranked(runs, *base.curves(), images, steps), setter)
        left.update({r[0]: (images, r) for r in runs if r[0] not in keep})
        alive = sorted(keep)
    return _decide(neuron, options, baseline, base_options, base, runs, left, len(data), classify)


def _decide(neuron: Neuron, options: dict, baseline: Neuron, base_options: dict, base: race.Entrant, runs: list,
            left: dict, samples: int, classify: bool) -> tuple[dict, OperatingPointRecord]:
    """The choice among the candidates that ran on every search image (``runs``), and the record
    (with those that left the race earlier, ``left``: their images and totals then)."""
    base_error, base_spikes = base.curves()
    steps, points = neuron.default_timesteps, neuron.operating_points
    final = float(base_error[-1])
    limits = (bars(MARGINS, final, min(late_error(e) for _, e, _ in runs), samples) if classify else [final])
    base_row = {"neuron": baseline.name, "options": base_options, "timesteps": baseline.default_timesteps,
                "measure": "disagreement" if classify else "output error",
                "margins": list(MARGINS) if classify else None, "bars": limits, "final_error": final,
                "spikes_per_sample": float(base_spikes[-1]), **reached(base_error, base_spikes, limits)}
    rows = {}
    for images, (i, error, spikes) in [(samples, r) for r in runs] + list(left.values()):
        row = {**points[i], "final_error": float(error[-1]), "late_error": late_error(error),
               "spikes_per_sample": float(spikes[-1]), **reached(error, spikes, limits), "images": images}
        rows[i] = {**row, "cost": cost(row, base_row, by=steps // 2 + 1) if images == samples else None}
    tried = [rows[i] for i in sorted(rows)]
    full = [t for t in tried if t["images"] == samples]
    met = [t for t in full if t["cost"] is not None]
    chosen = min(met, key=lambda t: (t["cost"], t["final_error"])) if met else fallback(full, base_row)
    record = OperatingPointRecord(baseline=base_row, timesteps=steps, samples=samples, candidates=tried,
                                  chosen=chosen, bar_met=bool(met))
    return {**options, **{k: chosen[k] for k in points[0]}}, record
