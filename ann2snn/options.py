"""The typed options of each product step, checked once where they are made.

Front ends (the CLI, scripts, notebooks) build these and hand them to ``pipeline``; every check
names the library parameter at fault (``errors.OptionError``), which the CLI renames to its flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ann2snn.sim.energy import DEFAULT_PRESET, PRESETS
from ann2snn.errors import OptionError


_INTEGER = re.compile(r"[+-]?[0-9]+")
_REAL = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)


def parse_number(text: str, option: str, integer: bool = False, item: str | None = None) -> int | float:
    """``text`` (spaces around it aside) as an integer or, unless ``integer``, a real number, written
    in ASCII: Python's ``int`` and ``float`` also read '١٢' or '1_000', and fail on '²'. Anything
    else is an ``OptionError`` naming ``option`` and ``item`` (the value it is part of)."""
    s = text.strip()
    why = (f"{s!r} is not {'an integer' if integer else 'a number'} written in digits 0-9"
           if not (_INTEGER if integer else _REAL).fullmatch(s) else "more than 100 digits" if len(s) > 100 else None)
    if why:
        raise OptionError(option, f"{item if item is not None else text!r}: {why}")
    return int(s) if integer else float(s)


def default_of(options: type, name: str):
    """The default of the field ``name`` of an options dataclass (``CalibrationOptions``...): what a
    front end (a CLI flag, an API keyword) gives when the user names nothing, stated once, here."""
    for f in dataclasses.fields(options):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{options.__name__}.{name} has no default")
            return f.default
    raise AttributeError(f"{options.__name__} has no field {name!r}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise OptionError(name, f"{value}: must be positive" + (" and finite" if value == value and value > 0 else ""))


def _seed(value: int) -> None:
    if not 0 <= value < 2 ** 63:
        raise OptionError("seed", f"{value}: must be in [0, 2^63)")


LAYER_CALIBRATION_SAMPLES = 256  # images a rate code's layer calibration simulates


@dataclass(frozen=True)
class DataSource:
    """Where named data sets live (default: $ANN2SNN_DATA or ~/.cache/ann2snn/data), whether
    torchvision may download a missing one, and whether an image folder's unreadable images are
    skipped (counted) rather than an error."""

    data_dir: str | Path | None = None
    download: bool = False
    skip_bad_images: bool = False


@dataclass(frozen=True)
class CalibrationOptions:
    """``samples`` calibration images drawn with ``seed`` from ``split``; with ``budget`` (spikes
    per sample over ``timesteps`` steps, default the neuron's) the precision knob - or an arousal
    policy's threshold - is searched on ``search_samples`` of them, drawn at random, and so is the
    operating point ``calibrate`` chooses without a budget (defaults: ``pipeline.search_set``, 1,280
    and 2,000 images at ASN's 200 steps). ``layer_calibration``: steps to fit the layer calibration
    (bias correction, ``conversion/layer_calibration.py``) at, 0 for none; default the neuron's
    (``Neuron.layer_calibration``); fitted on the first ``layer_calibration_samples`` images (default
    ``LAYER_CALIBRATION_SAMPLES``; a code whose answer is a forward pass, TTFS, fits it under
    ``budget`` on all the search images, in one batch)."""

    samples: int = 2000
    seed: int = 0
    split: str = "train"
    batch_size: int = 256
    budget: float | None = None
    timesteps: int | None = None
    search_samples: int | None = None
    layer_calibration: int | None = None
    layer_calibration_samples: int | None = None

    def __post_init__(self):
        _positive("batch_size", self.batch_size)
        _positive("samples", self.samples)
        _seed(self.seed)
        if self.budget is not None and not (self.budget > 0 and math.isfinite(self.budget)):
            raise OptionError("budget", f"{self.budget:g}: must be a positive number of spikes per sample")
        _positive("timesteps", self.timesteps)
        _positive("search_samples", self.search_samples)
        _positive("layer_calibration_samples", self.layer_calibration_samples)
        if self.layer_calibration is not None and (not isinstance(self.layer_calibration, int)
                                                   or isinstance(self.layer_calibration, bool)
                                                   or not 0 <= self.layer_calibration <= 100_000):
            raise OptionError("layer_calibration", f"{self.layer_calibration!r}: a number of steps (0: none)")
        if self.search_samples is not None and self.search_samples > self.samples:
            raise OptionError("search_samples", f"{self.search_samples}: more than the {self.samples} calibration "
                                                "images (raise --samples, or the data set has no more)")


@dataclass(frozen=True)
class RunOptions:
    """How ``evaluate`` simulates: ``timesteps`` steps (1 ms each) per sample of ``split`` (the
    first ``limit`` samples), ``batch_size`` at a time; energy with ``preset``; the output read
    from step ``start_ms`` (default: the neuron's)."""

    timesteps: int
    split: str = "test"
    limit: int | None = None
    batch_size: int = 256
    preset: str = DEFAULT_PRESET
    start_ms: int | None = None

    def __post_init__(self):
        _positive("timesteps", self.timesteps)
        _positive("limit", self.limit)
        _positive("batch_size", self.batch_size)
        if self.preset not in PRESETS:
            raise OptionError("preset", f"{self.preset!r}: expected one of {', '.join(PRESETS)}")
        if self.start_ms is not None and not 0 <= self.start_ms < self.timesteps:
            raise OptionError("start_ms", f"{self.start_ms}: must be in [0, timesteps)")


@dataclass(frozen=True)
class FinetuneOptions:
    """Transfer-aware fine-tuning: ``epochs`` of Adam at ``lr`` (thresholds at ``threshold_lr``,
    default ``lr``), cosine schedule, ``spike_penalty`` x spikes per sample / 1000 in the loss,
    on the ``split`` of the training data (``fit`` keeps ``val`` held out: each epoch is then
    scored on val, not on test)."""

    epochs: int = 2
    split: str = "train"
    lr: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    spike_penalty: float = 0.0
    threshold_lr: float | None = None

    def __post_init__(self):
        _positive("epochs", self.epochs)
        _positive("lr", self.lr)
        _positive("threshold_lr", self.threshold_lr)
        _positive("batch_size", self.batch_size)
        _seed(self.seed)
        if self.split not in ("train", "fit"):
            raise OptionError("split", f"{self.split!r}: fine-tuning trains on train or fit")
        if not (self.spike_penalty >= 0 and math.isfinite(self.spike_penalty)):
            raise OptionError("spike_penalty", f"{self.spike_penalty}: must be >= 0 and finite")
