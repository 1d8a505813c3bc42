"""The product steps as library calls - calibrate, convert, evaluate (``evaluation.py``),
finetune - so the CLI, the demo and users' scripts share one path. Each takes typed options
(``options.py``), resolves the neuron type once and returns typed records (``Profile``,
``ArtifactMeta``, ``Report``).

Calibration and conversion are one pipeline on in-memory objects - ``calibrate_model`` (a model,
``TensorData`` and a checked ``CalibrationRequest`` to a ``Profile``) and ``convert_model`` (a
model and a profile to an ``Artifact``) - that the Python API (``api.py``) calls as it is; the
file-based ``calibrate`` and ``convert`` load the files, call it and save what it returns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ann2snn.sim import distributed
from ann2snn import neurons
from ann2snn.search import operating_point
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.sim.arousal import check_class_scores
from ann2snn.store.artifact import Artifact, ArtifactMeta, build_neurons, load_artifact, save_artifact
from ann2snn import progress
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.search import exact
from ann2snn.search.budget import fit_layer_calibration, fit_ramps, search, search_arousal
from ann2snn.conversion.statistics import activation_stats
from ann2snn.io.checkpoint import file_sha256, load_model, load_state, state_sha256
from ann2snn.conversion.graph import (MAXPOOL_MODES, Row, check_activations, graph_signature, normalize, slot_activations, spiking_layers, to_snn)
from ann2snn.io.data import Normalize, TensorData, calibration_subset, data_files, has_splits, open_dataset
from ann2snn.conversion.checks import check_memory, model_outputs
from ann2snn.conversion.equivalence import verify
from ann2snn.errors import OptionError, UserError
from ann2snn.io.files import atomic_path, check_outputs, safetensors_bytes
from ann2snn.neurons import Neuron
from ann2snn.options import LAYER_CALIBRATION_SAMPLES, CalibrationOptions, DataSource, FinetuneOptions
from ann2snn.store.profile import (ArousalRecord, DataInfo, InputInfo, ModelInfo, NeuronSpec, Profile, check_profile, load_profile, make_layers, save_profile)
from ann2snn.sim.network import answer_step as network_answer_step
from ann2snn.sim.simulate import ann_accuracy, resolve_device
from ann2snn.io.export_archive import EXPORT_REF, SUFFIX, is_archive
from ann2snn.search.transfer_training import train_with_transfer
from ann2snn.io.zoo import model_kwargs, resolve_model, stored_reference


IN_MEMORY = "(in memory)"  # what a profile records as the data set or checkpoint of objects given in memory
DEFAULT_MAXPOOL = next(iter(MAXPOOL_MODES))  # gated


def checked_options(neuron: Neuron, overrides: dict) -> dict:
    """The neuron's defaults with the user's overrides, each checked against its bounds; the
    calibration percentile, which has its own parameter in front ends, first (a front end that
    is given none passes none: the neuron's own default, ``Neuron.defaults``, stands)."""
    percentile = overrides.get("percentile", 100)
    if not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise OptionError("percentile", f"{percentile}: must be in (0, 100]")
    return neuron.options(overrides)


@dataclass(frozen=True)
class CalibrationRequest:
    """What a calibration asks for, checked (``calibration_request``) before any data is read."""

    neuron: Neuron
    neuron_options: dict  # the neuron's defaults with the user's options, checked
    arousal: ArousalPolicy | None  # the policy to store (and, with a budget, search), or None
    choose: bool  # calibrate chooses the operating point itself (``operating_point.choose``)
    options: CalibrationOptions


def calibration_request(neuron: str | Neuron, neuron_options: dict | None, arousal: str | ArousalPolicy | None,
                        options: CalibrationOptions) -> CalibrationRequest:
    """What a calibration asks for, checked before any data is read (the CLI and the API): the
    neuron type (a name is looked up), its options, the arousal policy (or None) and whether
    ``calibrate`` chooses the operating point itself (the neuron has candidates and the user
    named none of their options)."""
    kind = neurons.get(neuron) if isinstance(neuron, str) else neuron
    opts = checked_options(kind, neuron_options or {})
    policy = ArousalPolicy.parse(arousal) if isinstance(arousal, str) else arousal
    if policy is not None and kind.precision_control is None:
        raise OptionError("arousal", f": {{{{neuron}}}} {kind.name!r} has no precision to raise (arousal works with "
                                     f"{neurons.names(lambda n: n.precision_control is not None)})")
    steps = options.timesteps or kind.default_timesteps
    if policy is not None and options.budget is not None and policy.at >= steps:
        raise OptionError("arousal", f"at={policy.at}: the decision must come before the last of the {steps} "
                                     "steps the budget search simulates ({{timesteps}})")
    named = set(neuron_options or {})
    choose = bool(kind.operating_points) and not named & set(kind.operating_points[0]) or \
        kind.exact_transfer and kind.precision.knob not in named
    searched = [kind.precision.knob, *kind.precision.budget_grid] if kind.exact_transfer else []
    if kind.exact_transfer and options.budget is not None and (named & set(searched) or options.timesteps):
        what = f"{{{{param}}}} {min(named & set(searched))}" if named & set(searched) else "{{timesteps}}"
        raise OptionError("budget", f"{options.budget:g}: {kind.label} chooses its {' and '.join(searched)} for the "
                                    f"budget by forward passes; {what} has nothing to set here (leave it out)")
    if kind.exact_transfer and options.layer_calibration:
        raise OptionError("layer_calibration", f"{options.layer_calibration}: {kind.label} fits its layer calibration "
                                               "by a forward pass, under {{budget}} only; it takes no steps (use 0: "
                                               "none)")
    if options.search_samples is not None and options.budget is None and not (choose and policy is None):
        raise OptionError("search_samples", f"{options.search_samples}: nothing is searched here (it sets the images "
                                            "of a --budget search or of the operating point ASN or TTFS chooses when "
                                            "no precision option is named)")
    return CalibrationRequest(kind, opts, policy, choose, options)


BUDGET_IMAGE_STEPS = 256_000  # a --budget search simulates as many images as this allows (at least 256) ...
CHOICE_IMAGE_STEPS = 400_000  # ... and the operating-point choice, at the neuron's default steps


def search_set(subset: TensorData, wanted: int | None, image_steps: int, steps: int, seed: int) -> TensorData:
    """The images a search simulates: ``wanted`` of the calibration subset (refused beyond it),
    or as many as ``image_steps`` allow at ``steps`` a sample (at least 256); drawn at random
    from the subset (with its seed), since a subset in index order may be sorted by class."""
    if wanted is not None and wanted > len(subset):
        raise OptionError("search_samples", f"{wanted}: more than the {len(subset)} calibration images "
                                            "(raise --samples, or the data set has no more)")
    n = wanted or max(256, image_steps // steps)
    return subset if n >= len(subset) else calibration_subset(subset, n, seed)


def in_memory_info(model: nn.Module, digest: str) -> ModelInfo:
    """How a profile names a model given in memory: its class, and ``digest`` of its weights
    (``checkpoint.state_sha256``) for the checkpoint too."""
    cls = type(model)
    return ModelInfo(ref=f"{cls.__module__}:{cls.__qualname__}", kwargs={"user": {}}, checkpoint=IN_MEMORY,
                     checkpoint_sha256=digest, weights_sha256=digest)


def calibrate_model(model: nn.Module, data: TensorData, request: CalibrationRequest, *, device: str = "auto",
                    info: ModelInfo | None = None, model_ref: str | None = None, data_name: str = "data",
                    dataset: str = IN_MEMORY) -> tuple[Profile, list[Row]]:
    """Fit per-layer operating points on (the ``request.options.samples`` subset, drawn with its
    seed, of) ``data``; returns (profile, pre-flight rows). ``info``: where the model came from
    (its ``weights_sha256`` is set here; default ``in_memory_info``); ``model_ref`` names the
    model in errors (default its class), ``data_name`` the data, ``dataset`` is what the profile
    records. The model's own mode is left to the caller (``verify`` puts it in eval mode)."""
    o = request.options
    subset = calibration_subset(data, o.samples, o.seed) if len(data) > o.samples else data
    gm, rows = normalize_for(model, model_ref or type(model).__name__, request.neuron)
    outputs = model_outputs(gm, subset.sample_shape, data_name)
    verify(model, gm, next(subset.batches(o.batch_size))[0])
    digest = state_sha256(model)
    info = replace(info, weights_sha256=digest) if info is not None else in_memory_info(model, digest)
    if request.arousal is not None:
        request.arousal.check_layers(spiking_layers(gm))
        check_class_scores(data_name, subset.task, outputs)
    profile = fit_profile(gm, request.neuron, request.neuron_options, subset, info, dataset, o,
                          resolve_device(device), request.arousal, choose=request.choose)
    return profile, rows


def calibrate(checkpoint: str | Path, model_ref: str | None, dataset: str, output: str | Path | None = None, *,
              neuron: str = "if", neuron_options: dict | None = None,
              options: CalibrationOptions = CalibrationOptions(), source: DataSource = DataSource(),
              device: str = "auto", normalization: Normalize | str | None = None, model_args: dict | None = None,
              trust_pickle: bool = False, arousal: str | ArousalPolicy | None = None) -> tuple[Profile, list[Row]]:
    """``calibrate_model`` on files: the checkpoint and the data set are loaded, the profile is
    written to ``output`` (when given); returns (profile, pre-flight rows). ``normalization``:
    the input normalisation the model was trained with (``Normalize`` or its text 'MEAN;STD').
    With ``options.budget`` the neuron's precision knob is searched - or, given an ``arousal``
    policy (or its text), its threshold; the policy is stored for ``evaluate``."""
    request = calibration_request(neuron, neuron_options, arousal, options)
    norm = Normalize.parse(normalization) if isinstance(normalization, str) else normalization or Normalize()
    ranks = distributed.start(device)  # under torchrun: the budget search is shared, rank 0 writes
    device = distributed.rank_device(device)
    if ranks.leader:
        check_outputs([("calibration profile", output)], [checkpoint, *data_files(dataset, source.data_dir)])
    model_ref = _model_ref(model_ref, checkpoint)
    data = open_dataset(dataset, options.split, source.data_dir, source.download, norm, source.skip_bad_images)
    if model_ref == EXPORT_REF and model_args:
        raise OptionError("model_args", f": {checkpoint} is a torch.export archive; its architecture takes no arguments")
    kwargs = model_kwargs(model_ref, data.sample_shape, data.num_classes, model_args)
    model = load_model(model_ref, kwargs, checkpoint, trust_pickle)
    info = ModelInfo(ref=model_ref, kwargs=kwargs, checkpoint=str(checkpoint),
                     checkpoint_sha256=file_sha256(checkpoint))
    profile, rows = calibrate_model(model, data, request, device=device, info=info, model_ref=model_ref,
                                    data_name=dataset, dataset=dataset)
    if output is not None and ranks.leader:
        save_profile(profile, output)
    return profile, rows


def normalize_for(model: torch.nn.Module, model_ref: str, neuron: Neuron):
    """The normalised graph and pre-flight rows of ``model``, refused if ``neuron`` cannot fill it."""
    gm, rows = normalize(model)
    _check_fillable(gm, model_ref, neuron)
    return gm, rows


def _check_fillable(gm, model_ref: str, neuron: Neuron) -> None:
    """Refuse a graph with no spiking slot, or one holding an activation ``neuron`` cannot stand in for."""
    if not spiking_layers(gm):
        raise OptionError("model_ref", f"{model_ref}: the network has no ReLU to turn into spiking neurons")
    check_activations(slot_activations(gm), neuron.name, neuron.activations)


def fit_profile(gm, neuron: Neuron, opts: dict, subset: TensorData, model: ModelInfo, dataset: str,
                 options: CalibrationOptions, dev: torch.device, arousal: ArousalPolicy | None,
                 choose: bool = False) -> Profile:
    """Statistics on ``subset``, the budget or arousal search (or, with ``choose`` and neither,
    the operating point ``operating_point.choose`` picks), and the fitted layers."""
    record = arousal_record = chosen = None
    steps = options.timesteps or neuron.default_timesteps
    if options.budget is not None and not neuron.exact_transfer:
        check_memory(steps, len(spiking_layers(gm)), 1)
    stats = activation_stats(gm, subset, float(opts.get("percentile", 100.0)), options.batch_size, str(dev))
    exact_choice = exact_layers = exact_calibration = None
    if neuron.exact_transfer and (choose or options.budget is not None):  # forward passes, no simulation
        search_data = search_set(subset, options.search_samples, len(subset), 1, options.seed)
        samples = 0 if options.layer_calibration == 0 else options.layer_calibration_samples or len(search_data)
        opts, exact_choice, exact_layers, exact_calibration = exact.choose(
            gm, stats, neuron, opts, search_data, options.budget, options.batch_size, dev, samples)
    elif options.budget is not None:
        search_data = search_set(subset, options.search_samples, BUDGET_IMAGE_STEPS, steps, options.seed)
        if arousal is not None:
            arousal, arousal_record = search_arousal(gm, stats, neuron, opts, arousal, search_data, options.budget,
                                                     steps, options.batch_size, dev)
        else:
            opts, record = search(gm, stats, neuron, opts, search_data, options.budget, steps, options.batch_size,
                                  dev)
    elif choose and arousal is None:
        search_data = search_set(subset, options.search_samples, CHOICE_IMAGE_STEPS, neuron.default_timesteps,
                                 options.seed)
        opts, chosen = operating_point.choose(gm, stats, neuron, opts, neurons.BASELINE, search_data,
                                              options.batch_size, dev)
    layers = make_layers(gm, stats, neuron, opts)
    if exact_layers is not None:  # the search's per-layer parameters (TTFS: dead zones per layer)
        layers = [replace(layer, params=chosen.params) for layer, chosen in zip(layers, exact_layers)]
    ramps = fit_ramps(gm, neuron, layers, subset, steps, dev) if opts.get("bias_ramp") else None
    calibration = exact_calibration if neuron.exact_transfer else \
        _layer_calibration(gm, neuron, layers, subset, options, dev, ramps)
    return Profile(model=model, input=InputInfo(shape=list(subset.sample_shape), normalize=subset.normalize),
                   data=DataInfo(dataset=dataset, split=options.split, samples=len(subset), seed=options.seed),
                   neuron=NeuronSpec(type=neuron.name, options=opts), layers=layers,
                   budget_search=record, operating_point=chosen, bias_ramps=ramps, layer_calibration=calibration,
                   exact_choice=exact_choice,
                   arousal=ArousalRecord(policy=arousal, search=arousal_record) if arousal is not None else None)


def _layer_calibration(gm, neuron: Neuron, layers: list, subset: TensorData, options: CalibrationOptions,
                       dev: torch.device, ramps) -> LayerCalibrationRecord | None:
    """The layer calibration ``options`` ask for (default: the neuron's steps; 0: none)."""
    steps = neuron.layer_calibration if options.layer_calibration is None else options.layer_calibration
    if not steps:
        return None
    samples = min(options.layer_calibration_samples or LAYER_CALIBRATION_SAMPLES, len(subset))
    with progress.task(f"layer calibration: {steps} steps, {samples} images (layers)", len(layers)) as shown:
        return fit_layer_calibration(gm, neuron, layers, subset, steps, samples, dev, ramps, shown.advance)


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


def check_maxpool(maxpool: str) -> None:
    """Refuse a max-pooling mode that is not one of ``graph.MAXPOOL_MODES``."""
    if maxpool not in MAXPOOL_MODES:
        raise OptionError("maxpool", f"{maxpool!r}: expected one of {', '.join(MAXPOOL_MODES)}")


def artifact_meta(profile: Profile, gm, maxpool: str) -> ArtifactMeta:
    """What the artifact converted from ``profile`` (on the normalised graph ``gm``) records."""
    return ArtifactMeta(model=profile.model, graph=graph_signature(gm), input=profile.input, neuron=profile.neuron,
                        layers=profile.layers, calibration=profile.data, maxpool=maxpool,
                        arousal=profile.arousal, bias_ramps=profile.bias_ramps,
                        layer_calibration=profile.layer_calibration)


def convert_model(model: nn.Module, profile: Profile, *, maxpool: str = DEFAULT_MAXPOOL, source: str = "profile",
                  checkpoint_sha256: str | None = None, model_ref: str | None = None) -> tuple[Artifact, list[Row]]:
    """Swap the model's ReLUs for the profile's neurons; returns the ``Artifact`` (in memory) and
    the pre-flight rows. The profile (named ``source`` in errors) must be made for these weights
    (or, recording only its checkpoint file, for ``checkpoint_sha256``); ``maxpool`` picks how
    max pooling acts on spikes (``graph.MAXPOOL_MODES``); ``model_ref`` names the model in errors."""
    check_maxpool(maxpool)
    neuron = neurons.get(profile.neuron.type)
    gm, rows = normalize(model)
    check_profile(profile, gm, source, state_sha256(model), checkpoint_sha256)
    _check_fillable(gm, model_ref or type(model).__name__, neuron)
    shape = tuple(profile.input.shape)
    try:
        model_outputs(gm, shape, "")
    except UserError:
        raise UserError(f"{source}: the profile's input shape {list(shape)} does not fit the model") from None
    verify(model, gm, torch.randn((4, *shape), generator=torch.Generator().manual_seed(0)))
    try:
        snn = to_snn(gm, build_neurons(neuron, profile.layers, source), maxpool, profile.bias_ramps,
                     profile.layer_calibration)
    except UserError as exc:
        raise exc.within(f"{source}: ") from None
    return Artifact(gm.eval(), snn.eval(), artifact_meta(profile, gm, maxpool), neuron), rows


def convert(checkpoint: str | Path, calibration: str | Path, output: str | Path, *, model_ref: str | None = None,
            trust_pickle: bool = False, trust_code: bool = False, maxpool: str = DEFAULT_MAXPOOL
            ) -> tuple[ArtifactMeta, list[Row]]:
    """``convert_model`` on files: the checkpoint and its profile are loaded, the SNN artifact is
    written to ``output``. A profile naming a ``module:callable`` architecture is built only
    with the same ``model_ref`` or ``trust_code``."""
    check_maxpool(maxpool)
    check_outputs([("SNN artifact", output)], [checkpoint, calibration])
    profile = load_profile(calibration)
    ref = stored_reference(profile.model.ref, model_ref, trust_code, str(calibration), "calibration profile")
    model = load_model(ref, profile.model.kwargs, checkpoint, trust_pickle)
    artifact, rows = convert_model(model, profile, maxpool=maxpool, source=str(calibration),
                                   checkpoint_sha256=file_sha256(checkpoint), model_ref=ref)
    archive = Path(checkpoint).read_bytes() if ref == EXPORT_REF else None  # the architecture travels along
    save_artifact(output, artifact.snn, artifact.meta, archive)
    return artifact.meta, rows


@dataclass
class FinetuneResult:
    metric: str  # accuracy, or nmse for regression
    before: float  # the ANN (with its own activations) on what scored_on names (test, val or the file), before
    transfer: list[float]  # the transfer network on the same after each epoch
    after: float
    profile: Path  # the profile written beside the checkpoint
    scored_on: str = "test"  # what before, transfer and after were measured on (``scored_on``)


def scored_split(split: str) -> str:
    """The split fine-tuning scores each epoch on, training on ``split``: val for fit, else test."""
    return "val" if split == "fit" else "test"


def scored_on(dataset: str, split: str) -> str:
    """That split's name for the user; a file or folder has no splits, so there it is the
    training data itself."""
    return scored_split(split) if has_splits(dataset) else "training data (the file has no held-out split)"


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
                  [checkpoint, calibration, *data_files(dataset, source.data_dir)])
    profile, neuron, tuned_options, model = _finetune_inputs(checkpoint, calibration, trust_pickle, model_ref,
                                                             trust_code)
    train, test = (open_dataset(dataset, split, source.data_dir, source.download, profile.input.normalize,
                                source.skip_bad_images) for split in (options.split, scored_split(options.split)))
    dev = resolve_device(device)
    metric = "nmse" if test.task == "regression" else "accuracy"
    before = ann_accuracy(model, test, 1000, dev)  # fine-tuning trains a traced copy: model stays as loaded
    model.cpu()
    state, trained, history = _train(model, neuron, profile, train, test, options, dev,
                                     lambda epoch, acc: on_epoch and on_epoch(epoch, acc, metric))
    # the checkpoint and its profile are written together at the end, when both are whole
    blob = safetensors_bytes(state, {"finetuned_from": Path(checkpoint).name, "neuron": neuron.name})
    tuned = load_state(resolve_model(profile.model.ref, profile.model.kwargs), state, output)
    info = replace(profile.model, checkpoint=str(output), checkpoint_sha256=hashlib.sha256(blob).hexdigest(),
                   weights_sha256=state_sha256(tuned))
    measured = _remeasured(tuned, profile, neuron, tuned_options, trained, info, dataset, source, dev)
    arousal = ArousalRecord(policy=profile.arousal.policy) if profile.arousal else None  # the policy, not its search
    tuned_profile = replace(measured, arousal=arousal, finetune=_finetune_record(options, checkpoint, calibration))
    with atomic_path(output) as tmp_checkpoint:
        tmp_checkpoint.write_bytes(blob)
        save_profile(tuned_profile, profile_output)
    return FinetuneResult(metric, before, history, ann_accuracy(tuned, test, 1000, dev), profile_output,
                          scored_on(dataset, options.split))


def _finetune_inputs(checkpoint: str | Path, calibration: str | Path, trust_pickle: bool, model_ref: str | None,
                     trust_code: bool) -> tuple[Profile, Neuron, dict, nn.Module]:
    """The profile, its neuron type and options, and the model it was made for: each checked
    before anything is trained."""
    profile = load_profile(calibration)
    neuron = neurons.get(profile.neuron.type)
    if profile.model.ref == EXPORT_REF:
        raise UserError(f"{checkpoint}: fine-tuning needs the model's code; a torch.export archive holds an "
                        "inference graph only")
    stored_reference(profile.model.ref, model_ref, trust_code, str(calibration), "calibration profile")
    tuned_options = neuron.options(profile.neuron.options)  # checked now, not after training
    build_neurons(neuron, profile.layers, str(calibration))
    model = load_model(profile.model.ref, profile.model.kwargs, checkpoint, trust_pickle)
    check_profile(profile, normalize(model)[0], calibration, state_sha256(model), file_sha256(checkpoint))
    return profile, neuron, tuned_options, model


def _train(model: nn.Module, neuron: Neuron, profile: Profile, train: TensorData, test: TensorData,
           o: FinetuneOptions, dev: torch.device, on_epoch: Callable[[int, float], None]):
    """``train_with_transfer``: (the trained state, the layers as trained, the score after each
    epoch); a state that is no longer finite is refused."""
    history: list[float] = []

    def epoch_done(epoch: int, acc: float) -> None:
        history.append(acc)
        on_epoch(epoch, acc)

    state, trained = train_with_transfer(model, neuron, profile.layers, train, test, o.epochs, o.lr, o.batch_size,
                                         o.seed, dev, o.spike_penalty, o.threshold_lr, epoch_done)
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise OptionError("lr", f"{o.lr:g}: training diverged ({bad} holds NaN or infinite values after "
                                f"{o.epochs} epoch(s)); nothing was written - lower the learning rate")
    return state, trained, history


def _remeasured(tuned: nn.Module, profile: Profile, neuron: Neuron, tuned_options: dict, trained: list,
                info: ModelInfo, dataset: str, source: DataSource, dev: torch.device) -> Profile:
    """The fine-tuned model's profile: statistics of the new weights on the same calibration
    subset, the layer parameters as trained, the bias ramps fitted for those."""
    data = open_dataset(dataset, profile.data.split, source.data_dir, source.download, profile.input.normalize,
                        source.skip_bad_images)
    subset = calibration_subset(data, profile.data.samples, profile.data.seed)
    gm, _ = normalize_for(tuned, profile.model.ref, neuron)
    # the ramps (bias_ramp.py) are fitted below, for the layer parameters as trained
    unramped = {**tuned_options, **({"bias_ramp": False} if "bias_ramp" in tuned_options else {})}
    measured = fit_profile(gm, neuron, unramped, subset, info, dataset,
                           CalibrationOptions(samples=profile.data.samples, seed=profile.data.seed,
                                              split=profile.data.split, layer_calibration=0), dev, None)
    layers = [replace(m, params=t.params) for m, t in zip(measured.layers, trained)]
    ramps = fit_ramps(gm, neuron, layers, subset, neuron.default_timesteps, dev) if tuned_options.get("bias_ramp") \
        else None
    # refitted for the trained weights, as it was fitted before; a time code's is dropped: it trained without
    # it, and its SNN is then the transfer network that training scored
    old = None if neuron.exact_transfer else profile.layer_calibration
    calibration = None if old is None else _layer_calibration(
        gm, neuron, layers, subset, CalibrationOptions(layer_calibration=old.timesteps,
                                                       layer_calibration_samples=old.samples), dev, ramps)
    return replace(measured, neuron=replace(measured.neuron, options=tuned_options), layers=layers, bias_ramps=ramps,
                   layer_calibration=calibration)


def _finetune_record(o: FinetuneOptions, checkpoint: str | Path, calibration: str | Path) -> dict:
    """What the fine-tuned profile records of its origin and training."""
    return {"from_checkpoint": Path(checkpoint).name, "from_profile": Path(calibration).name,
            "epochs": o.epochs, "lr": o.lr, "threshold_lr": o.threshold_lr or o.lr,
            "seed": o.seed, "spike_penalty": o.spike_penalty, "split": o.split,
            "layer_params": "as trained (not re-fitted)"}


def default_answer_step(model: nn.Module, neuron: Neuron) -> int | None:
    """The answer step of ``model`` converted to a time code ``neuron`` at its default options
    (None for a rate code): what ``--compare`` refits it to."""
    gm, _ = normalize(model)
    return network_answer_step(gm, neuron, {name: neuron.defaults for name in spiking_layers(gm)})


def answer_step(artifact: str | Path, model_ref: str | None = None) -> int | None:
    """The step by which the answer of an artifact's time code is complete
    (``graph.slot_schedule``); None for a rate code, which answers from the first step on."""
    art = load_artifact(artifact, model_ref)
    return network_answer_step(art.ann, art.neuron, {layer.name: layer.params for layer in art.meta.layers})


from ann2snn.evaluation.evaluate import evaluate, merge  # noqa: E402,F401  (the evaluate step has its own module)


EXPORT_FORMATS = ("nir",)


def export(artifact: str | Path, output: str | Path, *, fmt: str = "nir", model_ref: str | None = None,
           trust_code: bool = False) -> None:
    """Write the artifact's network in another format (``nir_export.py``); the output never
    replaces the artifact."""
    if fmt not in EXPORT_FORMATS:
        raise OptionError("fmt", f"{fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    check_outputs([("exported network", output)], [artifact])
    from ann2snn.store.nir_export import write_nir

    write_nir(load_artifact(artifact, model_ref, trust_code), output)
