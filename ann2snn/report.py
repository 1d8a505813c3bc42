"""The evaluation report: ``report.json``, ``curve.csv``, ``accuracy_vs_spikes.png`` and the
summary table. One step is 1 ms, so a rate in Hz is spikes / neuron / step x 1000."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

from rich.table import Table

from . import __version__, neurons
from .energy import PRESETS, ann_energy_pj, snn_energy_pj
from .files import atomic_path
from .simulate import SimulationResult

ENERGY_REGIME = ("Horowitz 2014, 45 nm, compute only. ANN: one MAC per real connection. SNN: one AC "
                 "per synaptic event of a binary spike (IF, ASN), one MAC per event of a graded spike "
                 "(VSN); layers fed with analog values cost MACs, the "
                 "constant input current once per sample. Memory access and neuron updates excluded.")
MARGINS = (0.1, 0.2, 0.5, 1.0)


def build_report(sim: SimulationResult, meta: dict, units: dict[str, int], ann: dict, dataset: dict,
                 device: str, input_macs: float, analog_macs_per_step: float, preset: str,
                 metric_norm: float | None = None) -> dict:
    """The report of one simulation. ``ann`` holds the ANN's ``accuracy`` (or ``nmse`` for a
    regression data set, whose ``metric_norm`` is sum (y - mean y)^2) and ``macs_per_sample``."""
    n, steps = max(sim.samples, 1), sim.timesteps
    metric = "nmse" if dataset.get("task") == "regression" else "accuracy"
    total_units = sum(units.values())
    layer_spikes = sim.spikes.sum(1)
    spikes = float(layer_spikes.sum()) / n
    synops = float(sim.synops.sum()) / n
    values = (sim.metric.double() / (metric_norm if metric == "nmse" else n)).tolist()
    cum_spikes = (sim.spikes.sum(0).cumsum(0) / n).tolist()
    cum_synops = (sim.synops.sum(0).cumsum(0) / n).tolist()
    spike_op = getattr(neurons.get(meta["neuron"]["type"]), "SPIKE_OP", "ac")
    energy = snn_energy_pj(synops, input_macs, analog_macs_per_step, steps, preset, spike_op)
    rate = lambda s, count: s / max(count, 1) / steps * 1000.0  # noqa: E731
    sources = {layer["name"]: layer.get("source", "") for layer in meta["layers"]}
    layers = [{"name": name, "source": sources.get(name, ""), "neurons": units[name],
               "spikes_per_sample": float(layer_spikes[i]) / n,
               "firing_rate_hz": rate(float(layer_spikes[i]) / n, units[name]),
               "synops_per_sample": float(sim.synops[i].sum()) / n} for i, name in enumerate(sim.layers)]
    curve = [{"timestep": t + 1, metric: values[t], "spikes_per_sample": cum_spikes[t],
              "synops_per_sample": cum_synops[t]} for t in range(steps)]
    snn = {metric: values[-1], "spikes_per_sample": spikes, "synops_per_sample": synops,
           "firing_rate_hz": rate(spikes, total_units),
           "spike_percent": 100.0 * spikes / max(total_units * steps, 1), "neurons": total_units,
           "synaptic_event_op": spike_op.upper(), "input_macs_per_sample": input_macs,
           "analog_macs_per_step": analog_macs_per_step, "energy_pj_per_sample": energy}
    if metric == "accuracy":
        within = {f"{m}": within_margin(curve, ann["accuracy"], m) for m in MARGINS}
        snn["first_timestep_within_points_of_ann"] = {m: w["first"] for m, w in within.items()}
        snn["settled_timestep_within_points_of_ann"] = {m: w["settled"] for m, w in within.items()}
    return {
        "tool": f"ann2snn {__version__}",
        "dataset": dataset,
        "metric": metric,
        "neuron": meta["neuron"]["type"],
        "neuron_options": meta["neuron"].get("options", {}),
        "timesteps": steps,
        "step_ms": 1.0,
        "device": device,
        "ann": {**ann, "energy_pj_per_sample": ann_energy_pj(ann["macs_per_sample"], preset)},
        "snn": snn,
        "energy": {"preset": preset, **PRESETS[preset], "regime": ENERGY_REGIME},
        "layers": layers,
        "curve": curve,
    }


def within_margin(curve: list[dict], ann_accuracy: float, points: float) -> dict:
    """First time step at which the SNN comes within ``points`` of the ANN, and the step from
    which it stays within (None if never), with the spikes per sample spent by then."""
    ok = [c["accuracy"] >= ann_accuracy - points / 100 - 1e-12 for c in curve]
    first = next((i for i, v in enumerate(ok) if v), None)
    settled = next((i for i in range(len(ok)) if all(ok[i:])), None)
    at = lambda i: (curve[i]["timestep"], curve[i]["spikes_per_sample"]) if i is not None else (None, None)  # noqa
    return {"first": at(first)[0], "first_spikes": at(first)[1], "settled": at(settled)[0],
            "settled_spikes": at(settled)[1]}


def write_report(report: dict, directory: str | Path, timing: dict | None = None) -> list[Path]:
    """Write the three report files; all are written to temporary files first and renamed only
    when all are whole, ``report.json`` last, so an interrupted run leaves no report. Returns
    their paths."""
    directory = Path(directory)
    paths = [directory / "report.json", directory / "curve.csv", directory / "accuracy_vs_spikes.png"]
    with contextlib.ExitStack() as stack:  # exits in reverse: report.json is renamed last
        json_tmp, csv_tmp, png_tmp = (stack.enter_context(atomic_path(p)) for p in paths)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(report["curve"][0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(report["curve"])
        csv_tmp.write_text(buf.getvalue())
        series = [(report.get("label", report["neuron"].upper()), report["curve"])]
        series += [(v["label"], v["curve"]) for v in report.get("variants", [])]
        plot(series, report["ann"][report.get("metric", "accuracy")], png_tmp,
             f"{report['dataset']['name']} ({report['dataset']['samples']} samples), {report['timesteps']} steps",
             report.get("metric", "accuracy"))
        json_tmp.write_text(json.dumps({**report, "timing": timing or {}}, indent=2) + "\n")
    return paths


def plot(series: list[tuple[str, list[dict]]], ann_value: float, path: Path, title: str,
         metric: str = "accuracy") -> None:
    """Accuracy (or NMSE) versus cumulative spikes per sample, one line per series, the ANN as
    reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    scale = 100.0 if metric == "accuracy" else 1.0
    for label, curve in series:
        ax.plot([c["spikes_per_sample"] for c in curve], [scale * c[metric] for c in curve],
                label=label, marker="o" if len(curve) < 16 else None)  # short series: points, e.g. a sweep
    ref = f"{100 * ann_value:.2f}%" if metric == "accuracy" else f"{ann_value:.3g}"
    ax.axhline(scale * ann_value, color="k", ls="--", lw=1, label=f"ANN {ref}")
    if metric == "accuracy":
        best = max(100 * c["accuracy"] for _, cur in series for c in cur)
        top = max(100 * ann_value, best)
        ax.set_ylim(max(0.0, min(100 * ann_value, best) - 5), min(100.0, top + 0.5))  # zoom on the useful range
        ax.set_ylabel("accuracy (%)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel("NMSE")
    if any(c["spikes_per_sample"] > 0 for _, cur in series for c in cur):
        ax.set_xscale("log")
    ax.set_xlabel("spikes per sample (cumulative, one point per time step)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def summary_table(report: dict) -> Table:
    ann, snn, metric = report["ann"], report["snn"], report.get("metric", "accuracy")
    fmt = (lambda v: f"{100 * v:.2f}%") if metric == "accuracy" else (lambda v: f"{v:.4g}")  # noqa: E731
    table = Table(title=f"{report['neuron'].upper()} SNN, {report['timesteps']} steps, "
                        f"{report['dataset']['name']} {report['dataset']['split']} ({report['dataset']['samples']})")
    for col in ("", metric if metric == "accuracy" else "NMSE", "spikes/sample", "spikes %", "ops/sample",
                "rate Hz", "energy uJ"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("ANN", fmt(ann[metric]), "-", "-", f"{ann['macs_per_sample']:,.0f} MACs", "-",
                  f"{ann['energy_pj_per_sample'] / 1e6:.3f}")
    if "transfer_accuracy" in ann:
        table.add_row("ANN, ReLU -> f", fmt(ann["transfer_accuracy"]), "-", "-", "-", "-", "-")
    for label, s in [(report.get("label", "SNN"), snn)] + [(v["label"], v["snn"]) for v in report.get("variants", [])]:
        table.add_row(f"SNN {label}", fmt(s[metric]), f"{s['spikes_per_sample']:,.0f}", f"{s['spike_percent']:.1f}",
                      f"{s['synops_per_sample']:,.0f} {'SynOps' if s['synaptic_event_op'] == 'AC' else 'MACs'}",
                      f"{s['firing_rate_hz']:.1f}", f"{s['energy_pj_per_sample'] / 1e6:.3f}")
    return table


def layer_table(report: dict) -> Table:
    table = Table(title="Spiking layers")
    for col in ("layer", "after", "neurons", "spikes/sample", "rate (Hz)", "SynOps/sample"):
        table.add_column(col, justify="left" if col in ("layer", "after") else "right")
    for layer in report["layers"]:
        table.add_row(layer["name"], layer["source"], f"{layer['neurons']:,}", f"{layer['spikes_per_sample']:,.0f}",
                      f"{layer['firing_rate_hz']:.1f}", f"{layer['synops_per_sample']:,.0f}")
    return table
