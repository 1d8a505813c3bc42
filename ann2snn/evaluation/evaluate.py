"""The evaluate step: simulate an artifact on a data set and report accuracy against spikes.

An evaluation is planned (``_prepare``: the artifact, the runs - as converted, a sweep, other
neuron types, arousal's three runs - the data and the report context), simulated on some of
the samples (``_simulate``: per-run sums that add up across shards), and finished from the
sums of all samples (``_finish``). One process simulates every sample; under ``torchrun`` each
rank simulates its shard and the sums are added with collectives (``distributed.py``); with
``shard=(i, n)`` one process simulates shard i of n and writes a partial report that ``merge``
adds to the others. All three give the same report: the sums are float64 counts, exact in any
order (a regression's squared errors may differ in the last bits, and timing differs).
"""

from __future__ import annotations

import hashlib

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ann2snn.sim import distributed
from ann2snn import neurons
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.evaluation.plan import arousal_runs, matched_run
from ann2snn.sim.arousal import check_class_scores
from ann2snn.store.artifact import Artifact, ArtifactMeta, load_artifact, variant
from ann2snn.io.checkpoint import file_sha256
from ann2snn.conversion.checks import check_memory, model_outputs
from ann2snn.conversion.graph import MAXPOOL_MODES
from ann2snn.io.data import TensorData, data_files, open_dataset
from ann2snn.sim.distributed import Ranks
from ann2snn.sim.energy import counting_active_macs
from ann2snn.errors import OptionError, UserError
from ann2snn.io.files import check_input, check_outputs, json_text, parse_json, read_input, write_text
from ann2snn.search.operating_point import setting_text
from ann2snn.neurons import Neuron, compiled
from ann2snn.options import DataSource, RunOptions
from ann2snn.io.records import from_json, to_json
from ann2snn.evaluation.report import (Report, ReportContext, arousal_report, build_report, context, provenance, report_outputs, write_report)
from ann2snn.evaluation.plan import Run
from ann2snn.sim.network import Fanouts, answer_step, build_network
from ann2snn.sim.simulate import SimulationResult, ann_metric_sum, ann_per_sample, resolve_device
from ann2snn.evaluation.stats import mcnemar
from ann2snn.search.exact import transfer_network
from ann2snn.search.transfer_training import with_transfer

PARTIAL_FORMAT, PARTIAL_VERSION, PARTIAL_FILE = "ann2snn-partial-report", 1, "partial.json"


@dataclass
class _Plan:
    art: Artifact
    runs: list[Run]
    policy: ArousalPolicy | None
    data: TensorData
    fanouts: Fanouts
    ctx: ReportContext
    run: RunOptions
    device: torch.device


@dataclass(kw_only=True)
class RunSums:
    """One run's sums over some samples: metric per step (correct answers or squared error),
    spikes and synaptic operations per layer and step, inputs aroused."""

    metric: list[float]
    spikes: list[list[float]]
    synops: list[list[float]]
    aroused: int = 0
    final: list[float]  # per sample, after the last step: 1 if right (regression: squared error)


@dataclass(kw_only=True)
class Sums:
    samples: int
    ann: float  # the ANN's correct answers (or squared error)
    transfer: float | None = None  # the same with the neurons' transfer function in place of ReLU
    runs: list[RunSums]
    ann_final: list[float]  # the ANN per sample: 1 if right (regression: squared error)
    ann_active_macs: float = 0.0  # MACs of the ANN skipping zero activations, summed over samples
    seconds: float = 0.0

    def __add__(self, other: "Sums") -> "Sums":
        add = lambda a, b: (torch.tensor(a, dtype=torch.float64) + torch.tensor(b, dtype=torch.float64)).tolist()  # noqa
        return Sums(samples=self.samples + other.samples, ann=self.ann + other.ann,
                    transfer=None if self.transfer is None else self.transfer + other.transfer,
                    runs=[RunSums(metric=add(a.metric, b.metric), spikes=add(a.spikes, b.spikes),
                                  synops=add(a.synops, b.synops), aroused=a.aroused + b.aroused,
                                  final=a.final + b.final) for a, b in zip(self.runs, other.runs)],
                    ann_final=self.ann_final + other.ann_final,
                    ann_active_macs=self.ann_active_macs + other.ann_active_macs,
                    seconds=max(self.seconds, other.seconds))


@dataclass(kw_only=True)
class Partial:
    """A partial report: the sums of one shard, and the evaluation it belongs to."""

    format: str = PARTIAL_FORMAT
    version: int = PARTIAL_VERSION
    artifact: str
    artifact_sha256: str
    dataset: str
    run: dict
    sweep: list[dict]
    compare: list[str]
    arousal: dict | None = None
    shard: list[int]
    shard_sha256: str  # the shard's samples, as simulated
    sums: Sums

    def __post_init__(self):
        if len(self.shard) != 2 or not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"shard {self.shard}: expected [I, N] with 0 <= I < N")


def evaluate(artifact: str | Path, dataset: str, run: RunOptions, *, source: DataSource = DataSource(),
             device: str = "auto", sweep: list[dict] | None = None, compare: list[str] | None = None,
             arousal: str | ArousalPolicy | None = None, report_dir: str | Path | None = None,
             model_ref: str | None = None, trust_code: bool = False, shard: tuple[int, int] | None = None,
             on_start: Callable[[int], None] | None = None,
             on_batch: Callable[[int], None] | None = None, plot_format: str = "png") -> Report | None:
    """Simulate the artifact on a data set and build (and, given ``report_dir``, write) the report.
    ``sweep`` re-runs the network with other options of its neuron (e.g. ``[{"m_f": 0.2}]``),
    ``compare`` with other neuron types fitted to the same calibration statistics, ``arousal``
    (a policy, or its text over the artifact's stored policy) under per-input precision control
    beside fixed low and high precision; the other runs go to ``report.variants`` and the plot.
    ``shard=(i, n)``: simulate the i-th of n shards only and write a partial report
    (``report_dir``/partial.json, for ``merge``); returns None then. The plot is written in
    ``plot_format`` (png, svg or pdf)."""
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise OptionError("shard", f"{shard[0]}/{shard[1]}: expected I/N with 0 <= I < N")
    ranks = Ranks() if shard is not None else distributed.start(device)
    shards = Ranks(*shard) if shard is not None else ranks
    with ranks.phase():
        if report_dir is not None and (ranks.leader or shard is not None):
            files = [("report", Path(report_dir) / PARTIAL_FILE)] if shard is not None else \
                report_outputs(report_dir, plot_format)
            check_outputs(files,
                          [artifact, *data_files(dataset, source.data_dir)], [("report folder", report_dir)])
        plan = _prepare(artifact, dataset, run, source, distributed.rank_device(device), sweep or [], compare or [],
                        arousal, model_ref, trust_code)
    with ranks.phase():
        part = shards.shard(len(plan.data))
        if on_start:
            on_start(len(part) * len(plan.runs))
        shard_data = plan.data.subset(torch.arange(part.start, part.stop))
        sums = _simulate(plan, shard_data, on_batch)
    if shard is not None:
        if report_dir is not None:
            record = Partial(artifact=str(artifact), artifact_sha256=file_sha256(artifact), dataset=dataset,
                             run=to_json(run), sweep=sweep or [], compare=compare or [],
                             arousal=to_json(plan.policy) if plan.policy is not None else None,
                             shard=list(shard), shard_sha256=shard_data.sha256(), sums=sums)
            write_text(Path(report_dir) / PARTIAL_FILE, json_text(_sealed(to_json(record))) + "\n")
        return None
    if ranks.active:
        sums = _all_reduce(ranks, sums)
    with ranks.phase():
        plan, sums = with_spike_matched_run(plan, shard_data, sums, ranks)
    report = _finish(plan, sums, artifact, ranks.world)
    if report_dir is not None and ranks.leader:
        write_report(report, report_dir, plot_format)
    return report


def _digest(body: dict) -> str:
    return hashlib.sha256(json_text(body, sort_keys=True).encode()).hexdigest()


def _sealed(body: dict) -> dict:
    """A partial report with the sha256 of its contents, which ``merge`` checks: a report edited
    by hand or damaged in transit is refused (a checksum, not a signature: whoever edits the
    numbers can recompute it, as with an artifact's)."""
    return {**body, "sha256": _digest(body)}


def _unsealed(raw, path) -> dict:
    if not isinstance(raw, dict) or not isinstance(raw.get("sha256"), str):
        raise UserError(f"{path}: not an ann2snn partial report (no checksum)")
    body = {k: v for k, v in raw.items() if k != "sha256"}
    if raw["sha256"] != _digest(body):
        raise UserError(f"{path}: checksum mismatch: the partial report was modified after ann2snn wrote it")
    return body


def merge(partials: list[str | Path], report_dir: str | Path | None = None, *, source: DataSource = DataSource(),
          device: str = "cpu", model_ref: str | None = None, trust_code: bool = False,
          plot_format: str = "png") -> Report:
    """The report of the shards' partial reports added up: the same as one run over every sample
    (the artifact and data set are read again to plan the runs and check the ANN's answers; no
    spiking network is simulated), except
    that an arousal report lacks the spike-matched fixed-precision run, which needs the total."""
    if not partials:
        raise OptionError("partials", ": give the partial reports of every shard")
    records = [from_json(Partial, _unsealed(parse_json(read_input(p, "partial report"), str(p), "partial report"), p),
                         f"{p}: partial report") for p in partials]
    first, n = records[0], records[0].shard[1]
    for path, rec in zip(partials, records):
        if rec.format != PARTIAL_FORMAT or rec.version != PARTIAL_VERSION:
            raise UserError(f"{path}: not an ann2snn partial report of version {PARTIAL_VERSION}")
        same = (rec.artifact_sha256, rec.dataset, rec.run, rec.sweep, rec.compare, rec.arousal, rec.shard[1])
        if same != (first.artifact_sha256, first.dataset, first.run, first.sweep, first.compare, first.arousal, n):
            raise UserError(f"{path}: belongs to another evaluation than {partials[0]} (artifact, data, options or "
                            "shard count differ)")
    shards = sorted(rec.shard[0] for rec in records)
    if shards != list(range(n)):
        missing = sorted(set(range(n)) - set(shards)) or [s for s in shards if shards.count(s) > 1][:1]
        raise UserError(f"{partials[0]}: the partial reports must cover shards 0..{n - 1} once each "
                        f"(shard {missing[0]} is missing or repeated)")
    if file_sha256(check_input(first.artifact, "SNN artifact")) != first.artifact_sha256:  # before the data
        raise UserError(f"{first.artifact}: the artifact changed since the partial reports were written")
    if report_dir is not None:
        check_outputs(report_outputs(report_dir, plot_format),
                      [*partials, first.artifact, *data_files(first.dataset, source.data_dir)],
                      [("report folder", report_dir)])
    policy = from_json(ArousalPolicy, first.arousal, f"{partials[0]}: arousal") if first.arousal else None
    run = from_json(RunOptions, first.run, f"{partials[0]}: run options")
    plan = _prepare(first.artifact, first.dataset, run, source, device, first.sweep, first.compare, policy,
                    model_ref, trust_code)
    for path, rec in zip(partials, records):
        part = Ranks(rec.shard[0], n).shard(len(plan.data))
        shard_data = plan.data.subset(torch.arange(part.start, part.stop))
        if shard_data.sha256() != rec.shard_sha256:
            raise UserError(f"{path}: shard {rec.shard[0]}/{n} of {first.dataset} is not the data this partial "
                            "report was simulated on")
        _check_sums(rec.sums, plan, part, path)
        if not _same_ann(ann_per_sample(plan.art.ann, shard_data, run.batch_size, plan.device), rec.sums, shard_data):
            raise UserError(f"{path}: the ANN's answers in this partial report are not the artifact's on these "
                            "samples; it was not written by ann2snn as it is")
    ordered = sorted(records, key=lambda rec: rec.shard[0])  # per-sample lists join in sample order
    total = ordered[0].sums
    for rec in ordered[1:]:
        total = total + rec.sums
    if total.samples != len(plan.data):
        raise UserError(f"{partials[0]}: the shards hold {total.samples} samples, the data set {len(plan.data)}")
    report = _finish(plan, total, first.artifact, n)
    if report_dir is not None:
        write_report(report, report_dir, plot_format)
    return report


def _same_ann(mine: torch.Tensor, sums: Sums, data: TensorData) -> bool:
    """Whether a partial report's per-sample ANN results are ``mine`` (this process's): the same
    answers, or (regression, maybe computed on another device) errors |y_hat - y| equal to float32
    precision of the outputs."""
    theirs = torch.tensor(sums.ann_final, dtype=torch.float64)
    if data.task != "regression":
        return torch.equal(mine, theirs)
    scale = 1 + data.targets.double().abs() + mine.sqrt()
    return bool(((mine.sqrt() - theirs.sqrt()).abs() <= 1e-4 * scale).all())


def _check_sums(sums: Sums, plan: _Plan, part: range, path) -> None:
    """Refuse a partial report whose sums do not have the shapes its shard and plan give."""
    steps, layers = plan.run.timesteps, len(plan.art.meta.layers)
    ok = sums.samples == len(part) and len(sums.ann_final) == len(part) and len(sums.runs) == len(plan.runs) \
        and all(len(r.metric) == steps and len(r.final) == len(part)
                and [len(x) for x in r.spikes] == [steps] * layers and [len(x) for x in r.synops] == [steps] * layers
                for r in sums.runs)
    if not ok:
        raise UserError(f"{path}: the partial report's sums do not fit its shard ({len(part)} samples, "
                        f"{len(plan.runs)} runs, {layers} layers, {steps} steps)")
    counts = plan.ctx.metric == "accuracy"
    per_sample_ok = lambda xs: all(x in (0.0, 1.0) for x in xs) if counts else all(x >= 0 for x in xs)  # noqa
    transfer = counts and plan.art.neuron.transfer_module is not None  # as _simulate computes it: correct answers
    consistent = per_sample_ok(sums.ann_final) and abs(sum(sums.ann_final) - sums.ann) <= 1e-6 * (1 + abs(sums.ann)) \
        and (sums.transfer is None if not transfer else sums.transfer is not None
             and 0 <= sums.transfer <= len(part) and float(sums.transfer).is_integer()) \
        and sums.seconds >= 0 and 0 <= sums.ann_active_macs <= len(part) * plan.ctx.ann["macs_per_sample"] \
        and all(
            per_sample_ok(r.final) and abs(sum(r.final) - r.metric[-1]) <= 1e-6 * (1 + abs(r.metric[-1]))
            and all(0 <= m <= (len(part) if counts else float("inf")) for m in r.metric)
            and all(0 <= v < 1e18 for row in r.spikes + r.synops for v in row) and 0 <= r.aroused <= len(part)
            for r in sums.runs)
    if not consistent:
        raise UserError(f"{path}: the partial report's sums are inconsistent (counts out of range, or totals "
                        "that do not add up to the per-sample results); it was not written by ann2snn as it is")


def _prepare(artifact, dataset: str, run: RunOptions, source: DataSource, device: str, sweep: list[dict],
             compare: list[str], arousal, model_ref: str | None, trust_code: bool) -> _Plan:
    art = load_artifact(artifact, model_ref, trust_code)
    data = open_dataset(dataset, run.split, source.data_dir, source.download, art.meta.input.normalize,
                        source.skip_bad_images)
    return make_plan(art, data.head(run.limit), run, device, sweep, compare, arousal, str(artifact), dataset)


def run_plan(plan: _Plan) -> Report:
    """Simulate every run of ``plan`` on all its data in this process; the report (no file)."""
    plan, sums = with_spike_matched_run(plan, plan.data, _simulate(plan, plan.data), Ranks())
    return _finish(plan, sums, None)


def make_plan(art: Artifact, data: TensorData, run: RunOptions, device: str, sweep: list[dict], compare: list[str],
         arousal, source: str = "the network", dataset: str = "the data") -> _Plan:
    """Every run to simulate of a loaded artifact on ``data`` (``source`` and ``dataset`` name
    them in errors) and the report context."""
    dev = resolve_device(device)
    meta = art.meta
    policy = _arousal_policy(arousal, meta)
    runs = plan_runs(meta, art.neuron, sweep, [neurons.get(n, "compare") for n in compare], policy, source)
    if policy is not None and policy.at >= run.timesteps:
        raise OptionError("arousal", f"at={policy.at}: the decision must come before the last of the "
                                     f"{run.timesteps} steps")
    _check_data(art.ann, data, tuple(meta.input.shape), dataset, policy is not None)
    _check_time_codes(art, runs, run)
    check_memory(run.timesteps, len(meta.layers), len(runs))
    fanouts = Fanouts(art.ann, data.sample_shape)
    ctx = context(art.ann, data, fanouts(), meta.layer_names, {la.name: la.source for la in meta.layers}, dataset,
                  str(dev), run.preset)
    return _Plan(art, runs, policy, data, fanouts, ctx, run, dev)


def _check_time_codes(art: Artifact, runs: list[Run], run: RunOptions) -> None:
    """Refuse, before anything runs, steps that end before a time code's answer is complete and a
    readout start that a time code's readout (the output at each step) would ignore."""
    for r in runs:
        if r.neuron.window is None:
            continue
        if run.start_ms:
            raise OptionError("start_ms", f"{run.start_ms}: {r.neuron.label} reads its output at each step; there "
                                          "is no readout start to set")
        answer = answer_step(art.ann, r.neuron, {layer.name: layer.params for layer in r.layers})
        if answer > run.timesteps:
            raise OptionError("timesteps", f"{run.timesteps}: {r.label}'s answer is complete only at step {answer} "
                                           f"(its windows); give -T {answer} or more")


def _simulate(plan: _Plan, data: TensorData, on_batch: Callable[[int], None] | None = None) -> Sums:
    """Every run of the plan on ``data`` (some or all of the samples), as sums."""
    art, run, dev = plan.art, plan.run, plan.device
    transfer = None
    if art.neuron.transfer_module is not None and plan.ctx.metric == "accuracy":  # what the SNN tends to
        net = with_transfer(art.ann, art.neuron, art.meta.layers) if not art.neuron.exact_transfer else \
            transfer_network(art.ann, art.neuron, art.meta.layers, art.meta.layer_calibration)  # what it equals
        transfer = ann_metric_sum(net, data, run.batch_size, dev)
    runs, elapsed = [], 0.0
    for r in plan.runs:
        sums, seconds = _simulate_run(plan, r, data, on_batch)
        runs.append(sums)
        elapsed += seconds
    with counting_active_macs(art.ann) as active:  # one ANN pass: answers and zero-skipping MACs
        ann = ann_per_sample(art.ann, data, run.batch_size, dev)
    return Sums(samples=len(data), ann=float(ann.sum()), transfer=transfer, runs=runs, ann_final=ann.tolist(),
                ann_active_macs=active(), seconds=elapsed)


def _simulate_run(plan: _Plan, r: Run, data: TensorData, on_batch=None) -> tuple[RunSums, float]:
    """One run of the plan on ``data``: its sums and the seconds it took."""
    art, run = plan.art, plan.run
    # the ramps and the layer calibration were fitted for the artifact's own network: runs with other
    # layer parameters (a sweep of m_f or scale, arousal's start precision, another neuron type) run without them
    own = r.neuron is art.neuron and [x.params for x in r.layers] == [x.params for x in art.meta.layers]
    net = build_network(art.ann, r.neuron, r.layers, r.spec.options, run.timesteps, plan.fanouts,
                        maxpool=art.meta.maxpool, ramps=art.meta.bias_ramps if own else None,
                        calibration=art.meta.layer_calibration if own else None, start_ms=run.start_ms)
    controller = _fresh(r.controller)
    start = time.perf_counter()
    sim = net.simulate(data, run.timesteps, run.batch_size, plan.device, controller=controller, on_batch=on_batch,
                       label=r.label)
    return RunSums(metric=sim.metric.tolist(), spikes=sim.spikes.tolist(), synops=sim.synops.tolist(),
                   aroused=controller.count() if controller is not None else 0,
                   final=sim.final.tolist()), time.perf_counter() - start


MATCH_TOLERANCE = 0.01  # relative difference in spikes per sample
MATCH_TRIES = 8


def with_spike_matched_run(plan: _Plan, data: TensorData, sums: Sums, ranks: Ranks) -> tuple[_Plan, Sums]:
    """Under arousal, add the fixed-precision run that spends as many spikes per sample as the
    arousal run (within ``MATCH_TOLERANCE``): regula falsi (Illinois) on the fraction f of the
    way from the start precision (f = 0, the fixed-low run) to the raised one (f = 1, fixed
    high), spikes growing with f; the closest run tried is kept. ``data`` is this rank's share
    of the plan's samples; ``sums`` are over all of them. Nothing is added without arousal, for
    a neuron without ``PrecisionControl.between``, or when arousal spent no more than fixed low
    or no less than fixed high."""
    control = plan.art.neuron.precision_control
    if plan.policy is None or control is None or control.between is None:
        return plan, sums
    n = max(sums.samples, 1)
    spent = [sum(map(sum, r.spikes)) / n for r in sums.runs[:3]]  # arousal, fixed low, fixed high
    target = spent[0]
    if not spent[1] < target < spent[2]:
        return plan, sums
    main = plan.runs[0]
    ends = [(0.0, spent[1] - target), (1.0, spent[2] - target)]
    best = None
    for _ in range(MATCH_TRIES):
        (f0, e0), (f1, e1) = ends
        f = f0 - e0 * (f1 - f0) / (e1 - e0)
        run = matched_run(plan.art.neuron, plan.policy, main.spec, main.layers, f)
        mine, seconds = _simulate_run(plan, run, data)
        reduced = _reduce_run(ranks, mine) if ranks.active else mine
        error = sum(map(sum, reduced.spikes)) / n - target
        if best is None or abs(error) < abs(best[2]):
            best = (run, reduced, error, seconds)
        if abs(error) <= MATCH_TOLERANCE * target:
            break
        if (error < 0) == (e0 < 0):  # replaces the end on its side; Illinois: halve the other's error
            ends = [(f, error), (f1, e1 / 2)]
        else:
            ends = [(f0, e0 / 2), (f, error)]
    run, reduced, _, seconds = best
    return replace(plan, runs=[*plan.runs, run]), replace(sums, runs=[*sums.runs, reduced],
                                                          seconds=sums.seconds + seconds)


def _fresh(controller):
    """A new controller of the same policy, so that a plan can be simulated more than once."""
    return None if controller is None else type(controller)(controller.policy, controller.control)


def _all_reduce(ranks: Ranks, sums: Sums) -> Sums:
    flat = torch.tensor([sums.samples, sums.ann, sums.transfer or 0.0, sums.ann_active_macs]
                        + [r.aroused for r in sums.runs], dtype=torch.float64)
    flat = ranks.sum(flat).tolist()
    joined = lambda values: [v for part in ranks.gather(values) for v in part]  # noqa: E731  (rank order)
    runs = [replace(_reduce_run(ranks, r), aroused=int(flat[4 + i])) for i, r in enumerate(sums.runs)]
    return Sums(samples=int(flat[0]), ann=flat[1], transfer=None if sums.transfer is None else flat[2], runs=runs,
                ann_final=joined(sums.ann_final), ann_active_macs=flat[3], seconds=ranks.max(sums.seconds))


def _reduce_run(ranks: Ranks, r: RunSums) -> RunSums:
    """One run's sums added over the ranks (per-sample results joined in rank order)."""
    total = lambda values: ranks.sum(torch.tensor(values, dtype=torch.float64)).tolist()  # noqa: E731
    return RunSums(metric=total(r.metric), spikes=total(r.spikes), synops=total(r.synops), aroused=r.aroused,
                   final=[v for part in ranks.gather(r.final) for v in part])


def _finish(plan: _Plan, sums: Sums, artifact, parts: int = 1) -> Report:
    """The report of the sums over every sample of the plan's data, simulated in ``parts`` shards."""
    ctx, data, run = plan.ctx, plan.data, plan.run
    n = max(sums.samples, 1)
    ctx = replace(ctx, ann=dict(ctx.ann), ann_final=torch.tensor(sums.ann_final, dtype=torch.float64))
    ctx.ann[ctx.metric] = sums.ann / ctx.metric_norm if ctx.metric == "nmse" else sums.ann / n  # as the SNN's
    if sums.transfer is not None:
        ctx.ann["transfer_accuracy"] = sums.transfer / n
    ctx.ann["macs_per_sample_skipping_zeros"] = sums.ann_active_macs / n
    reports = []
    for r, s in zip(plan.runs, sums.runs):
        sim = SimulationResult(run.timesteps, sums.samples, torch.tensor(s.metric, dtype=torch.float64),
                               torch.tensor(s.spikes, dtype=torch.float64), torch.tensor(s.synops, dtype=torch.float64),
                               plan.art.meta.layer_names, torch.tensor(s.final, dtype=torch.float64))
        reports.append(build_report(sim, r, r.neuron.readout_for(r.spec.options, run.timesteps, run.start_ms), ctx))
        # how each layer ran, as its module was built (neurons.layer.SpikingLayer.backend)
        backends = {layer.name: r.neuron.build(layer.params).backend for layer in r.layers}
        if compiled.status():  # the compiler failed: those layers ran their step as it is
            backends = {k: "reference" if v == "compiled" else v for k, v in backends.items()}
            reports[-1].snn["compile_failed"] = compiled.status()
        reports[-1].snn["backend"] = backends
    meta = plan.art.meta
    if ctx.metric == "accuracy":  # each other run against the main one, on the same samples
        main = torch.tensor(sums.runs[0].final)
        for rep, s in zip(reports[1:], sums.runs[1:]):
            rep.snn["paired_vs_main_run"] = mcnemar(torch.tensor(s.final), main)
    report = replace(reports[0], artifact={"path": Path(artifact).name if artifact else None, "model": meta.model.ref,
                                           "maxpool": MAXPOOL_MODES[meta.maxpool]},
                     variants=[r.as_variant() for r in reports[1:]])
    if plan.policy is not None:
        matched = next((rep for rep, r in zip(reports, plan.runs) if r.spike_matched), None)
        report.arousal = arousal_report(plan.art.neuron, plan.policy, meta.arousal is not None,
                                        meta.arousal.search if meta.arousal else None, reports,
                                        sums.runs[0].aroused / n, matched)
    report.provenance = provenance(artifact, data, meta.calibration.seed, str(plan.device))
    elapsed = sums.seconds
    report.timing = {"seconds": round(elapsed, 3), "image_steps_per_second":
                     round(len(data) * run.timesteps * len(plan.runs) / elapsed, 1) if elapsed > 0 else None}
    if parts > 1:  # counts add up exactly in any order; squared errors may not, in their last bits
        report.timing.update(shards=parts, may_differ_from_one_process=["timing"] + (
            ["ann.nmse", "snn.nmse", "curve[].nmse", "variants[].snn.nmse", "variants[].curve[].nmse"]
            if ctx.metric == "nmse" else []))
    return report


def _arousal_policy(arousal: str | ArousalPolicy | None, meta: ArtifactMeta) -> ArousalPolicy | None:
    """The policy: given, or its keys over the artifact's stored policy (calibrate), then the defaults."""
    if isinstance(arousal, str):
        arousal = ArousalPolicy.parse(arousal, meta.arousal.policy if meta.arousal else None)
    if arousal is not None:
        arousal.check_layers(meta.layer_names)
    return arousal


def plan_runs(meta: ArtifactMeta, neuron: Neuron, sweep: list[dict], compare: list[Neuron],
              policy: ArousalPolicy | None, artifact: str = "the artifact") -> list[Run]:
    """Every simulation ``evaluate`` makes: the artifact as converted (or, with arousal, its three
    runs: ``arousal.arousal_runs``), then the sweep of its options, then the other neuron types."""
    knob = neuron.precision.knob if neuron.precision else None
    options = meta.neuron.options
    chosen = {k: options.get(k) for k in (neuron.operating_points[0] if neuron.operating_points else ())
              if k != knob and options.get(k) != neuron.defaults.get(k)}  # e.g. a sigma-delta ASN's theta0, taus
    runs = [Run(neuron.label + (f" {knob}={options[knob]}" if knob else "") + (f" {setting_text(chosen)}" if chosen
                                                                               else ""), neuron,
                *variant(meta, neuron, None, {}))]
    if policy is not None:
        if neuron.precision_control is None:
            labels = neurons.names(lambda n: n.precision_control is not None).upper().replace(", ", " or ")
            raise OptionError("arousal", f": needs an {labels} artifact, {artifact} is {neuron.label}")
        start = variant(meta, neuron, None, neuron.precision_control.start(policy))
        runs = arousal_runs(neuron, policy, *start)
    runs += [Run(f"{neuron.label} {' '.join(f'{k}={v}' for k, v in o.items())}", neuron,
                 *variant(meta, neuron, None, o)) for o in sweep]
    return runs + [Run(other.label, other, *variant(meta, neuron, other, {})) for other in compare]


def _check_data(ann: torch.nn.Module, data: TensorData, shape: tuple[int, ...], dataset: str, arousal: bool) -> None:
    """Refuse data the artifact's network cannot take, or whose classes it does not output."""
    if data.sample_shape != shape:
        raise OptionError("dataset", f"{dataset}: samples have shape {data.sample_shape}, the artifact expects {shape}")
    classes = model_outputs(ann, shape, dataset)
    if data.task == "regression" and classes > 1:
        raise OptionError("dataset", f"{dataset}: has real-valued targets (regression) but the network has {classes} "
                                     "outputs; give class indices")
    if data.task == "classification" and int(data.targets.max()) >= classes:
        raise OptionError("dataset", f"{dataset}: has class {int(data.targets.max())}, the network outputs {classes}")
    if arousal:
        check_class_scores(dataset, data.task, classes)
