"""The calibration profile: what ``calibrate`` measured and fitted, as typed records.

A profile (JSON, ``calibration/README.md``) holds the model it was made for, the input
encoding, the calibration data, the neuron type and options, and per spiking layer its
statistics and fitted parameters; optionally the record of a budget search, an arousal policy
and fine-tuning. The same ``ProfileLayer`` and ``ModelInfo`` records travel into the SNN
artifact's metadata (``artifact.ArtifactMeta``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from ann2snn.version import __version__
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.conversion.bias_ramp import BiasRampRecord
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.conversion.statistics import CHANNEL_QUANTILES, LayerStats, quantile_table
from ann2snn.conversion.graph import layer_sources, slot_shapes, spiking_layers
from ann2snn.io.data import Normalize
from ann2snn.errors import UserError
from ann2snn.io.files import json_text, parse_json, read_input, write_text
from ann2snn import neurons
from ann2snn.neurons import Neuron
from ann2snn.io.records import field, from_json, to_json

PROFILE_FORMAT = "ann2snn-calibration"
PROFILE_VERSION = 1
INPUT_ENCODING = "analog current: the input is fed unchanged to the first layer at every step"


@dataclass(kw_only=True)
class ModelInfo:
    """The architecture (zoo name, ``module:callable`` or ``pt2``), its constructor arguments
    (``kwargs["user"]``: the user's own) and the checkpoint it was calibrated on."""

    ref: str
    kwargs: dict
    checkpoint: str
    checkpoint_sha256: str | None = None
    weights_sha256: str | None = None  # checkpoint.state_sha256 of the loaded model: the Python API checks it


@dataclass(kw_only=True)
class InputInfo:
    shape: list[int]
    normalize: Normalize
    encoding: str = INPUT_ENCODING

    def __post_init__(self):
        if not self.shape or any(n <= 0 for n in self.shape):
            raise ValueError(f"shape {self.shape}: positive sizes")
        if len(self.normalize.mean) not in (0, 1, self.shape[0]):
            raise ValueError(f"normalize has {len(self.normalize.mean)} channels, the input {self.shape[0]}")


@dataclass(kw_only=True)
class DataInfo:
    """The calibration subset: ``samples`` images of ``dataset``'s ``split`` drawn with ``seed``."""

    dataset: str
    split: str
    samples: int
    seed: int

    def __post_init__(self):
        if not 0 < self.samples < 2 ** 40 or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"samples {self.samples} and seed {self.seed}: a positive count and a seed in [0, 2^63)")


@dataclass(kw_only=True)
class NeuronSpec:
    """A neuron type by name (``neurons.NEURONS``) and its network-wide options."""

    type: str
    options: dict


@dataclass(kw_only=True)
class StoredStats:
    """A layer's statistics as a profile keeps them: quantile tables stand in for the
    calibration activations when a neuron is re-fitted later."""

    max: float
    mean: float
    percentile: float
    zero_fraction: float
    sample_positive_fraction: float | None = None
    negative_energy_fraction: float | None = None
    positive_quantiles: list[float] = field(default_factory=list)
    channel_positive_fraction: list[float] | None = None
    channel_quantiles: list[list[float]] | None = None
    analog_input: bool | None = None  # reached by the analog input through no other slot (absent in older profiles)


@dataclass(kw_only=True)
class ProfileLayer:
    name: str
    source: str = ""
    activation: str | None = None  # relu when absent (profiles written before GELU/SiLU slots)
    neurons: int
    shape: list[int] = field(default_factory=list)
    stats: StoredStats | None = None
    params: dict

    def fit_stats(self) -> LayerStats:
        """Statistics for a neuron's ``fit``: the quantile table stands in for the sample."""
        if self.stats is None:
            raise UserError(f"layer {self.name}: the profile keeps no statistics to re-fit from")
        s = self.stats
        return LayerStats(activation=self.activation or "relu", neurons=self.neurons, shape=self.shape,
                          max=s.max, mean=s.mean, percentile=s.percentile, zero_fraction=s.zero_fraction,
                          sample=torch.tensor(s.positive_quantiles, dtype=torch.float32),
                          sample_positive_fraction=1.0 if s.sample_positive_fraction is None
                          else s.sample_positive_fraction,
                          negative_energy_fraction=s.negative_energy_fraction or 0.0,
                          channel_quantiles=s.channel_quantiles or [],
                          channel_positive_fraction=s.channel_positive_fraction or [],
                          analog_input=s.analog_input)


@dataclass(kw_only=True)
class SearchRecord:
    """Every candidate a budget search simulated, and the one it chose."""

    budget_spikes_per_sample: float
    timesteps: int
    samples: int
    knob: str
    candidates: list[dict]
    chosen: dict
    budget_met: bool


@dataclass(kw_only=True)
class ExactChoiceRecord:
    """The resolution a code with an exact transfer function (TTFS) was given by forward passes
    (``search/exact.py``): every candidate's accuracy, disagreement with the ANN, output error
    and spikes per sample; the bar (share of images allowed to disagree) or the spike budget; the
    one chosen, and whether it met the bar or budget."""

    knob: str
    samples: int
    bar: float | None
    budget_spikes_per_sample: float | None
    candidates: list[dict]
    chosen: dict
    met: bool


@dataclass(kw_only=True)
class OperatingPointRecord:
    """The operating point calibrate chose by itself (``operating_point.py``): the baseline's bars
    (accuracy gaps to the ANN, or its output error) with the step from which it stays within each
    and its spikes by then, every candidate with the same and its cost (worst ratio to the
    baseline's spikes), and the one chosen."""

    baseline: dict
    timesteps: int
    samples: int
    candidates: list[dict]
    chosen: dict
    bar_met: bool


@dataclass(kw_only=True)
class ArousalRecord:
    """The arousal policy ``evaluate --arousal`` starts from, and the search that set its threshold."""

    policy: ArousalPolicy
    search: SearchRecord | None = None


@dataclass(kw_only=True)
class Profile:
    format: str = PROFILE_FORMAT
    version: int = PROFILE_VERSION
    tool: str = f"ann2snn {__version__}"
    model: ModelInfo
    input: InputInfo
    data: DataInfo
    neuron: NeuronSpec
    layers: list[ProfileLayer]
    budget_search: SearchRecord | None = None
    operating_point: OperatingPointRecord | None = None
    arousal: ArousalRecord | None = None
    finetune: dict | None = None
    bias_ramps: list[BiasRampRecord] | None = None  # bias_ramp.py
    layer_calibration: LayerCalibrationRecord | None = None  # layer_calibration.py
    exact_choice: ExactChoiceRecord | None = None  # search/exact.py

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def make_layers(gm: fx.GraphModule, stats: dict[str, LayerStats], neuron: Neuron, options: dict
                ) -> list[ProfileLayer]:
    """Per-layer statistics (as stored) and the neuron parameters fitted to them."""
    sources = layer_sources(gm)
    return [ProfileLayer(
        name=name, source=sources[name], activation=s.activation, neurons=s.neurons, shape=s.shape,
        stats=StoredStats(
            max=s.max, mean=s.mean, percentile=s.percentile, zero_fraction=s.zero_fraction,
            sample_positive_fraction=s.sample_positive_fraction,
            negative_energy_fraction=s.negative_energy_fraction,
            positive_quantiles=quantile_table(s.sample),
            channel_positive_fraction=[float(f"{float((c > 0).float().mean()):.6g}") for c in s.channel_values],
            channel_quantiles=[quantile_table(c[c > 0], CHANNEL_QUANTILES) for c in s.channel_values],
            analog_input=s.analog_input),
        params=_fitted(neuron, name, s, options)) for name, s in stats.items()]


def _fitted(neuron: Neuron, name: str, stats: LayerStats, options: dict) -> dict:
    """The layer's fitted parameters, refused if the options drove them out of bounds (e.g. an
    ASN scale option so small that the fitted scale overflows)."""
    params = neuron.fit(stats, options)
    neuron.check_params(name, params)
    return params


def save_profile(profile: Profile, path: str | Path) -> None:
    """Indented JSON with every list of plain values on one line (readable, diffable)."""
    text = json_text(to_json(profile), indent=2)
    text = re.sub(r"\[\n\s+([^\[\]{}]*?)\n\s+\]",
                  lambda m: "[" + " ".join(line.strip() for line in m.group(1).splitlines()) + "]", text)
    write_text(path, text + "\n")


def load_profile(path: str | Path) -> Profile:
    """Read and check a profile; every problem is a one-line error naming the file and key."""
    path = Path(path)
    raw = parse_json(read_input(path, "calibration profile"), str(path), "calibration profile")
    if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
        raise UserError(f"{path}: not an ann2snn calibration profile (no \"format\": \"{PROFILE_FORMAT}\")")
    if raw.get("version") != PROFILE_VERSION:
        raise UserError(f"{path}: profile version {raw.get('version')!r}, this tool reads {PROFILE_VERSION}")
    profile = from_json(Profile, raw, f"{path}: calibration profile")
    neurons.stored(profile.neuron.type, profile.neuron.options, str(path))
    return profile


def check_profile(profile: Profile, gm: fx.GraphModule, path: str | Path, weights_sha: str,
                  checkpoint_sha: str | None = None) -> None:
    """Refuse a profile made for other weights (``checkpoint.state_sha256`` of the model, or,
    for profiles that record only the file, the checkpoint file's sha256) or another model,
    naming what differs; a profile with no checksum at all is refused."""
    model = profile.model
    if model.weights_sha256 is None and model.checkpoint_sha256 is None:
        raise UserError(f"{path}: the calibration profile holds no checksum of the weights it was made for, so "
                        "nothing tells whether these are the same: calibrate again")
    if model.weights_sha256 not in (None, weights_sha) or \
            model.weights_sha256 is None and model.checkpoint_sha256 != checkpoint_sha:
        raise UserError(f"{path}: calibration profile was made for other weights ({model.checkpoint}); "
                        "calibrate this model")
    layers = spiking_layers(gm)
    if profile.layer_names != layers:
        raise UserError(f"{path}: profile layers {profile.layer_names} do not match the model's spiking layers "
                        f"{layers}")
    if neurons.get(profile.neuron.type).exact_transfer and profile.bias_ramps:
        raise UserError(f"{path}: a {profile.neuron.type.upper()} profile holds bias ramps, which a time code does not "
                        "use")
    if profile.bias_ramps and not profile.neuron.options.get("bias_ramp"):
        raise UserError(f"{path}: the profile holds bias ramps but its options do not ask for them (bias_ramp)")
    check_layer_shapes(profile.layers, gm, tuple(profile.input.shape), path)
    channels = {layer.name: layer.shape[0] for layer in profile.layers if layer.shape}
    for ramp in profile.bias_ramps or []:
        if ramp.layer in channels and len(ramp.offset) != channels[ramp.layer]:
            raise UserError(f"{path}: bias ramp of {ramp.layer}: {len(ramp.offset)} offsets for "
                            f"{channels[ramp.layer]} channels")
    check_calibration(profile.layer_calibration, layers, channels, path)


def check_calibration(record: LayerCalibrationRecord | None, layers: list[str], channels: dict[str, int],
                      path: str | Path) -> None:
    """Refuse a layer calibration naming a layer that is not spiking, or whose values do not fit its channels."""
    for c in record.corrections if record is not None else []:
        if c.layer not in layers:
            raise UserError(f"{path}: layer calibration of {c.layer!r}, which is not a spiking layer of the network")
        if c.layer in channels and len(c.shift) != channels[c.layer]:
            raise UserError(f"{path}: layer calibration of {c.layer}: {len(c.shift)} values for "
                            f"{channels[c.layer]} channels")


def check_layer_shapes(layers: list[ProfileLayer], gm: fx.GraphModule, input_shape: tuple[int, ...],
                       path: str | Path) -> None:
    """Refuse layers (of a profile or an artifact) whose recorded shape is not the model's, or a
    per-channel parameter whose length is not the layer's channel count."""
    try:
        actual = slot_shapes(gm, input_shape)
    except Exception as exc:  # noqa: BLE001 - the model's own error, in one line
        raise UserError(f"{path}: the recorded input shape {list(input_shape)} does not fit the model "
                        f"({type(exc).__name__})") from None
    for layer in layers:
        shape = list(actual.get(layer.name, ()))
        if layer.shape and layer.shape != shape or layer.neurons != math.prod(shape):
            raise UserError(f"{path}: layer {layer.name} is recorded as {layer.shape or layer.neurons} neurons, "
                            f"the model's layer has shape {shape}")
        for key, value in layer.params.items():
            if isinstance(value, list) and len(value) != shape[0]:
                raise UserError(f"{path}: layer {layer.name}: {key} has {len(value)} per-channel values, the "
                                f"layer has {shape[0]} channels")
