"""The operating point ``calibrate`` chooses by itself when the user names no precision and no
spike budget (docs/science.md section 6).

The bar is the rate-coded baseline (IF at its defaults, run for its default steps): its output
error against the ANN after its last step, on the search images (drawn from the training
split, never the test set). Each of the neuron's candidate option sets
(``Neuron.operating_points``) is simulated on the same images; its cost is the spikes per
sample it has spent by the step from which its own output error stays at or below the bar
(``budget.OutputError``: relative squared error after the best single gain). The cheapest
candidate that meets the bar wins; when none does, the one with the least final error, and the
record says so. Per-layer scales are fitted for every candidate, as ``calibrate`` fits them.
"""

from __future__ import annotations

import torch
from torch import fx

from . import distributed
from .budget import OutputError, ann_outputs, fitted_layers, spiking_network
from .calibration import LayerStats
from .data import TensorData
from .energy import fanout_maps
from .neurons import Neuron
from .profile import OperatingPointRecord
from .simulate import simulate


def setting_text(candidate: dict) -> str:
    """A candidate's options as text, e.g. 'm_f=0.3 tau_gamma=2'; unset options (None) left out."""
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{k}={v}"
                    for k, v in candidate.items() if v is not None)


def settled(error: torch.Tensor, bar: float) -> int | None:
    """The first step index from which ``error`` stays at or below ``bar`` (None: never)."""
    above = (~(error <= bar * (1 + 1e-9))).nonzero()  # NaN counts as above
    first = int(above[-1]) + 1 if len(above) else 0
    return first if first < len(error) else None


def choose(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict, baseline: Neuron,
           data: TensorData, batch_size: int, device: torch.device) -> tuple[dict, OperatingPointRecord]:
    """Returns (``options`` with the chosen candidate's values, the record of every candidate)."""
    reference = ann_outputs(gm, data, batch_size, device)
    fan = fanout_maps(gm, data.sample_shape)

    def run(kind: Neuron, opts: dict, timesteps: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        snn, _ = spiking_network(gm, kind, fitted_layers(stats, kind, opts), opts, data, timesteps, device)
        observer = OutputError(reference, timesteps)
        sim = simulate(snn, list(stats), fan, data, timesteps, batch_size, device,
                       kind.readout_for(opts, timesteps), controller=observer, label=f"operating point: {label}")
        return observer.per_step(), sim.spikes.sum(0).cumsum(0) / len(data)

    base_options = baseline.options({"percentile": options["percentile"]} if "percentile" in baseline.defaults
                                    and "percentile" in options else {})
    base_error, base_spikes = run(baseline, base_options, baseline.default_timesteps, f"{baseline.label} bar")
    bar = float(base_error[-1])
    steps = neuron.default_timesteps
    ranks = distributed.current()  # under torchrun the ranks share the candidates, each all the images
    mine = []
    with ranks.phase():
        for i in range(ranks.rank, len(neuron.operating_points), ranks.world):
            candidate = neuron.operating_points[i]
            error, spikes = run(neuron, {**options, **candidate}, steps,
                                setting_text(candidate))
            at = settled(error, bar)
            mine.append({**candidate, "output_error": float(error[-1]), "spikes_per_sample": float(spikes[-1]),
                         "settled_step": None if at is None else at + 1,
                         "spikes_by_then": None if at is None else float(spikes[at])})
    tried = sorted((t for share in ranks.gather(mine) for t in share),
                   key=lambda t: neuron.operating_points.index({k: t[k] for k in neuron.operating_points[0]}))
    met = [t for t in tried if t["settled_step"] is not None]
    chosen = min(met, key=lambda t: (t["spikes_by_then"], t["output_error"])) if met else \
        min(tried, key=lambda t: t["output_error"])
    at = settled(base_error, bar)
    record = OperatingPointRecord(
        baseline={"neuron": baseline.name, "options": base_options, "timesteps": baseline.default_timesteps,
                  "output_error": bar, "spikes_per_sample": float(base_spikes[-1]),
                  "settled_step": at + 1, "spikes_by_then": float(base_spikes[at])},
        timesteps=steps, samples=len(data), candidates=tried, chosen=chosen, bar_met=bool(met))
    return {**options, **{k: chosen[k] for k in neuron.operating_points[0]}}, record
