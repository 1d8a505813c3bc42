"""The SNN artifact: one ``.safetensors`` file holding the converted weights and neuron buffers,
with JSON metadata that says how to rebuild the network (architecture reference, normalised
graph signature, neuron type and per-layer parameters, input encoding, calibration summary).
A checksum over metadata and tensors makes an edited file fail to load instead of misleading.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import fx

from ann2snn.version import __version__
from ann2snn import neurons
from ann2snn.conversion.graph import MAXPOOL_MODES, analog_fed, check_activations, graph_signature, normalize, to_snn, spiking_layers
from ann2snn.errors import OptionError, UserError
from ann2snn.io.files import check_input, json_text, parse_json, tensor_problem, write_safetensors
from ann2snn.neurons import Neuron
from ann2snn.conversion.bias_ramp import BiasRampRecord
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.store.profile import (ArousalRecord, DataInfo, InputInfo, ModelInfo, NeuronSpec, ProfileLayer, check_layer_shapes)
from ann2snn.io.records import from_json, to_json
from ann2snn.io.export_archive import EXPORT_REF, read_export
from ann2snn.io.zoo import resolve_model, stored_reference

FORMAT = "ann2snn-snn"
VERSION = 1


@dataclass(kw_only=True)
class ArtifactMeta:
    """What an artifact says about its network: how to rebuild it (architecture, normalised
    graph signature, neuron type and per-layer parameters), its input and where its calibration
    came from."""

    format: str = FORMAT
    version: int = VERSION
    tool: str = f"ann2snn {__version__}"
    model: ModelInfo
    graph: list[str]
    input: InputInfo
    neuron: NeuronSpec
    layers: list[ProfileLayer]
    calibration: DataInfo
    maxpool: str = "gated"
    arousal: ArousalRecord | None = None
    bias_ramps: list[BiasRampRecord] | None = None  # bias_ramp.py
    layer_calibration: LayerCalibrationRecord | None = None  # layer_calibration.py

    def __post_init__(self):
        if self.maxpool not in MAXPOOL_MODES:
            raise ValueError(f"maxpool {self.maxpool!r}: one of {', '.join(MAXPOOL_MODES)}")

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def build_neurons(neuron: Neuron, layers: list[ProfileLayer], source: str = "") -> dict[str, torch.nn.Module]:
    """One spiking module per layer from its parameters, each checked against the neuron's
    bounds (``source``, e.g. the file they came from, prefixes the error)."""
    check_activations({layer.name: layer.activation or "relu" for layer in layers}, neuron.name,
                      neuron.activations)
    for layer in layers:
        try:
            neuron.check_params(layer.name, layer.params)
        except UserError as exc:
            raise exc.within(f"{source}: " if source else "") from None
    try:
        return {layer.name: neuron.build(layer.params) for layer in layers}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"bad neuron parameters in profile ({type(exc).__name__}: {exc})") from None


def variant(meta: ArtifactMeta, base: Neuron, other: Neuron | None, overrides: dict
            ) -> tuple[NeuronSpec, list[ProfileLayer]]:
    """(neuron description, layers) for the artifact's network (of type ``base``) run with
    changed options of its own neuron type, or with an ``other`` type fitted to the stored
    calibration statistics. Options that are per-layer parameters (ASN m_f) replace them, readout
    options (``Neuron.readout_options``) change the readout only; others (VSN tradeoff) are
    re-fitted. Options that act on calibration alone (``Neuron.calibration_only``) are refused."""
    neuron = other or base
    fixed = [k for k in overrides if k in neuron.calibration_only]
    if fixed:
        raise OptionError("sweep", f"{fixed[0]}: takes effect when calibrating (statistics, fitted ramps), so a "
                                   "sweep cannot change it; calibrate again with another value instead")
    neuron.options(overrides, option="sweep", over=meta.neuron.options if neuron is base else None)
    if neuron is base:
        options = {**meta.neuron.options, **overrides}
        fitted = [k for k in overrides if k not in neuron.readout_options]  # readout_tau: no refit
        if all(k in neuron.param_options and (k in layer.params or k in neuron.retuned)
               for k in fitted for layer in meta.layers):
            return NeuronSpec(type=neuron.name, options=options), [_swapped(layer, neuron, overrides, options)
                                                                   for layer in meta.layers]
    else:
        options = {**neuron.defaults, **overrides}
        if options.get("bias_ramp"):  # none were fitted for another type: say so in its options
            options["bias_ramp"] = False
    # refit from the stored statistics (their quantile table stands in for the calibration sample)
    layers = [replace(layer, params=neuron.fit(layer.fit_stats(), options)) for layer in meta.layers]
    return NeuronSpec(type=neuron.name, options=options), layers


def _swapped(layer: ProfileLayer, neuron: Neuron, overrides: dict, options: dict) -> ProfileLayer:
    """The layer with the overridden parameters swapped in, its fit kept (``Neuron.retune``)."""
    params = {**layer.params, **{k: v for k, v in overrides.items() if k in layer.params}}
    if neuron.retune is not None and any(k in neuron.retuned for k in overrides):
        params = neuron.retune(params, options, layer.stats.analog_input if layer.stats else None)
    return replace(layer, params=params)


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ARCHIVE_KEY = "__export_archive__"  # a torch.export archive the network was converted from, as bytes


def save_artifact(path: str | Path, snn: fx.GraphModule, meta: ArtifactMeta, archive: bytes | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in snn.state_dict().items()}
    if archive is not None:
        tensors[ARCHIVE_KEY] = torch.frombuffer(bytearray(archive), dtype=torch.uint8)
    meta_json = json_text(to_json(meta), sort_keys=True)
    write_safetensors(path, tensors, {"ann2snn": meta_json, "sha256": _digest(meta_json, tensors)})


def read_artifact(path: str | Path) -> tuple[ArtifactMeta, dict[str, torch.Tensor]]:
    """Metadata and tensors of an artifact, verified against its checksum."""
    path = check_input(path, "SNN artifact")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: not a readable .safetensors artifact ({exc})") from None
    if "ann2snn" not in header:
        raise UserError(f"{path}: not an ann2snn SNN artifact (no ann2snn metadata); run 'ann2snn convert' first")
    if header.get("sha256") != _digest(header["ann2snn"], tensors):
        raise UserError(f"{path}: checksum mismatch: the artifact was modified after ann2snn wrote it")
    meta = parse_json(header["ann2snn"], str(path), "artifact metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta if isinstance(meta, dict) else {}
        raise UserError(f"{path}: artifact format {found.get('format')} v{found.get('version')}, "
                        f"this tool reads {FORMAT} v{VERSION}")
    return from_json(ArtifactMeta, meta, f"{path}: artifact metadata"), tensors


@dataclass
class Artifact:
    """A loaded artifact: the normalised ANN and the SNN built from it, its metadata and its
    neuron type."""

    ann: fx.GraphModule
    snn: fx.GraphModule
    meta: ArtifactMeta
    neuron: Neuron


def load_artifact(path: str | Path, model_ref: str | None = None, trust_code: bool = False,
                  model: torch.nn.Module | None = None) -> Artifact:
    """Rebuild an artifact's networks; refuse, saying why, if the architecture it names no
    longer builds the same graph or the tensors do not fit. A ``module:callable`` architecture is
    imported only when the user names it (``model_ref``) or trusts the file (``zoo.stored_reference``);
    a ``model`` object given (the Python API) is the architecture, its own weights replaced."""
    meta, tensors = read_artifact(path)
    neuron = neurons.stored(meta.neuron.type, meta.neuron.options, str(path))
    if model is None:
        stored_reference(meta.model.ref, model_ref, trust_code, str(path), "SNN artifact")
        model = _architecture(meta, tensors, path)
    return rebuild(meta, tensors, model, neuron, str(path))


def _architecture(meta: ArtifactMeta, tensors: dict[str, torch.Tensor], path) -> torch.nn.Module:
    try:
        if meta.model.ref == EXPORT_REF:
            if ARCHIVE_KEY not in tensors:
                raise UserError("the torch.export archive it was converted from is missing")
            model = read_export(tensors.pop(ARCHIVE_KEY).numpy().tobytes(), name=f"{path} (embedded archive)")
        else:
            model = resolve_model(meta.model.ref, meta.model.kwargs)
    except UserError as exc:
        raise exc.within(f"{path}: cannot rebuild the architecture: ") from None
    return model


def rebuild(meta: ArtifactMeta, tensors: dict[str, torch.Tensor], model: torch.nn.Module, neuron: Neuron,
            path: str) -> Artifact:
    """The artifact's networks from the architecture ``model`` and the stored tensors."""
    tensors = {k: v for k, v in tensors.items() if k != ARCHIVE_KEY}
    ann, _ = normalize(model)
    if graph_signature(ann) != meta.graph:
        raise UserError(f"{path}: the architecture {meta.model.ref!r} no longer traces to the graph "
                        "this artifact was converted from")
    if meta.layer_names != spiking_layers(ann):
        raise UserError(f"{path}: the metadata's layers {meta.layer_names[:8]} are not the network's spiking layers "
                        f"{spiking_layers(ann)[:8]}")
    check_layer_shapes(meta.layers, ann, tuple(meta.input.shape), path)
    bad = next((k for k in sorted(tensors) if tensor_problem(tensors[k])), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad!r} {tensor_problem(tensors[bad])}")
    analog = analog_fed(ann)  # what artifacts from before analog_input was stored do not say
    meta.layers = [replace(layer, stats=replace(layer.stats, analog_input=layer.name in analog))
                   if layer.stats is not None and layer.stats.analog_input is None else layer for layer in meta.layers]
    try:
        snn = to_snn(ann, build_neurons(neuron, meta.layers, str(path)), meta.maxpool, meta.bias_ramps,
                     meta.layer_calibration)
    except UserError as exc:
        raise exc.within(f"{path}: ") from None
    own = snn.state_dict()
    if set(own) != set(tensors):
        diff = sorted(set(own) ^ set(tensors))[:4]
        raise UserError(f"{path}: tensors do not match the rebuilt network (differing keys: {', '.join(diff)})")
    spiking = set(meta.layer_names)
    for key, value in own.items():
        if tuple(value.shape) != tuple(tensors[key].shape):
            raise UserError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                            f"the network needs {tuple(value.shape)}")
        if key.split(".")[0] in spiking and not torch.equal(value, tensors[key].to(value.dtype)):
            raise UserError(f"{path}: tensor {key!r} disagrees with the layer parameters in the metadata")
    snn.load_state_dict(tensors)
    ann.load_state_dict({k: tensors[k] for k in ann.state_dict()})
    return Artifact(ann.eval(), snn.eval(), meta, neuron)
