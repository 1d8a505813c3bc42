"""The product steps as library calls - calibrate, convert, evaluate, finetune - so the CLI, the
demo and users' scripts share one path. Each takes typed options (``options.py``), resolves the
neuron type once and returns typed records (``Profile``, ``ArtifactMeta``, ``Report``)."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from . import neurons
from .arousal import ArousalPolicy, arousal_runs, check_class_scores
from .artifact import ArtifactMeta, build_neurons, load_artifact, save_artifact, variant
from .budget import search, search_arousal
from .calibrate import activation_stats
from .checkpoint import file_sha256, load_model, load_state
from .convert import MAXPOOL_MODES, Row, check_activations, graph_signature, normalize, slot_activations, \
    spiking_layers, to_snn
from .data import Normalize, TensorData, calibration_subset, data_files, open_dataset
from .energy import fanout_maps
from .equivalence import verify
from .errors import OptionError, UserError
from .files import atomic_path, check_outputs, safetensors_bytes
from .neurons import Neuron
from .options import CalibrationOptions, DataSource, FinetuneOptions, RunOptions
from .profile import (ArousalRecord, DataInfo, InputInfo, ModelInfo, NeuronSpec, Profile, check_profile,
                      load_profile, make_layers, save_profile)
from .report import REPORT_FILES, Report, arousal_report, build_report, context, write_report
from .simulate import Run, ann_accuracy, resolve_device, simulate
from .torch_export import EXPORT_REF, SUFFIX, is_archive
from .transfer_training import train_with_transfer, with_transfer
from .zoo import model_kwargs, resolve_model, stored_reference


def checked_options(neuron: Neuron, overrides: dict) -> dict:
    """The neuron's defaults with the user's overrides, each checked against its bounds; the
    calibration percentile, which has its own parameter in front ends, first."""
    percentile = overrides.get("percentile", 100)
    if not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise OptionError("percentile", f"{percentile}: must be in (0, 100]")
    return neuron.options(overrides)


def calibrate(checkpoint: str | Path, model_ref: str | None, dataset: str, output: str | Path | None = None, *,
              neuron: str = "if", neuron_options: dict | None = None,
              options: CalibrationOptions = CalibrationOptions(), source: DataSource = DataSource(),
              device: str = "auto", normalization: Normalize | str | None = None, model_args: dict | None = None,
              trust_pickle: bool = False, arousal: str | ArousalPolicy | None = None) -> tuple[Profile, list[Row]]:
    """Fit per-layer operating points on a calibration subset, write the profile to ``output``
    (when given) and return (profile, pre-flight rows). ``normalization``: the input
    normalisation the model was trained with (``Normalize`` or its text 'MEAN;STD'). With
    ``options.budget`` the neuron's precision knob is searched - or, given an ``arousal`` policy
    (or its text), its threshold; the policy is stored for ``evaluate``."""
    kind = neurons.get(neuron)
    opts = checked_options(kind, neuron_options or {})
    policy = ArousalPolicy.parse(arousal) if isinstance(arousal, str) else arousal
    if policy is not None and kind.precision_control is None:
        raise OptionError("arousal", f": {{{{neuron}}}} {kind.name!r} has no precision to raise (arousal works with "
                                     f"{_names(lambda n: n.precision_control is not None)})")
    steps = options.timesteps or kind.default_timesteps
    if policy is not None and options.budget is not None and policy.at >= steps:
        raise OptionError("arousal", f"at={policy.at}: the decision must come before the last of the {steps} "
                                     "steps the budget search simulates ({{timesteps}})")
    norm = Normalize.parse(normalization) if isinstance(normalization, str) else normalization or Normalize()
    check_outputs([("calibration profile", output)], [checkpoint, *data_files(dataset)])
    model_ref = _model_ref(model_ref, checkpoint)
    data = open_dataset(dataset, options.split, source.data_dir, source.download, norm)
    subset = calibration_subset(data, options.samples, options.seed)
    if model_ref == EXPORT_REF and model_args:
        raise OptionError("model_args", f": {checkpoint} is a torch.export archive; its architecture takes no arguments")
    kwargs = model_kwargs(model_ref, data.sample_shape, data.num_classes, model_args)
    model = load_model(model_ref, kwargs, checkpoint, trust_pickle)
    gm, rows = normalize_for(model, model_ref, kind)
    outputs = _check_runs(gm, subset.sample_shape, dataset)
    verify(model, gm, next(subset.batches(options.batch_size))[0])
    if policy is not None:
        policy.check_layers(spiking_layers(gm))
        check_class_scores(dataset, data.task, outputs)
    model_info = ModelInfo(ref=model_ref, kwargs=kwargs, checkpoint=str(checkpoint),
                           checkpoint_sha256=file_sha256(checkpoint))
    profile = _fit_profile(gm, kind, opts, subset, model_info, dataset, options, resolve_device(device), policy)
    if output is not None:
        save_profile(profile, output)
    return profile, rows


def _names(which: Callable[[Neuron], bool]) -> str:
    """The registered neuron types with a capability, e.g. 'asn, vsn'."""
    return ", ".join(name for name, n in neurons.NEURONS.items() if which(n))


def normalize_for(model: torch.nn.Module, model_ref: str, neuron: Neuron):
    """The normalised graph and pre-flight rows of ``model``, refused if ``neuron`` cannot fill it."""
    gm, rows = normalize(model)
    if not spiking_layers(gm):
        raise OptionError("model_ref", f"{model_ref}: the network has no ReLU to turn into spiking neurons")
    check_activations(slot_activations(gm), neuron.name, neuron.activations)
    return gm, rows


def _fit_profile(gm, neuron: Neuron, opts: dict, subset: TensorData, model: ModelInfo, dataset: str,
                 options: CalibrationOptions, dev: torch.device, arousal: ArousalPolicy | None) -> Profile:
    """Statistics on ``subset``, the budget or arousal search, and the fitted layers."""
    record = arousal_record = None
    steps = options.timesteps or neuron.default_timesteps
    if options.budget is not None:
        _check_memory(steps, len(spiking_layers(gm)), 1)
    stats = activation_stats(gm, subset, float(opts.get("percentile", 100.0)), options.batch_size, str(dev))
    if options.budget is not None:
        search_data = subset.head(options.search_samples or max(256, 256_000 // steps))
        if arousal is not None:
            arousal, arousal_record = search_arousal(gm, stats, neuron, opts, arousal, search_data, options.budget,
                                                     steps, options.batch_size, dev)
        else:
            opts, record = search(gm, stats, neuron, opts, search_data, options.budget, steps, options.batch_size,
                                  dev)
    return Profile(model=model, input=InputInfo(shape=list(subset.sample_shape), normalize=subset.normalize),
                   data=DataInfo(dataset=dataset, split=options.split, samples=len(subset), seed=options.seed),
                   neuron=NeuronSpec(type=neuron.name, options=opts), layers=make_layers(gm, stats, neuron, opts),
                   budget_search=record,
                   arousal=ArousalRecord(policy=arousal, search=arousal_record) if arousal is not None else None)


def _model_ref(model_ref: str | None, checkpoint: str | Path) -> str:
    """The architecture: given by ``model_ref``, or carried by a ``torch.export`` archive."""
    if is_archive(checkpoint):
        if model_ref not in (None, EXPORT_REF):
            raise OptionError("model_ref", f"{model_ref}: {checkpoint} is a torch.export archive, which carries its own "
                                       "architecture; leave {{model_ref}} out")
        return EXPORT_REF
    if model_ref is None:
        raise OptionError("model_ref", f": required for {checkpoint} (a zoo name or package.module:callable); only "
                                   f"a torch.export archive ({SUFFIX}) carries its own architecture")
    return model_ref


def _check_runs(gm: torch.nn.Module, shape: tuple[int, ...], dataset: str) -> int:
    """Run one blank input through the network; returns its number of outputs."""
    try:
        with torch.no_grad():
            return gm(torch.zeros((1, *shape))).shape[-1]
    except Exception as exc:
        raise OptionError("dataset", f"{dataset}: the model does not accept inputs of shape {shape} "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
                          ) from None


def convert(checkpoint: str | Path, calibration: str | Path, output: str | Path, *, model_ref: str | None = None,
            trust_pickle: bool = False, trust_code: bool = False, maxpool: str = "gated"
            ) -> tuple[ArtifactMeta, list[Row]]:
    """Swap the ANN's ReLUs for the profile's neurons and write the SNN artifact; ``maxpool``
    picks how max pooling acts on spikes (``convert.MAXPOOL_MODES``). A profile naming a
    ``module:callable`` architecture is built only with the same ``model_ref`` or ``trust_code``."""
    if maxpool not in MAXPOOL_MODES:
        raise OptionError("maxpool", f"{maxpool!r}: expected one of {', '.join(MAXPOOL_MODES)}")
    check_outputs([("SNN artifact", output)], [checkpoint, calibration])
    profile = load_profile(calibration)
    neuron = neurons.get(profile.neuron.type)
    ref = stored_reference(profile.model.ref, model_ref, trust_code, str(calibration), "calibration profile")
    model = load_model(ref, profile.model.kwargs, checkpoint, trust_pickle)
    gm, rows = normalize(model)
    check_profile(profile, gm, file_sha256(checkpoint), calibration)
    shape = tuple(profile.input.shape)
    try:
        _check_runs(gm, shape, "")
    except UserError:
        raise UserError(f"{calibration}: the profile's input shape {list(shape)} does not fit the model") from None
    verify(model, gm, torch.randn((4, *shape), generator=torch.Generator().manual_seed(0)))
    snn = to_snn(gm, build_neurons(neuron, profile.layers, str(calibration)), maxpool)
    archive = Path(checkpoint).read_bytes() if ref == EXPORT_REF else None  # the architecture travels along
    meta = ArtifactMeta(model=profile.model, graph=graph_signature(gm), input=profile.input, neuron=profile.neuron,
                        layers=profile.layers, calibration=profile.data, maxpool=maxpool,
                        arousal=profile.arousal)
    save_artifact(output, snn, meta, archive)
    return meta, rows


def evaluate(artifact: str | Path, dataset: str, run: RunOptions, *, source: DataSource = DataSource(),
             device: str = "auto", sweep: list[dict] | None = None, compare: list[str] | None = None,
             arousal: str | ArousalPolicy | None = None, report_dir: str | Path | None = None,
             model_ref: str | None = None, trust_code: bool = False,
             on_start: Callable[[int], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> Report:
    """Simulate the artifact on a data set and build (and, given ``report_dir``, write) the report.
    ``sweep`` re-runs the network with other options of its neuron (e.g. ``[{"m_f": 0.2}]``),
    ``compare`` with other neuron types fitted to the same calibration statistics, ``arousal``
    (a policy, or its text over the artifact's stored policy) under per-input precision control
    beside fixed low and high precision; the other runs go to ``report.variants`` and the plot."""
    dev = resolve_device(device)
    if report_dir is not None:
        check_outputs([("report", Path(report_dir) / name) for name in REPORT_FILES], [artifact, *data_files(dataset)],
                      [("report folder", report_dir)])
    art = load_artifact(artifact, model_ref, trust_code)
    meta = art.meta
    policy = _arousal_policy(arousal, meta)
    runs = plan_runs(meta, art.neuron, sweep or [], [neurons.get(n, "compare") for n in compare or []], policy,
                     str(artifact))
    if policy is not None and policy.at >= run.timesteps:
        raise OptionError("arousal", f"at={policy.at}: the decision must come before the last of the "
                                     f"{run.timesteps} steps")
    data = open_dataset(dataset, run.split, source.data_dir, source.download, meta.input.normalize).head(run.limit)
    _check_data(art.ann, data, tuple(meta.input.shape), dataset, policy is not None)
    _check_memory(run.timesteps, len(meta.layers), len(runs))
    layers = meta.layer_names
    fan = fanout_maps(art.ann, data.sample_shape)
    ctx = context(art.ann, data, fan, layers, {la.name: la.source for la in meta.layers}, dataset, str(dev),
                  run.preset)
    if on_start:
        on_start(len(data) * len(runs))
    ctx.ann[ctx.metric] = ann_accuracy(art.ann, data, run.batch_size, dev)
    if art.neuron.transfer_module is not None and ctx.metric == "accuracy":  # what the SNN tends to: ReLU -> f
        ctx.ann["transfer_accuracy"] = ann_accuracy(with_transfer(art.ann, art.neuron, meta.layers), data,
                                                    run.batch_size, dev)
    reports, elapsed = [], 0.0
    for r in runs:
        readout = r.neuron.readout_for(r.spec.options, run.timesteps, run.start_ms)
        snn = to_snn(art.ann, build_neurons(r.neuron, r.layers), meta.maxpool)
        start = time.perf_counter()
        sim = simulate(snn, layers, fan, data, run.timesteps, run.batch_size, dev, readout, on_batch, r.controller)
        elapsed += time.perf_counter() - start
        reports.append(build_report(sim, r, readout, ctx))
    report = replace(reports[0], artifact={"path": Path(artifact).name, "model": meta.model.ref,
                                           "maxpool": MAXPOOL_MODES[meta.maxpool]},
                     variants=[r.as_variant() for r in reports[1:]])
    if policy is not None:
        report.arousal = arousal_report(art.neuron, policy, meta.arousal is not None,
                                        meta.arousal.search if meta.arousal else None, reports,
                                        runs[0].controller.fraction())
    report.timing = {"seconds": round(elapsed, 3), "image_steps_per_second":
                     round(len(data) * run.timesteps * len(runs) / elapsed, 1) if elapsed > 0 else None}
    if report_dir is not None:
        write_report(report, report_dir)
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
    runs = [Run(neuron.label + (f" {knob}={meta.neuron.options[knob]}" if knob else ""), neuron,
                *variant(meta, neuron, None, {}))]
    if policy is not None:
        if neuron.precision_control is None:
            labels = _names(lambda n: n.precision_control is not None).upper().replace(", ", " or ")
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
    classes = _check_runs(ann, shape, dataset)
    if data.task == "classification" and int(data.targets.max()) >= classes:
        raise OptionError("dataset", f"{dataset}: has class {int(data.targets.max())}, the network outputs {classes}")
    if arousal:
        check_class_scores(dataset, data.task, classes)


def _check_memory(timesteps: int, layers: int, runs: int) -> None:
    """Refuse a number of steps whose per-step curves would not fit in free memory."""
    per_step = 8 * 2 * (2 * layers + 1) + 700 * runs  # counters, and one curve row per run (report, CSV)
    need = timesteps * per_step
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free and need > free // 2:
        raise OptionError("timesteps", f"{timesteps}: the per-step results of {runs} run(s) would need about "
                                       f"{need / 2 ** 30:.1f} GiB, more than half the {free / 2 ** 30:.1f} GiB "
                                       "of free memory")


@dataclass
class FinetuneResult:
    metric: str  # accuracy, or nmse for regression
    before: float  # the ANN (with its own activations) on the test split, before
    transfer: list[float]  # the transfer network on the test split after each epoch
    after: float
    profile: Path  # the profile written beside the checkpoint


def finetune(checkpoint: str | Path, calibration: str | Path, dataset: str, output: str | Path, *,
             options: FinetuneOptions = FinetuneOptions(), source: DataSource = DataSource(), device: str = "auto",
             trust_pickle: bool = False, profile_output: str | Path | None = None, model_ref: str | None = None,
             trust_code: bool = False, on_epoch: Callable[[int, float, str], None] | None = None) -> FinetuneResult:
    """Transfer-aware fine-tuning with the profile's neuron; writes a new checkpoint and its
    profile (``profile_output``, default OUTPUT with suffix ``.calib.json``): statistics measured
    on the new weights, layer parameters as trained - ASN scales kept (the network has learnt
    lambda f(x / lambda) for those lambda; a re-fit would move them), VSN thresholds learnt."""
    if Path(output).suffix != ".safetensors":
        raise OptionError("output", f"{output}: the fine-tuned checkpoint is written as .safetensors; name it so")
    profile_output = Path(profile_output) if profile_output else Path(output).with_suffix(".calib.json")
    check_outputs([("checkpoint", output), ("calibration profile", profile_output)],
                  [checkpoint, calibration, *data_files(dataset)])
    profile = load_profile(calibration)
    neuron = neurons.get(profile.neuron.type)
    if profile.model.ref == EXPORT_REF:
        raise UserError(f"{checkpoint}: fine-tuning needs the model's code; a torch.export archive holds an "
                        "inference graph only")
    stored_reference(profile.model.ref, model_ref, trust_code, str(calibration), "calibration profile")
    tuned_options = neuron.options(profile.neuron.options)  # checked now, not after training
    build_neurons(neuron, profile.layers, str(calibration))
    model = load_model(profile.model.ref, profile.model.kwargs, checkpoint, trust_pickle)
    check_profile(profile, normalize(model)[0], file_sha256(checkpoint), calibration)
    train = open_dataset(dataset, "train", source.data_dir, source.download, profile.input.normalize)
    test = open_dataset(dataset, "test", source.data_dir, source.download, profile.input.normalize)
    dev = resolve_device(device)
    metric = "nmse" if test.task == "regression" else "accuracy"
    before = ann_accuracy(model, test, 1000, dev)  # fine-tuning trains a traced copy: model stays as loaded
    model.cpu()
    history: list[float] = []

    def epoch_done(epoch: int, acc: float) -> None:
        history.append(acc)
        if on_epoch:
            on_epoch(epoch, acc, metric)

    o = options
    state, trained = train_with_transfer(model, neuron, profile.layers, train, test, o.epochs, o.lr, o.batch_size,
                                         o.seed, dev, o.spike_penalty, o.threshold_lr, epoch_done)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise OptionError("lr", f"{o.lr:g}: training diverged ({bad} holds NaN or infinite values after "
                                f"{o.epochs} epoch(s)); nothing was written - lower the learning rate")
    # the checkpoint and its profile are written together at the end, when both are whole
    blob = safetensors_bytes(state, {"finetuned_from": Path(checkpoint).name, "neuron": neuron.name})
    tuned = load_state(resolve_model(profile.model.ref, profile.model.kwargs), state, output)
    # statistics of the new weights on the same calibration subset; the layer parameters as trained
    data = open_dataset(dataset, profile.data.split, source.data_dir, source.download, profile.input.normalize)
    subset = calibration_subset(data, profile.data.samples, profile.data.seed)
    gm, _ = normalize_for(tuned, profile.model.ref, neuron)
    info = replace(profile.model, checkpoint=str(output), checkpoint_sha256=hashlib.sha256(blob).hexdigest())
    measured = _fit_profile(gm, neuron, tuned_options, subset, info,
                            dataset, CalibrationOptions(samples=profile.data.samples,
                                                                     seed=profile.data.seed, split=profile.data.split),
                            dev, None)
    tuned_profile = replace(measured, layers=[replace(m, params=t.params) for m, t in zip(measured.layers, trained)],
                            arousal=ArousalRecord(policy=profile.arousal.policy) if profile.arousal else None,
                            finetune={"from_checkpoint": Path(checkpoint).name, "from_profile": Path(calibration).name,
                                      "epochs": o.epochs, "lr": o.lr, "threshold_lr": o.threshold_lr or o.lr,
                                      "seed": o.seed, "spike_penalty": o.spike_penalty,
                                      "layer_params": "as trained (not re-fitted)"})
    with atomic_path(output) as tmp_checkpoint:
        tmp_checkpoint.write_bytes(blob)
        save_profile(tuned_profile, profile_output)
    return FinetuneResult(metric, before, history, ann_accuracy(tuned, test, 1000, dev), profile_output)
