"""The three product steps as library calls - calibrate, convert, evaluate - each taking plain
arguments and returning plain results, so the CLI, the demo and users' scripts share one path."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import neurons
from .arousal import ArousalController, ArousalPolicy, check_class_scores
from .artifact import build_neurons, load_artifact, save_artifact, variant
from .budget import policy_record, search, search_arousal
from .calibrate import activation_stats, check_profile, load_profile, make_profile, save_profile
from .checkpoint import file_sha256, load_model
from .convert import (MAXPOOL_MODES, Row, check_activations, graph_signature, normalize, slot_activations,
                      spiking_layers, to_snn)
from .data import Normalize, calibration_subset, open_dataset
from .energy import DEFAULT_PRESET, PRESETS, ann_macs, fanout_maps
from .errors import UserError
from .export import EXPORT_REF, SUFFIX, is_archive
from .finetune import with_transfer
from .report import build_report, write_report
from .simulate import ann_accuracy, resolve_device, simulate
from .zoo import model_kwargs


def neuron_options(neuron: str, overrides: dict) -> dict:
    """The neuron's defaults with the user's overrides, each checked."""
    kind = neurons.get(neuron)
    unknown = set(overrides) - set(kind.DEFAULTS)
    if unknown:
        raise UserError(f"--param {sorted(unknown)[0]}: not an option of neuron {neuron!r} "
                        f"(options: {', '.join(kind.DEFAULTS)})")
    options = {**kind.DEFAULTS, **overrides}
    if not 0 < float(options.get("percentile", 100)) <= 100:
        raise UserError(f"--percentile {options['percentile']}: must be in (0, 100]")
    return options


def calibrate(checkpoint: str | Path, model_ref: str | None, dataset: str, output: str | Path | None = None, *,
              neuron: str = "if", overrides: dict | None = None,
              samples: int = 1000, seed: int = 0, split: str = "train", batch_size: int = 256,
              device: str = "auto", data_dir: str | Path | None = None, download: bool = False,
              normalize_spec: str | None = None, user_args: dict | None = None,
              trust_pickle: bool = False, budget: float | None = None, timesteps: int | None = None,
              search_samples: int | None = None, arousal: str | None = None) -> tuple[dict, list[Row]]:
    """Fit per-layer operating points on a calibration subset, write the profile to ``output``
    (when given) and return (profile, pre-flight rows). With ``budget`` (spikes per sample over
    ``timesteps`` steps) the neuron's precision knob is searched on ``search_samples`` images
    (default: as many as 256,000 image-steps allow, at least 256) - or, given an ``arousal``
    policy (ASN), the arousal threshold; the policy is stored for ``evaluate --arousal``."""
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    if budget is not None and not budget > 0:
        raise UserError(f"--budget {budget:g}: must be a positive number of spikes per sample")
    if timesteps is not None and timesteps <= 0:
        raise UserError(f"--timesteps {timesteps}: must be positive")
    options = neuron_options(neuron, overrides or {})
    policy = None if arousal is None else ArousalPolicy.parse(arousal)
    if policy is not None and neuron != "asn":
        raise UserError(f"--arousal: calibrate stores and searches ASN policies; --neuron is {neuron!r} "
                        "(a VSN artifact takes --arousal in evaluate)")
    model_ref = _model_ref(model_ref, checkpoint)
    norm = Normalize.parse(normalize_spec)
    data = open_dataset(dataset, split, data_dir, download, norm)
    subset = calibration_subset(data, samples, seed)
    if model_ref == EXPORT_REF and user_args:
        raise UserError(f"--model-arg: {checkpoint} is a torch.export archive; its architecture takes no arguments")
    kwargs = model_kwargs(model_ref, data.sample_shape, data.num_classes, user_args)
    model = load_model(model_ref, kwargs, checkpoint, trust_pickle)
    gm, rows = normalize(model)
    if not spiking_layers(gm):
        raise UserError(f"--model {model_ref}: the network has no ReLU to turn into spiking neurons")
    check_activations(slot_activations(gm), neuron, getattr(neurons.get(neuron), "ACTIVATIONS", ("relu",)))
    outputs = _check_runs(gm, subset.sample_shape, dataset)
    dev = resolve_device(device)
    if policy is not None:
        policy.check_layers(spiking_layers(gm))
        check_class_scores(dataset, data.task, outputs)
    stats = activation_stats(gm, subset, float(options.get("percentile", 100.0)), batch_size, str(dev))
    record = arousal_record = None
    if budget is not None:
        steps = timesteps or getattr(neurons.get(neuron), "DEFAULT_TIMESTEPS", 200)
        n = search_samples or max(256, 256_000 // steps)
        if policy is not None:
            policy, arousal_record = search_arousal(gm, stats, options, policy, subset.head(n), budget, steps,
                                                    batch_size, dev)
        else:
            options, record = search(gm, stats, neuron, options, subset.head(n), budget, steps, batch_size, dev)
    model_info = {"ref": model_ref, "kwargs": kwargs, "checkpoint": str(checkpoint),
                  "checkpoint_sha256": file_sha256(checkpoint)}
    input_info = {"shape": list(data.sample_shape), "normalize": {"mean": norm.mean, "std": norm.std},
                  "encoding": "analog current: the input is fed unchanged to the first layer at every step"}
    data_info = {"dataset": dataset, "split": split, "samples": len(subset), "seed": seed}
    profile = make_profile(gm, stats, neuron, options, model_info, input_info, data_info)
    if record is not None:
        profile["budget_search"] = record
    if policy is not None:
        profile["arousal"] = {"policy": policy_record(policy),
                              **({"search": arousal_record} if arousal_record else {})}
    if output is not None:
        save_profile(profile, output)
    return profile, rows


def _model_ref(model_ref: str | None, checkpoint: str | Path) -> str:
    """The architecture: given by ``--model``, or carried by a ``torch.export`` archive."""
    if is_archive(checkpoint):
        if model_ref not in (None, EXPORT_REF):
            raise UserError(f"--model {model_ref}: {checkpoint} is a torch.export archive, which carries its own "
                            "architecture; leave --model out")
        return EXPORT_REF
    if model_ref is None:
        raise UserError(f"--model: required for {checkpoint} (a zoo name or package.module:callable); only "
                        f"a torch.export archive ({SUFFIX}) carries its own architecture")
    return model_ref


def _check_runs(gm: torch.nn.Module, shape: tuple[int, ...], dataset: str) -> int:
    """Run one blank input through the network; returns its number of outputs."""
    try:
        with torch.no_grad():
            return gm(torch.zeros((1, *shape))).shape[-1]
    except Exception as exc:
        raise UserError(f"--dataset {dataset}: the model does not accept inputs of shape {shape} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None


def convert(checkpoint: str | Path, calibration: str | Path, output: str | Path, *, model_ref: str | None = None,
            trust_pickle: bool = False, maxpool: str = "gated") -> tuple[dict, list[Row]]:
    """Swap the ANN's ReLUs for the profile's neurons and write the SNN artifact; ``maxpool``
    picks how max pooling acts on spikes (``convert.MAXPOOL_MODES``)."""
    if maxpool not in MAXPOOL_MODES:
        raise UserError(f"--maxpool {maxpool!r}: expected one of {', '.join(MAXPOOL_MODES)}")
    profile = load_profile(calibration)
    ref = profile["model"]["ref"]
    if model_ref is not None and model_ref != ref:
        raise UserError(f"--model {model_ref}: the calibration profile {calibration} was made for {ref!r}")
    model = load_model(ref, profile["model"]["kwargs"], checkpoint, trust_pickle)
    gm, rows = normalize(model)
    check_profile(profile, gm, file_sha256(checkpoint), calibration)
    snn = to_snn(gm, build_neurons(profile["neuron"], profile["layers"]), maxpool)
    archive = Path(checkpoint).read_bytes() if ref == EXPORT_REF else None  # the architecture travels along
    meta = {"model": profile["model"], "graph": graph_signature(gm), "input": profile["input"],
            "neuron": profile["neuron"], "layers": profile["layers"], "calibration": profile["data"],
            "maxpool": maxpool, **({"arousal": profile["arousal"]} if "arousal" in profile else {})}
    save_artifact(output, snn, meta, archive)
    return meta, rows


def evaluate(artifact: str | Path, dataset: str, timesteps: int, *, split: str = "test", limit: int | None = None,
             batch_size: int = 256, device: str = "auto", data_dir: str | Path | None = None,
             download: bool = False, preset: str = DEFAULT_PRESET, start_ms: int | None = None,
             sweep: list[dict] | None = None, compare: list[str] | None = None,
             arousal: str | ArousalPolicy | None = None, report_dir: str | Path | None = None,
             on_start: Callable[[int], None] | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Simulate the artifact on a data set and build (and, given ``report_dir``, write) the report.
    ``sweep`` re-runs the network with other options of its neuron (e.g. ``[{"m_f": 0.2}]``),
    ``compare`` with other neuron types fitted to the same calibration statistics; their
    accuracy-versus-spikes results go to ``report["variants"]`` and the plot."""
    if timesteps <= 0:
        raise UserError(f"--timesteps {timesteps}: must be positive")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit}: must be positive")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    if preset not in PRESETS:
        raise UserError(f"--energy {preset!r}: expected one of {', '.join(PRESETS)}")
    if start_ms is not None and not 0 <= start_ms < timesteps:
        raise UserError(f"--start-ms {start_ms}: must be in [0, timesteps)")
    dev = resolve_device(device)
    ann, _, meta = load_artifact(artifact)
    kind = neurons.get(meta["neuron"]["type"])
    stored = meta.get("arousal", {}).get("policy")
    if isinstance(arousal, str):  # keys not given: the artifact's policy (calibrate --arousal), then defaults
        arousal = ArousalPolicy.parse(arousal, stored)
    if arousal is not None:
        arousal.check_layers([layer["name"] for layer in meta["layers"]])
    runs = _runs(meta, sweep or [], compare or [], arousal, artifact)
    if arousal is not None and arousal.at >= timesteps:
        raise UserError(f"--arousal at={arousal.at}: the decision must come before the last of the "
                        f"{timesteps} steps")
    norm = Normalize(**meta["input"]["normalize"])
    data = open_dataset(dataset, split, data_dir, download, norm).head(limit)
    shape = tuple(meta["input"]["shape"])
    if data.sample_shape != shape:
        raise UserError(f"--dataset {dataset}: samples have shape {data.sample_shape}, the artifact expects {shape}")
    classes = _check_runs(ann, shape, dataset)
    if data.task == "classification" and int(data.targets.max()) >= classes:
        raise UserError(f"--dataset {dataset}: has class {int(data.targets.max())}, the network outputs {classes}")
    if arousal is not None:
        check_class_scores(dataset, data.task, classes)
    metric = "nmse" if data.task == "regression" else "accuracy"
    layers = [layer["name"] for layer in meta["layers"]]
    fan = fanout_maps(ann, shape)
    common = dict(units={name: int(fan[name].numel()) for name in layers},
                  ann={metric: None, "macs_per_sample": ann_macs(ann, shape)},
                  dataset={"name": Path(dataset).name if Path(dataset).exists() else dataset, "split": data.split,
                           "samples": len(data), "task": data.task},
                  metric_norm=float(((data.targets.double() - data.targets.double().mean()) ** 2).sum()),
                  device=str(dev), input_macs=float(fan["input"].sum()),
                  analog_macs_per_step=float(sum(f.sum() for k, f in fan.items() if k.endswith(":out"))),
                  preset=preset)
    if on_start:
        on_start(len(data) * len(runs))
    common["ann"][metric] = ann_accuracy(ann, data, batch_size, dev)
    if hasattr(kind, "transfer_module") and metric == "accuracy":  # what the SNN tends to: ReLUs replaced by f
        common["ann"]["transfer_accuracy"] = ann_accuracy(with_transfer(ann, kind, meta["layers"]), data,
                                                          batch_size, dev)
    reports, elapsed = [], 0.0
    for label, neuron_meta, neuron_layers, control in runs:
        run_kind = neurons.get(neuron_meta["type"])
        readout = run_kind.readout({**run_kind.DEFAULTS, **neuron_meta["options"],
                                    **({"start_ms": start_ms} if start_ms is not None else {})}).within(timesteps)
        snn = to_snn(ann, build_neurons(neuron_meta, neuron_layers), meta.get("maxpool", "gated"))
        start = time.perf_counter()
        sim = simulate(snn, layers, fan, data, timesteps, batch_size, dev, readout, on_batch, control)
        elapsed += time.perf_counter() - start
        rep = build_report(sim, {"neuron": neuron_meta, "layers": neuron_layers}, **common)
        rep["readout"] = readout.describe()
        rep["label"] = label
        reports.append(rep)
    report = reports[0]
    report["artifact"] = {"path": Path(artifact).name, "model": meta["model"]["ref"],
                          "maxpool": MAXPOOL_MODES[meta.get("maxpool", "gated")]}
    report["variants"] = [{k: r[k] for k in ("label", "neuron", "neuron_options", "readout", "snn", "layers", "curve")}
                          for r in reports[1:]]
    if arousal is not None:
        pick = lambda r: {"label": r["label"], metric: r["snn"][metric],  # noqa: E731
                          "spikes_per_sample": r["snn"]["spikes_per_sample"],
                          "firing_rate_hz": r["snn"]["firing_rate_hz"]}
        report["arousal"] = {"mechanism": AROUSAL_MECHANISMS[meta["neuron"]["type"]],
                             "policy": policy_record(arousal),
                             "policy_source": "the artifact's (calibrate --arousal), with --arousal's keys over it"
                             if stored else "--arousal's keys over the defaults",
                             "calibration_search": meta.get("arousal", {}).get("search"),
                             "description": arousal.describe(meta["neuron"]["type"]),
                             "fraction_aroused": runs[0][3].fraction(),
                             "with_arousal": pick(reports[0]), "fixed_low": pick(reports[1]),
                             "fixed_high": pick(reports[2])}
    timing = {"seconds": round(elapsed, 3),
              "image_steps_per_second": round(len(data) * timesteps * len(runs) / elapsed, 1) if elapsed > 0
              else math.inf}
    if report_dir is not None:
        write_report(report, report_dir, timing)
    report["timing"] = timing
    return report


AROUSAL_MECHANISMS = {"asn": "ASN precision per input: m_f, theta0 and h switched together",
                      "vsn": "VSN thresholds per input: multiplied by threshold_scale"}


def _runs(meta: dict, sweep: list[dict], compare: list[str], arousal: ArousalPolicy | None,
          artifact: str | Path) -> list[tuple]:
    """(label, neuron description, layers, controller) of every simulation ``evaluate`` runs:
    the artifact as converted (or, with arousal, at low precision under arousal control, then
    fixed low and fixed high precision), then the sweep, then the other neuron types."""
    base = meta["neuron"]["type"]
    for name in compare:
        neurons.get(name, "--compare")
    knob = getattr(neurons.get(base), "PRECISION", (None,))[0]
    label = base.upper() + (f" {knob}={meta['neuron']['options'][knob]}" if knob else "")
    runs = [(label, *variant(meta, None, {}), None)]
    where = f" in {'+'.join(arousal.layers)}" if arousal is not None and arousal.layers else ""
    if arousal is not None and base == "asn":
        neuron, low = variant(meta, None, {"m_f": arousal.low})
        neuron_high, high = variant(meta, None, {"m_f": arousal.high})
        if arousal.layers:  # fixed high precision in the named layers only, as arousal gives it
            neuron_high, high = neuron, [h if arousal.raises(h["name"]) else lo for lo, h in zip(low, high)]
        runs = [("ASN arousal", neuron, low, ArousalController(arousal)),
                (f"ASN m_f={arousal.low:g}", neuron, low, None),
                (f"ASN m_f={arousal.high:g}{where}", neuron_high, high, None)]
    elif arousal is not None and base == "vsn":
        neuron, layers = variant(meta, None, {})
        scale = arousal.threshold_scale
        scaled = [{**la, "params": {**la["params"], "threshold": _scaled(la["params"]["threshold"], scale)}}
                  if arousal.raises(la["name"]) else la for la in layers]
        runs = [("VSN arousal", neuron, layers, ArousalController(arousal)),
                ("VSN calibrated thresholds", neuron, layers, None),
                (f"VSN thresholds x {scale:g}{where}", neuron, scaled, None)]
    elif arousal is not None:
        raise UserError(f"--arousal: needs an ASN or VSN artifact, {artifact} is {base.upper()}")
    runs += [(f"{base.upper()} {' '.join(f'{k}={v}' for k, v in o.items())}", *variant(meta, None, o), None)
             for o in sweep]
    return runs + [(name.upper(), *variant(meta, name, {}), None) for name in compare]


def _scaled(threshold: float | list, scale: float) -> float | list:
    return [t * scale for t in threshold] if isinstance(threshold, list) else threshold * scale


def finetune(checkpoint: str | Path, calibration: str | Path, dataset: str, output: str | Path, *, epochs: int = 2,
             lr: float = 1e-4, batch_size: int = 128, seed: int = 0, device: str = "auto",
             data_dir: str | Path | None = None, download: bool = False, trust_pickle: bool = False,
             profile_output: str | Path | None = None, spike_penalty: float = 0.0,
             threshold_lr: float | None = None,
             on_epoch: Callable[[int, float, str], None] | None = None) -> dict:
    """Transfer-aware fine-tuning with the profile's neuron; writes a new checkpoint and its
    profile (``profile_output``, default OUTPUT with suffix ``.calib.json``): statistics measured
    on the new weights, layer parameters as trained - ASN scales kept (the network has learnt
    lambda f(x / lambda) for those lambda; a re-fit would move them), VSN thresholds learnt."""
    from .finetune import finetune as run, save_checkpoint  # noqa: I001

    if epochs <= 0:
        raise UserError(f"--epochs {epochs}: must be positive")
    if lr <= 0:
        raise UserError(f"--lr {lr}: must be positive")
    if threshold_lr is not None and threshold_lr <= 0:
        raise UserError(f"--threshold-lr {threshold_lr}: must be positive")
    if spike_penalty < 0:
        raise UserError(f"--spike-penalty {spike_penalty}: must be >= 0")
    profile = load_profile(calibration)
    if profile["model"]["ref"] == EXPORT_REF:
        raise UserError(f"{checkpoint}: fine-tuning needs the model's code (--model); a torch.export archive "
                        "holds an inference graph only")
    model = load_model(profile["model"]["ref"], profile["model"]["kwargs"], checkpoint, trust_pickle)
    check_profile(profile, normalize(model)[0], file_sha256(checkpoint), calibration)
    norm = Normalize(**profile["input"]["normalize"])
    train = open_dataset(dataset, "train", data_dir, download, norm)
    test = open_dataset(dataset, "test", data_dir, download, norm)
    dev = resolve_device(device)
    before = ann_accuracy(model, test, 1000, dev)  # fine-tuning trains a traced copy: model stays as loaded
    model.cpu()
    history: list[float] = []

    def epoch_done(epoch: int, acc: float) -> None:
        history.append(acc)
        if on_epoch:
            on_epoch(epoch, acc, "nmse" if test.task == "regression" else "accuracy")

    state, trained_layers = run(model, profile, train, test, epochs, lr, batch_size, seed, dev, spike_penalty,
                                threshold_lr, epoch_done)
    save_checkpoint(state, output, {"finetuned_from": Path(checkpoint).name, "neuron": profile["neuron"]["type"]})
    profile_output = Path(profile_output) if profile_output else Path(output).with_suffix(".calib.json")
    info = {"from_checkpoint": Path(checkpoint).name, "from_profile": Path(calibration).name, "epochs": epochs,
            "lr": lr, "threshold_lr": threshold_lr or lr, "seed": seed, "spike_penalty": spike_penalty,
            "layer_params": "as trained (not re-fitted)"}
    mean, std = profile["input"]["normalize"]["mean"], profile["input"]["normalize"]["std"]
    tuned_profile, _ = calibrate(output, profile["model"]["ref"], dataset, None, neuron=profile["neuron"]["type"],
                                 overrides={k: v for k, v in profile["neuron"]["options"].items()},
                                 samples=profile["data"]["samples"], seed=profile["data"]["seed"],
                                 split=profile["data"]["split"], device=device, data_dir=data_dir,
                                 normalize_spec=f"{','.join(map(str, mean))};{','.join(map(str, std))}" if mean
                                 else None, user_args=profile["model"]["kwargs"].get("user"))
    for layer, trained in zip(tuned_profile["layers"], trained_layers):
        layer["params"] = trained["params"]
    if "arousal" in profile:  # the policy carries over; its threshold search was for the old weights
        tuned_profile["arousal"] = {"policy": profile["arousal"]["policy"]}
    save_profile({**tuned_profile, "finetune": info}, profile_output)
    tuned = load_model(profile["model"]["ref"], profile["model"]["kwargs"], output)
    return {"relu_accuracy_before": before, "transfer_accuracy": history, "relu_accuracy_after":
            ann_accuracy(tuned, test, 1000, dev), "profile": str(profile_output),
            "metric": "nmse" if test.task == "regression" else "accuracy"}
