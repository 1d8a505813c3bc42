"""The SNN artifact: one ``.safetensors`` file holding the converted weights and neuron buffers,
with JSON metadata that says how to rebuild the network (architecture reference, normalised
graph signature, neuron type and per-layer parameters, input encoding, calibration summary).
A checksum over metadata and tensors makes an edited file fail to load instead of misleading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import fx

from . import __version__, neurons
from .calibrate import fit_stats
from .convert import check_activations, graph_signature, normalize, to_snn
from .errors import UserError
from .export import EXPORT_REF, read_export
from .files import atomic_path
from .zoo import resolve_model

FORMAT = "ann2snn-snn"
VERSION = 1


def build_neurons(profile_neuron: dict, layers: list[dict]) -> dict[str, torch.nn.Module]:
    """One spiking module per layer from the profile's per-layer parameters."""
    kind = neurons.get(profile_neuron["type"])
    check_activations({layer["name"]: layer.get("activation", "relu") for layer in layers}, kind.NAME,
                      getattr(kind, "ACTIVATIONS", ("relu",)))
    try:
        return {layer["name"]: kind.build(layer["params"]) for layer in layers}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"bad neuron parameters in profile ({type(exc).__name__}: {exc})") from None


def variant(meta: dict, neuron: str | None, overrides: dict) -> tuple[dict, list[dict]]:
    """(neuron description, layers) for the artifact's network run with changed options of its
    own neuron type, or with another type fitted to the stored calibration statistics. Options
    that are per-layer parameters (ASN m_f) replace them, readout options (``READOUT_OPTIONS``) change
    the readout only; others (VSN tradeoff) are re-fitted."""
    base = meta["neuron"]["type"]
    neuron = neuron or base
    kind = neurons.get(neuron)
    unknown = set(overrides) - set(kind.DEFAULTS)
    if unknown:
        raise UserError(f"--sweep {sorted(unknown)[0]}: not an option of neuron {neuron!r} "
                        f"(options: {', '.join(kind.DEFAULTS)})")
    if neuron == base:
        options = {**meta["neuron"].get("options", {}), **overrides}
        fitted = [k for k in overrides if k not in getattr(kind, "READOUT_OPTIONS", ())]  # readout_tau: no refit
        if all(k in layer["params"] for k in fitted for layer in meta["layers"]):  # e.g. m_f: keep the fit
            return {"type": neuron, "options": options}, \
                [{**layer, "params": {**layer["params"], **overrides}} for layer in meta["layers"]]
    else:
        options = {**kind.DEFAULTS, **overrides}
    # refit from the stored statistics (their quantile table stands in for the calibration sample)
    layers = [{**layer, "params": kind.fit(fit_stats(layer), options)} for layer in meta["layers"]]
    return {"type": neuron, "options": options}, layers


def _digest(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for key in sorted(tensors):
        t = tensors[key].contiguous().cpu()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


ARCHIVE_KEY = "__export_archive__"  # a torch.export archive the network was converted from, as bytes


def save_artifact(path: str | Path, snn: fx.GraphModule, meta: dict, archive: bytes | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in snn.state_dict().items()}
    if archive is not None:
        tensors[ARCHIVE_KEY] = torch.frombuffer(bytearray(archive), dtype=torch.uint8)
    meta = {"format": FORMAT, "version": VERSION, "tool": f"ann2snn {__version__}", **meta}
    meta_json = json.dumps(meta, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ann2snn": meta_json, "sha256": _digest(meta_json, tensors)})


def read_artifact(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of an artifact, verified against its checksum."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: SNN artifact not found")
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
    try:
        meta = json.loads(header["ann2snn"])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: artifact metadata is not JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{path}: artifact format {meta.get('format')} v{meta.get('version')}, "
                        f"this tool reads {FORMAT} v{VERSION}")
    return meta, tensors


def load_artifact(path: str | Path) -> tuple[fx.GraphModule, fx.GraphModule, dict]:
    """Rebuild (normalised ANN, SNN, metadata) from an artifact; refuse, saying why, if the
    architecture it names no longer builds the same graph or the tensors do not fit."""
    meta, tensors = read_artifact(path)
    try:
        if meta["model"]["ref"] == EXPORT_REF:
            if ARCHIVE_KEY not in tensors:
                raise UserError("the torch.export archive it was converted from is missing")
            model = read_export(tensors.pop(ARCHIVE_KEY).numpy().tobytes(), name=f"{path} (embedded archive)")
        else:
            model = resolve_model(meta["model"]["ref"], meta["model"]["kwargs"])
    except UserError as exc:
        raise UserError(f"{path}: cannot rebuild the architecture: {exc}") from None
    ann, _ = normalize(model)
    if graph_signature(ann) != meta["graph"]:
        raise UserError(f"{path}: the architecture {meta['model']['ref']!r} no longer traces to the graph "
                        "this artifact was converted from")
    snn = to_snn(ann, build_neurons(meta["neuron"], meta["layers"]), meta.get("maxpool", "gated"))
    own = snn.state_dict()
    if set(own) != set(tensors):
        diff = sorted(set(own) ^ set(tensors))[:4]
        raise UserError(f"{path}: tensors do not match the rebuilt network (differing keys: {', '.join(diff)})")
    for key, value in own.items():
        if tuple(value.shape) != tuple(tensors[key].shape):
            raise UserError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                            f"the network needs {tuple(value.shape)}")
    snn.load_state_dict(tensors)
    ann.load_state_dict({k: tensors[k] for k in ann.state_dict()})
    return ann.eval(), snn.eval(), meta
