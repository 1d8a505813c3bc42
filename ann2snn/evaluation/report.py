"""The evaluation report: ``report.json``, ``curve.csv``, ``accuracy_vs_spikes.png`` and the
summary table. One step is 1 ms, so a rate in Hz is spikes / neuron / step x 1000."""

from __future__ import annotations

import contextlib
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import fx

from ann2snn.version import __version__
from ann2snn.conversion.graph import slot_schedule
from ann2snn.io.data import TensorData
from ann2snn.errors import OptionError
from ann2snn.sim.energy import PRESETS, ann_energy_pj, ann_macs, snn_energy_pj
from ann2snn.io.files import atomic_path, file_sha256, json_text
from ann2snn.io.markup import literal
from ann2snn.neurons import Neuron
from ann2snn.store.profile import SearchRecord
from ann2snn.neurons.readout import Readout
from ann2snn.io.records import field, to_json
from ann2snn.evaluation.plan import Run
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.sim.network import answer_step as answer_step_of
from ann2snn.sim.simulate import SimulationResult
from ann2snn.evaluation.stats import mcnemar, wilson

ENERGY_REGIME = ("Horowitz 2014, 45 nm, compute only. ANN: one MAC per real connection. SNN: synaptic "
                 "energy - one AC per synaptic event of a binary spike (IF, ASN, TTFS), one MAC per event of a "
                 "graded spike (VSN, counted after an average pool that follows the layer); layers fed with analog "
                 "values cost MACs, the constant input current once per sample - plus neuron energy, counted two "
                 "ways: clock-driven, every neuron's update at every step (energy_pj_per_sample), and event-driven "
                 "(energy_event_driven_pj_per_sample): a unit updates in a step in which an event reaches it or it "
                 "spikes, units fed by the analog input every step (TTFS: in its sources' windows and its own); "
                 "multiplies as MACs and adds or compares as "
                 "ACs (Neuron.step_ops). Memory access excluded.")
MARGINS = (0.1, 0.2, 0.5, 1.0)
REPORT_FORMAT, REPORT_VERSION = "ann2snn-report", 1


@dataclass(kw_only=True)
class LayerReport:
    name: str
    source: str
    neurons: int
    spikes_per_sample: float
    firing_rate_hz: float
    synops_per_sample: float


@dataclass(kw_only=True)
class Variant:
    """Another run on the same network and data (a sweep value, another neuron type, an arousal
    baseline), as ``Report.variants`` lists it."""

    label: str
    neuron: str
    neuron_options: dict
    readout: str
    snn: dict
    layers: list[LayerReport]
    curve: list[dict]


@dataclass(kw_only=True)
class ArousalReport:
    mechanism: str
    policy: dict
    policy_source: str
    calibration_search: SearchRecord | None = field(None, keep_none=True)
    description: str
    fraction_aroused: float
    with_arousal: dict
    fixed_low: dict
    fixed_high: dict
    # the fixed precision between low and high that spends the arousal run's spikes (within 1%),
    # with McNemar's test of arousal against it; None when not run (shards, or out of range)
    fixed_same_spikes: dict | None = field(None, keep_none=True)


@dataclass(kw_only=True)
class Report:
    """``report.json``: the main run (the artifact as converted, or under arousal control) with
    the ANN's figures, per-layer and per-step results, energy, and the other runs as variants.
    ``snn`` and ``ann`` hold the metric (``accuracy``, or ``nmse`` for regression) under its name."""

    format: str = REPORT_FORMAT
    version: int = REPORT_VERSION
    tool: str = f"ann2snn {__version__}"
    dataset: dict
    metric: str
    neuron: str
    neuron_options: dict
    timesteps: int
    step_ms: float = 1.0
    device: str
    ann: dict
    snn: dict
    energy: dict
    layers: list[LayerReport]
    curve: list[dict]
    readout: str | None = None
    label: str | None = None
    artifact: dict | None = None
    variants: list[Variant] | None = None
    arousal: ArousalReport | None = None
    provenance: dict | None = None
    timing: dict | None = None

    @property
    def accuracy(self) -> float | None:
        """The SNN's accuracy after the last step (None for regression: see ``snn['nmse']``)."""
        return self.snn.get("accuracy")

    @property
    def spikes_per_sample(self) -> float:
        return self.snn["spikes_per_sample"]

    def as_variant(self) -> Variant:
        return Variant(label=self.label, neuron=self.neuron, neuron_options=self.neuron_options,
                       readout=self.readout, snn=self.snn, layers=self.layers, curve=self.curve)

    def to_json(self) -> dict:
        return to_json(self)


@dataclass(kw_only=True)
class ReportContext:
    """What every run's report shares: the data set, the ANN's figures, the units per spiking
    layer and the analog operation counts (``context`` computes it)."""

    metric: str
    dataset: dict
    ann: dict
    units: dict[str, int]
    sources: dict[str, str]
    device: str
    input_macs: float
    analog_macs_per_step: float
    preset: str
    metric_norm: float | None = None
    ann_final: torch.Tensor | None = None  # the ANN per sample: 1 if right (for paired tests)
    graph: fx.GraphModule | None = None  # the normalised ANN (a time code's schedule, ``answer_step``)


def context(ann: torch.nn.Module, data: TensorData, fan: dict[str, torch.Tensor], layers: list[str],
            sources: dict[str, str], dataset: str, device: str, preset: str) -> ReportContext:
    """The shared part of the reports of ``data`` run through ``ann``'s spiking versions; ``fan``
    is ``energy.fanout_maps(ann, ...)``. The ANN's metric is filled in later (``ann[metric]``)."""
    metric = "nmse" if data.task == "regression" else "accuracy"
    shape = data.sample_shape
    norm = float(((data.targets.double() - data.targets.double().mean()) ** 2).sum())
    return ReportContext(
        metric=metric, units={name: int(fan[name].numel()) for name in layers}, sources=sources,
        ann={metric: None, "macs_per_sample": ann_macs(ann, shape)},
        dataset={"name": Path(dataset).name if Path(dataset).exists() else dataset, "split": data.split,
                 "samples": len(data), "task": data.task,
                 **({"skipped_unreadable_images": len(data.skipped)} if data.skipped else {})},
        metric_norm=norm if norm > 0 else float("nan"),  # targets that do not vary: NMSE is undefined
        device=device, input_macs=float(fan["input"].sum()), graph=ann,
        analog_macs_per_step=float(sum(f.sum() for k, f in fan.items() if k.endswith(":out"))), preset=preset)


def build_report(sim: SimulationResult, run: Run, readout: Readout, ctx: ReportContext) -> Report:
    """The report of one simulation."""
    n, steps, metric = max(sim.samples, 1), sim.timesteps, ctx.metric
    values = (sim.metric.double() / (ctx.metric_norm if metric == "nmse" else n)).tolist()
    energy = _energy_model(run, ctx)
    layers = _layer_reports(sim, ctx, n)
    curve = _curve(sim, metric, values, n, energy)
    snn = _snn_summary(sim, run, ctx, values[-1], n, energy)
    if metric == "accuracy":
        snn.update(_accuracy_vs_ann(sim, ctx, curve, values[-1], n))
    return Report(dataset=ctx.dataset, metric=metric, neuron=run.spec.type, neuron_options=run.spec.options,
                  timesteps=steps, device=ctx.device, ann=_ann_summary(ctx, n), snn=snn,
                  energy={"preset": ctx.preset, **PRESETS[ctx.preset], "regime": ENERGY_REGIME},
                  layers=layers, curve=curve, readout=readout.describe(), label=run.label)


def _rate_hz(spikes: float, neurons: int, steps: int) -> float:
    """Spikes per neuron per second (one step is 1 ms)."""
    return spikes / max(neurons, 1) / steps * 1000.0


def _energy_model(run: Run, ctx: ReportContext):
    """``energy(t, synops_by_t, spikes_by_t)``: (synaptic, neuron energy in pJ per sample, neuron
    updates) of the first ``t`` steps of ``run``."""
    units, spike_op, ops = ctx.units, run.neuron.spike_op, run.neuron.step_ops
    # per layer, the steps of its input ramp (ASN onset_ms: asn.ramp_steps)
    ramp = [(units.get(layer.name, 0), ops.onset_steps(layer.params)) for layer in run.layers
            if ops and ops.onset_steps]
    step_mac, step_add = _step_costs(run, ctx)

    def energy(t: int, synops_by_t: float, spikes_by_t: float) -> tuple[float, float, dict | None]:
        ramped = sum(u * min(t, r) for u, r in ramp)
        updates = {"mac": step_mac * t + ramped * ops.mac_per_onset_step,
                   "add": step_add * t + spikes_by_t * ops.add_per_spike} if ops else None
        neuron = (updates["mac"] * PRESETS[ctx.preset]["mac_pj"] + updates["add"] * PRESETS[ctx.preset]["ac_pj"]
                  if updates else 0.0)
        synaptic = snn_energy_pj(synops_by_t, ctx.input_macs, ctx.analog_macs_per_step, t, ctx.preset, spike_op)
        return synaptic, neuron, updates

    return energy


def _step_costs(run: Run, ctx: ReportContext) -> tuple[float, float]:
    """(multiplies, adds) of one step of every unit of ``run``'s network updated once
    (``StepOps.per_step``: what a layer's parameters leave out is not counted)."""
    ops = run.neuron.step_ops
    if ops is None:
        return 0, 0
    params = {layer.name: layer.params for layer in run.layers}
    step_ops = [ops.per_step(params[name] if ops.unused else {}) for name in ctx.units]
    return (sum(u * mac for u, (mac, _) in zip(ctx.units.values(), step_ops)),
            sum(u * add for u, (_, add) in zip(ctx.units.values(), step_ops)))


def answer_step(run: Run, ctx: ReportContext) -> int | None:
    """The step by which a time code's answer is complete (``graph.slot_schedule``); None for
    a rate code, which answers from the first step on."""
    return answer_step_of(ctx.graph, run.neuron, {layer.name: layer.params for layer in run.layers}) \
        if ctx.graph is not None else None


def _event_driven_model(run: Run, ctx: ReportContext):
    """``energy(t, synops_by_t, spikes_by_t)``: (neuron energy in pJ per sample, neuron updates)
    of the first ``t`` steps of ``run`` counted event-driven (``StepOps.event_driven``), at the
    mean cost of an update of the network's units, plus ``add_per_spike`` per spike. "per_input":
    one update in each step in which an event reaches a unit - at most min(events received, units
    x steps), the events into the output layer counted too (an upper bound) - or in which it
    spikes, every step for units the analog input feeds, never more than clock-driven;
    "windows": every step of a unit's sources' windows and of its own (``_active_steps``)."""
    units, ops = ctx.units, run.neuron.step_ops
    if ops is None:
        return None
    total = max(sum(units.values()), 1)
    mac, add = (cost / total for cost in _step_costs(run, ctx))  # the mean update's cost
    analog = sum(units.get(layer.name, 0) for layer in run.layers if layer.stats and layer.stats.analog_input)
    active = _active_steps(run, ctx) if ops.event_driven == "windows" else None

    def energy(t: int, synops_by_t: float, spikes_by_t: float) -> tuple[float, dict]:
        if active is not None:
            updates = sum(units.get(name, 0) * max(0, min(t, end) - begin) for name, (begin, end) in active.items())
        else:
            updates = min(analog * t + min(synops_by_t, (total - analog) * t) + spikes_by_t, total * t)
        counts = {"updates": updates, "mac": updates * mac, "add": updates * add + spikes_by_t * ops.add_per_spike}
        e = PRESETS[ctx.preset]
        return counts["mac"] * e["mac_pj"] + counts["add"] * e["ac_pj"], counts

    return energy


def _active_steps(run: Run, ctx: ReportContext) -> dict[str, tuple[int, int]]:
    """Per layer of a time code, the steps [begin, end) in which its units update: from the
    opening of the earliest window feeding it (its own start less its window; 0 for a layer the
    analog input feeds, whose current is there from the first step) to the close of its own."""
    windows = {layer.name: run.neuron.window(layer.params) for layer in run.layers}
    starts = slot_schedule(ctx.graph, windows)
    return {layer.name: (0 if layer.stats and layer.stats.analog_input else max(0, starts[layer.name] - windows[layer.name]),
                         starts[layer.name] + windows[layer.name]) for layer in run.layers}


def _layer_reports(sim: SimulationResult, ctx: ReportContext, n: int) -> list[LayerReport]:
    layer_spikes = sim.spikes.sum(1)
    return [LayerReport(name=name, source=ctx.sources.get(name, ""), neurons=ctx.units[name],
                        spikes_per_sample=float(layer_spikes[i]) / n,
                        firing_rate_hz=_rate_hz(float(layer_spikes[i]) / n, ctx.units[name], sim.timesteps),
                        synops_per_sample=float(sim.synops[i].sum()) / n) for i, name in enumerate(sim.layers)]


def _curve(sim: SimulationResult, metric: str, values: list[float], n: int, energy) -> list[dict]:
    """Per step: the metric, and the spikes, SynOps and energy per sample spent by then."""
    cum_spikes = (sim.spikes.sum(0).cumsum(0) / n).tolist()
    cum_synops = (sim.synops.sum(0).cumsum(0) / n).tolist()
    return [{"timestep": t + 1, metric: values[t], "spikes_per_sample": cum_spikes[t],
             "synops_per_sample": cum_synops[t],
             "energy_pj_per_sample": sum(energy(t + 1, cum_synops[t], cum_spikes[t])[:2])}
            for t in range(sim.timesteps)]


def _snn_summary(sim: SimulationResult, run: Run, ctx: ReportContext, final: float, n: int, energy) -> dict:
    """The SNN's figures after the last step: ``final`` (the metric), spikes, SynOps and energy."""
    steps, total_units = sim.timesteps, sum(ctx.units.values())
    spikes = float(sim.spikes.sum(1).sum()) / n
    synops = float(sim.synops.sum()) / n
    synaptic, neuron_energy, updates = energy(steps, synops, spikes)
    event = _event_driven_model(run, ctx)
    event_energy, event_updates = event(steps, synops, spikes) if event else (0.0, None)
    return {ctx.metric: final, "answer_step": answer_step(run, ctx), "spikes_per_sample": spikes, "synops_per_sample": synops,
            "firing_rate_hz": _rate_hz(spikes, total_units, steps),
            "spike_percent": 100.0 * spikes / max(total_units * steps, 1), "neurons": total_units,
            "synaptic_event_op": run.neuron.spike_op.upper(), "input_macs_per_sample": ctx.input_macs,
            "analog_macs_per_step": ctx.analog_macs_per_step, "neuron_updates_per_sample": updates,
            "synaptic_energy_pj_per_sample": synaptic, "neuron_energy_pj_per_sample": neuron_energy,
            "energy_pj_per_sample": synaptic + neuron_energy,
            "neuron_updates_event_driven_per_sample": event_updates,
            "neuron_energy_event_driven_pj_per_sample": event_energy,
            "energy_event_driven_pj_per_sample": synaptic + event_energy}


def _accuracy_vs_ann(sim: SimulationResult, ctx: ReportContext, curve: list[dict], final: float, n: int) -> dict:
    """The SNN's accuracy interval, McNemar's test against the ANN (same samples) and the steps
    (and energy) to come and to stay within ``MARGINS`` points of the ANN."""
    out = {"accuracy_ci95": wilson(final * n, n)}
    if sim.final is not None and ctx.ann_final is not None and len(sim.final) == len(ctx.ann_final):
        out["paired_vs_ann"] = mcnemar(sim.final, ctx.ann_final)
    within = {f"{m}": within_margin(curve, ctx.ann["accuracy"], m) for m in MARGINS}
    out["first_timestep_within_points_of_ann"] = {m: w["first"] for m, w in within.items()}
    out["settled_timestep_within_points_of_ann"] = {m: w["settled"] for m, w in within.items()}
    out["settled_energy_pj_within_points_of_ann"] = {m: w["settled_energy_pj"] for m, w in within.items()}
    return out


def _ann_summary(ctx: ReportContext, n: int) -> dict:
    """The ANN's figures with their energy (and, for accuracy, its interval)."""
    return {**ctx.ann, "energy_pj_per_sample": ann_energy_pj(ctx.ann["macs_per_sample"], ctx.preset),
            **({"energy_pj_per_sample_skipping_zeros": ann_energy_pj(
                ctx.ann["macs_per_sample_skipping_zeros"], ctx.preset)}
               if "macs_per_sample_skipping_zeros" in ctx.ann else {}),
            **({"accuracy_ci95": wilson(ctx.ann["accuracy"] * n, n)} if ctx.metric == "accuracy" else {})}


def provenance(artifact: str | Path | None, data: TensorData, calibration_seed: int, device: str) -> dict:
    """What a reader needs to reproduce the report: the command, the software and device, the
    checksums of the artifact and of the data as simulated, and the seeds."""
    import platform
    import sys

    dev = torch.device(device)
    return {"command": " ".join(["ann2snn", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("ann2snn", "__main__.py")
            else None, "ann2snn": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "artifact_sha256": file_sha256(artifact) if artifact else None, "data_sha256": data.sha256(),
            "seeds": {"calibration_subset": calibration_seed}}


def arousal_report(neuron: Neuron, policy, stored_policy: bool, search: SearchRecord | None,
                   reports: list[Report], fraction: float, matched: Report | None = None) -> ArousalReport:
    """The arousal section: the policy, where it came from, and the three runs side by side."""
    pick = lambda r: {"label": r.label, r.metric: r.snn[r.metric],  # noqa: E731
                      "spikes_per_sample": r.snn["spikes_per_sample"], "firing_rate_hz": r.snn["firing_rate_hz"]}
    return ArousalReport(
        mechanism=neuron.precision_control.mechanism, policy=to_json(policy),
        policy_source="the artifact's (calibrate --arousal), with --arousal's keys over it" if stored_policy
        else "--arousal's keys over the defaults",
        calibration_search=search, description=describe_policy(policy, neuron), fraction_aroused=fraction,
        with_arousal=pick(reports[0]), fixed_low=pick(reports[1]), fixed_high=pick(reports[2]),
        fixed_same_spikes={**pick(matched), "paired_vs_arousal": matched.snn.get("paired_vs_main_run")}
        if matched is not None else None)


def within_margin(curve: list[dict], ann_accuracy: float, points: float) -> dict:
    """First time step at which the SNN comes within ``points`` of the ANN, and the step from
    which it stays within (None if never), with the spikes per sample spent by then (and the
    energy, where the curve has it)."""
    ok = [c["accuracy"] >= ann_accuracy - points / 100 - 1e-12 for c in curve]
    first = next((i for i, v in enumerate(ok) if v), None)
    settled = next((i for i in range(len(ok)) if all(ok[i:])), None)
    at = lambda i, key: curve[i].get(key) if i is not None else None  # noqa: E731
    return {"first": at(first, "timestep"), "first_spikes": at(first, "spikes_per_sample"),
            "settled": at(settled, "timestep"), "settled_spikes": at(settled, "spikes_per_sample"),
            "settled_energy_pj": at(settled, "energy_pj_per_sample")}


PLOT_FORMATS = ("png", "svg", "pdf")
REPORT_FILES = ("report.json", "curve.csv", "accuracy_vs_spikes.png")


def report_files(plot_format: str = "png") -> tuple[str, str, str]:
    """The names of the three report files, the plot in ``plot_format``."""
    if plot_format not in PLOT_FORMATS:
        raise OptionError("plot_format", f"{plot_format!r}: expected one of {', '.join(PLOT_FORMATS)}")
    return "report.json", "curve.csv", f"accuracy_vs_spikes.{plot_format}"


def report_outputs(directory: str | Path, plot_format: str = "png") -> list[tuple[str, Path]]:
    """(what, path) of the report files in ``directory``, as ``files.check_outputs`` takes them."""
    return [("report", Path(directory) / name) for name in report_files(plot_format)]


def runs_of(report: Report) -> list[tuple[str, list[dict]]]:
    """(label, curve) of every run in the report: the artifact's own, then sweep/compare/arousal."""
    return [(report.label or report.neuron.upper(), report.curve)] + [(v.label, v.curve) for v in report.variants or []]


def curve_csv(report: Report) -> str:
    """Every run's curve in long form: run, timestep, metric, and per sample the spikes, synaptic
    ops and energy (pJ) of the steps so far."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run", *report.curve[0]], lineterminator="\n")
    writer.writeheader()
    for label, curve in runs_of(report):
        writer.writerows({"run": label, **c} for c in curve)
    return buf.getvalue()


def write_report(report: Report, directory: str | Path, plot_format: str = "png") -> list[Path]:
    """Write the report files; returns their paths. The plot is drawn first, in memory, and a plot
    that cannot be drawn never costs the numbers (``plot_bytes``; an earlier run's plot is then
    removed). All are written to temporary files and renamed only when all are whole,
    ``report.json`` last, so an interrupted run leaves no report."""
    directory = Path(directory)
    paths = [directory / name for name in report_files(plot_format)]
    image = plot_bytes(runs_of(report), report.ann[report.metric],
                       f"{report.dataset['name']} ({report.dataset['samples']} samples), {report.timesteps} steps",
                       report.metric, plot_format, paths[2].name)
    written = paths if image is not None else paths[:2]
    with contextlib.ExitStack() as stack:  # exits in reverse: report.json is renamed last
        json_tmp, csv_tmp, *plot_tmp = [stack.enter_context(atomic_path(p)) for p in written]
        csv_tmp.write_text(curve_csv(report))
        for tmp in plot_tmp:
            tmp.write_bytes(image)
        json_tmp.write_text(json_text(_nulls({**report.to_json(), "timing": report.timing or {}}), indent=2) + "\n")
    if image is None:
        with contextlib.suppress(FileNotFoundError):
            paths[2].unlink()  # an earlier run's plot would pass for this run's
    return written


def _nulls(value):
    """``value`` with NaN and infinities as None: JSON's null for a figure that is undefined
    (the NMSE of targets that do not vary: one sample, or all equal)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    return [_nulls(v) for v in value] if isinstance(value, list) else value


def figure(series: list[tuple[str, list[dict]]], ann_value: float, title: str, metric: str = "accuracy"):
    """A matplotlib ``Figure`` (no pyplot, no backend switched): error (100 - accuracy, %) or
    NMSE on a log axis against the time step (left) and against cumulative spikes per sample
    (right), every run in full, the ANN as a dashed line. A series of fewer than 16 points (a
    sweep's end points) is drawn with markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    err = (lambda c: 100.0 * (1.0 - c["accuracy"])) if metric == "accuracy" else (lambda c: c[metric])  # noqa: E731
    series = [(label, [c for c in curve if math.isfinite(err(c))]) for label, curve in series]  # NaN: not drawn
    series = [(label, curve) for label, curve in series if curve]
    ann_err = 100.0 * (1.0 - ann_value) if metric == "accuracy" else ann_value
    values = [v for v in [ann_err] if math.isfinite(v)] + [err(c) for _, cur in series for c in cur]
    floor = min([v for v in values if v > 0] or [1e-3]) / 2
    top = max(max(values) * 1.5, floor * 10)
    ref = f"ANN {100 * ann_value:.2f}%" if metric == "accuracy" else f"ANN {ann_value:.3g}"
    for ax, x_key, x_label in zip(fig.subplots(1, 2), ("timestep", "spikes_per_sample"),
                                  ("time step (1 ms)", "spikes per sample (cumulative)")):
        for label, curve in series:
            ax.plot([c[x_key] for c in curve], [max(err(c), floor) for c in curve], label=label,
                    marker="o" if len(curve) < 16 else None)
        if math.isfinite(ann_err):
            ax.axhline(max(ann_err, floor), color="k", ls="--", lw=1, label=ref)
        ax.set_ylim(floor * 0.8, top)  # before the log scale: all-equal values would warn
        ax.set_yscale("log")
        if x_key == "spikes_per_sample" and any(c[x_key] > 0 for _, cur in series for c in cur):
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("error (%), log scale" if metric == "accuracy" else "NMSE")
        ax.grid(alpha=0.3, which="both")
    for text in ax.legend(loc="best", fontsize=8).get_texts():
        text.set_parse_math(False)  # a user's name is printed as it is: '$' is not mathtext
    fig.suptitle(title, fontsize=10, parse_math=False)
    return fig


def plot_bytes(series: list[tuple[str, list[dict]]], ann_value: float, title: str, metric: str = "accuracy",
               plot_format: str = "png", name: str = "the plot") -> bytes | None:
    """``figure`` as the bytes of a ``plot_format`` file, or None where it cannot be drawn. What is
    left out - points whose metric is NaN or infinite, or the whole plot - is one
    ``progress.notify`` line saying why; an interruption (even one that an import turned into an
    ImportError) still stops the command."""
    from ann2snn.signals import interruption
    from ann2snn.progress import notify

    values = [c[metric] for _, curve in series for c in curve]
    bad = sum(not math.isfinite(v) for v in values)
    what = "NMSE" if metric == "nmse" else metric
    hint = " (undefined where the targets do not vary: one sample, or all equal)" if metric == "nmse" else ""
    if bad == len(values):
        notify(f"{name} was not drawn: the {what} is NaN or infinite at every step{hint}; report.json and "
               "curve.csv hold the numbers")
        return None
    try:
        fig, buf = figure(series, ann_value, title, metric), io.BytesIO()
        fig.savefig(buf, format=plot_format, metadata={"Software": None} if plot_format == "png" else
                    {"Date": None} if plot_format == "svg" else {"CreationDate": None})
    except Exception as exc:  # a figure is no reason to lose a run
        if interruption(exc) is not None:
            raise
        notify(f"{name} was not drawn ({type(exc).__name__}: {exc}); report.json and curve.csv hold the numbers")
        return None
    if bad:
        notify(f"{name}: {bad} of {len(values)} points not drawn, their {what} being NaN or infinite{hint}")
    return buf.getvalue()


def plot(series: list[tuple[str, list[dict]]], ann_value: float, path: Path, title: str,
         metric: str = "accuracy", plot_format: str = "png") -> None:
    """``plot_bytes`` written to ``path`` (atomically), where it could be drawn."""
    image = plot_bytes(series, ann_value, title, metric, plot_format, Path(path).name)
    if image is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(image)


def summary_table(report: Report) -> Table:
    ann, snn, metric = report.ann, report.snn, report.metric
    fmt = (lambda v: f"{100 * v:.2f}%") if metric == "accuracy" else (lambda v: f"{v:.4g}")  # noqa: E731
    ci = lambda d: f"{100 * d['accuracy_ci95'][0]:.2f}-{100 * d['accuracy_ci95'][1]:.2f}" \
        if "accuracy_ci95" in d else "-"  # noqa: E731
    paired = lambda d: f"p={d['paired_vs_ann']['p_value']:.2g}{' *' if d['paired_vs_ann']['significant'] else ''}" \
        if "paired_vs_ann" in d else "-"  # noqa: E731
    data = report.dataset
    table = Table(title=f"{report.neuron.upper()} SNN, {report.timesteps} steps, "
                        f"{literal(data['name'])} {literal(data['split'])} ({data['samples']})",
                  caption="95% CI: Wilson interval; vs ANN: McNemar's exact test on the same samples "
                          "(* = the difference is significant at p < 0.05)" if metric == "accuracy" else None)
    for col in ("", metric if metric == "accuracy" else "NMSE", "95% CI", "vs ANN", "spikes/sample", "spikes %",
                "ops/sample", "rate Hz", "energy uJ", "event-driven uJ"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("ANN", fmt(ann[metric]), ci(ann), "-", "-", "-", f"{ann['macs_per_sample']:,.0f} MACs", "-",
                  f"{ann['energy_pj_per_sample'] / 1e6:.3f}", "-")
    if "macs_per_sample_skipping_zeros" in ann:
        table.add_row("ANN, zeros skipped", fmt(ann[metric]), ci(ann), "-", "-", "-",
                      f"{ann['macs_per_sample_skipping_zeros']:,.0f} MACs", "-",
                      f"{ann['energy_pj_per_sample_skipping_zeros'] / 1e6:.3f}", "-")
    if "transfer_accuracy" in ann:
        table.add_row("ANN, ReLU -> f", fmt(ann["transfer_accuracy"]), "-", "-", "-", "-", "-", "-", "-", "-")
    for label, s in [(report.label or "SNN", snn)] + [(v.label, v.snn) for v in report.variants or []]:
        table.add_row(f"SNN {literal(label)}", fmt(s[metric]), ci(s), paired(s), f"{s['spikes_per_sample']:,.0f}",
                      f"{s['spike_percent']:.1f}",
                      f"{s['synops_per_sample']:,.0f} {'SynOps' if s['synaptic_event_op'] == 'AC' else 'MACs'}",
                      f"{s['firing_rate_hz']:.1f}", f"{s['energy_pj_per_sample'] / 1e6:.3f}",
                      f"{s['energy_event_driven_pj_per_sample'] / 1e6:.3f}"
                      if s.get("energy_event_driven_pj_per_sample") is not None else "-")
    return table


def settled_table(report: Report) -> Table | None:
    """Per run: the step from which it stays within 0.1, 0.5 and 1 point of the ANN, with the
    spikes per sample spent by then (accuracy reports only)."""
    if report.metric != "accuracy":
        return None
    ann = report.ann["accuracy"]
    table = Table(title="Stays within x points of the ANN from step (spikes per sample by then)")
    for col in ("", "0.1", "0.5", "1"):
        table.add_column(col, justify="right" if col else "left")
    for label, curve in [(report.label or "SNN", report.curve)] + [(v.label, v.curve) for v in report.variants or []]:
        cells = []
        for m in (0.1, 0.5, 1.0):
            w = within_margin(curve, ann, m)
            cells.append(f"{w['settled']} ({w['settled_spikes']:,.0f})" if w["settled"] else "no")
        table.add_row(f"SNN {literal(label)}", *cells)
    return table


def layer_table(report: Report) -> Table:
    table = Table(title="Spiking layers")
    for col in ("layer", "after", "neurons", "spikes/sample", "rate (Hz)", "SynOps/sample"):
        table.add_column(col, justify="left" if col in ("layer", "after") else "right")
    for layer in report.layers:
        table.add_row(literal(layer.name), literal(layer.source), f"{layer.neurons:,}",
                      f"{layer.spikes_per_sample:,.0f}", f"{layer.firing_rate_hz:.1f}",
                      f"{layer.synops_per_sample:,.0f}")
    return table


def describe_policy(policy: ArousalPolicy, neuron: Neuron) -> str:
    """One sentence for the report; ``neuron`` must have ``precision_control``."""
    checks = ", ".join(str(t) for t in (policy.at, *policy.recheck))
    which = f"{neuron.label} layers {', '.join(policy.layers)}" if policy.layers else f"every {neuron.label} layer"
    control = neuron.precision_control
    measure = "top-1 minus top-2 softmax readout score" if policy.test == "margin" else \
        "1 - top-2 / top-1 softmax readout score"
    return (f"{control.start_text(policy)}; at step(s) {checks}, inputs whose {measure} is below "
            f"{policy.threshold:g} {control.switch_text(policy, which)}")
