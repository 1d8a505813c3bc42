"""The neuron contract: everything the converter, calibration, simulation, budget search,
arousal, fine-tuning and the report need from a neuron type, in one description object.

A neuron module (``if_neuron.py``, ``asn.py``, ``vsn.py``) keeps its functional core - params
and state ``NamedTuple``s, a pure ``*_step``, its transfer function - and a thin ``nn.Module``,
and ends with one ``NEURON = Neuron(...)``. Adding a neuron type is one new file and one line
in ``neurons/__init__.py``'s registry. The rest of the package receives a ``Neuron`` (resolved
once, at the edge, by ``neurons.get``) and never looks a type up by name again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from ann2snn.errors import OptionError, UserError
from ann2snn.neurons.readout import Readout

if TYPE_CHECKING:
    from ann2snn.neurons.arousal_policy import ArousalPolicy
    from ann2snn.conversion.statistics import LayerStats


FLOAT32_MAX = 3.4e38  # parameters become float32 tensors: larger magnitudes overflow,
FLOAT32_TINY = 1.2e-38  # and smaller non-zero ones flush to zero


@dataclass(frozen=True)
class Bound:
    """The values a neuron option or layer parameter may take: a finite number in [lo, hi] (an
    end excluded when ``*_open``), an integer when ``integer``; or one of ``words``; ``None`` when
    ``none``; a true/false flag when ``flag``. Per-channel parameters may be lists of numbers."""

    lo: float = -FLOAT32_MAX
    hi: float = FLOAT32_MAX
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    none: bool = False
    words: tuple[str, ...] = ()
    flag: bool = False

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is allowed, else what it must be."""
        if value is None and self.none or value in self.words or self.flag and isinstance(value, bool):
            return None
        if isinstance(value, list) and not self.flag and not self.integer and value:
            return next((p for p in map(self.problem, value) if p), None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and self._numeric
        if ok:
            try:
                value = float(value)
            except OverflowError:  # an integer beyond any float
                return f"must be {self.describe()}"
            ok = math.isfinite(value) and (value > self.lo if self.lo_open else value >= self.lo) and \
                (value < self.hi if self.hi_open else value <= self.hi) and \
                (not self.integer or value.is_integer()) and (value == 0 or abs(value) >= FLOAT32_TINY)
        if ok:
            return None
        if isinstance(value, str) and self._numeric:
            return f"must be {self.describe()} (a number, not text)"
        return f"must be {self.describe()}"

    @property
    def _numeric(self) -> bool:
        return not self.flag and not (self.words and self.lo == -FLOAT32_MAX and self.hi == FLOAT32_MAX)

    def describe(self) -> str:
        if self.flag:
            return "true or false"
        alternatives = [repr(w) for w in self.words] + (["null"] if self.none else [])
        if not self._numeric:
            return " or ".join(alternatives)
        lo_set, hi_set = self.lo != -FLOAT32_MAX, self.hi != FLOAT32_MAX
        if lo_set and hi_set:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif lo_set:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = "a finite integer" if self.integer else "a finite number"
        if self.integer and lo_set:
            text = f"an integer {text}"
        return f"{' or '.join(alternatives)} or {text}" if alternatives else text


PERCENTILE = Bound(0, 100, lo_open=True)
POSITIVE = Bound(0, lo_open=True)
NON_NEGATIVE = Bound(0)


@dataclass(frozen=True)
class StepOps:
    """The arithmetic of one neuron's ``*_step``, for the energy count: multiplies (or
    multiply-adds) and adds or compares every step, the adds each spike costs besides, and the
    multiplies of each step of an input ramp, and how many steps a layer's ramp has, from its
    parameters (ASN's ``onset_ms``: the steps whose gain is below 1, ``asn.ramp_steps``);
    ``unused``: the (multiplies, adds) per step that a layer's parameters leave out (ASN without a
    membrane filter, tau_phi 0: S = c; ``asn.unused_ops``). Counted clock-driven, every unit
    updates every step. Event-driven (decays and ramps in closed form between updates), a unit
    updates, ``event_driven="per_input"``, once per spike it emits and in every step an input
    event reaches it (to test its threshold; counted as at most min(events received, units x
    steps), and no more than clock-driven), every step where the analog input feeds it;
    ``"windows"`` (a time code): in every step of its sources' windows (integrating their held
    currents) and of its own (the ramp), and not outside them."""

    mac_per_step: float
    add_per_step: float
    add_per_spike: float = 0.0
    mac_per_onset_step: float = 0.0
    onset_steps: Callable[[dict], int] | None = None
    unused: Callable[[dict], tuple[float, float]] | None = None
    event_driven: str = "per_input"  # how a unit updates event-driven: "per_input" or "windows" (see above)

    def per_step(self, params: dict) -> tuple[float, float]:
        """(multiplies, adds) one unit of a layer with these parameters does every step."""
        mac, add = self.unused(params) if self.unused else (0.0, 0.0)
        return self.mac_per_step - mac, self.add_per_step - add


@dataclass(frozen=True)
class Precision:
    """The knob that trades accuracy for spikes, and the values ``calibrate --budget`` tries;
    ``budget_grid``: other options a budget search tries in every combination with them (TTFS:
    its dead zone, ``floor``), where the search is by forward passes (``search/exact.py``)."""

    knob: str
    values: tuple[float, ...]
    budget_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    code: Callable[[dict], tuple] | None = None  # what tells two such option sets' codes apart


@dataclass(frozen=True)
class PrecisionControl:
    """How arousal (``arousal.py``) raises an input's precision in this neuron type.

    The network starts at ``start(policy)`` (option overrides, e.g. ASN m_f = low); an aroused
    input's layers switch to the precision ``raised(params, policy)`` describes (per-layer
    parameters, e.g. ASN m_f = high), through the module's ``set_precision(mask, value(policy))``.
    ``raised_options`` is the option set a network wholly at high precision reports."""

    value: Callable[["ArousalPolicy"], float]  # what set_precision(mask, value) takes
    mechanism: str  # one line for the report
    start: Callable[["ArousalPolicy"], dict]
    raised: Callable[[dict, "ArousalPolicy"], dict]
    raised_options: Callable[[dict, "ArousalPolicy"], dict]
    start_label: Callable[["ArousalPolicy"], str]
    raised_label: Callable[["ArousalPolicy"], str]
    start_text: Callable[["ArousalPolicy"], str]  # "run at m_f 0.3"
    switch_text: Callable[["ArousalPolicy", str], str]  # given "every ASN layer": "switch ... to m_f 0.1"
    # layer parameters a fraction f in [0, 1] of the way from the start precision to the raised
    # one, and their label: the fixed precision that spends as many spikes as arousal is searched on f
    between: Callable[[dict, "ArousalPolicy", float], dict] | None = None
    between_label: Callable[[dict, "ArousalPolicy", float], str] | None = None


@dataclass(frozen=True)
class NIRExport:
    """How a layer of this neuron type maps onto a NIR node (``store/nir_export.py``):
    ``problems(params)`` lists what keeps a layer's parameters from mapping exactly (each naming
    its fix), ``fix`` says how to calibrate a network that maps, ``node(nir, shape, params)`` is
    the node for units shaped ``shape``, and ``height(params)`` the height its spikes carry (folded
    into the next weighted layer's weights)."""

    problems: Callable[[dict], list[str]]
    fix: str
    node: Callable[[Any, tuple, dict], Any]
    height: Callable[[dict], float]


@dataclass(frozen=True)
class Neuron:
    """A neuron type as the rest of ann2snn sees it.

    ``defaults``: the network-wide options a profile may set (``--param``), with their defaults.
    ``fit(stats, options) -> params``: per-layer parameters from calibration statistics.
    ``build(params) -> nn.Module``: the stateful spiking layer (``reset()``, ``spikes`` after each
    step; optionally ``scan`` for a fused chunk and ``set_precision`` for arousal).
    ``readout(options) -> Readout``: how the output layer is read.
    ``activations``: the ANN activations a layer of this type stands in for.
    ``precision``: the knob a spike budget searches (None: no budget search).
    ``default_timesteps``: the steps a budget search simulates by default.
    ``spike_op``: what one synaptic event costs: "ac" (binary spike) or "mac" (graded spike).
    ``readout_options``: options that change only the readout (a sweep does not refit them).
    ``transfer_module(params) -> nn.Module``: the differentiable stand-in fine-tuning trains
    (None: not trainable). ``precision_control``: how arousal acts (None: no arousal).
    ``bounds``: the values each option and layer parameter may take (checked wherever they come
    from: ``--param``, ``--sweep``, a profile, an artifact). ``calibration_only``: options that
    take effect only when calibrating (on the statistics, or ASN's fitted bias ramps), so a
    sweep cannot change them. ``param_options``: options that are also layer
    parameters with the same meaning (ASN ``m_f``), which a sweep sets without re-fitting;
    ``retuned`` of them are turned into layer parameters by ``retune(params, options,
    analog_input)`` (ASN: each layer's ``onset_ms`` from ``onset_ms`` and ``onset_layers``).
    ``step_ops``: what one update of one neuron costs (``StepOps``; counted in the energy).
    ``operating_points``: option sets (all with the same keys) ``calibrate`` tries when the user
    names none of those keys and no budget (``operating_point.py``); empty: the defaults stand.
    ``conflict(options, named) -> str | None``: a problem of options together (each within its
    bounds), e.g. a ``named`` one that would silently do nothing without another; checked where a
    user sets options (``--param``, ``--sweep``), not on files, whose networks are well defined.
    ``nir``: how its layers export to NIR (``NIRExport``; None: refused by name).
    ``layer_calibration``: the steps ``calibrate`` fits the layer calibration at by default
    (``conversion/layer_calibration.py``; 0: off unless asked for).
    ``exact_transfer``: a time code whose answer equals the ANN with every slot replaced by
    ``transfer_module`` (TTFS): its precision is chosen by forward passes of that network, not by
    simulation (``search/exact.py``), and its layer calibration, under a budget only, is fitted by
    a forward pass of that network (``layer_calibration.fit_transfer``). ``window(params)``: the steps of a layer's window in a time code (its module's
    ``window``; None: a rate code, active from the first step).
    """

    name: str
    defaults: dict[str, Any]
    fit: Callable[["LayerStats", dict], dict]
    build: Callable[[dict], nn.Module]
    readout: Callable[[dict], Readout]
    activations: tuple[str, ...] = ("relu",)
    precision: Precision | None = None
    default_timesteps: int = 200
    spike_op: str = "ac"
    readout_options: tuple[str, ...] = ()
    transfer_module: Callable[[dict], nn.Module] | None = None
    precision_control: PrecisionControl | None = None
    bounds: dict[str, Bound] = field(default_factory=dict)
    calibration_only: tuple[str, ...] = ("percentile",)
    param_options: tuple[str, ...] = ()
    retune: Callable[[dict, dict, bool | None], dict] | None = None
    retuned: tuple[str, ...] = ()
    step_ops: StepOps | None = None
    operating_points: tuple[dict, ...] = ()
    conflict: Callable[[dict, set], str | None] | None = None
    nir: NIRExport | None = None
    layer_calibration: int = 0
    exact_transfer: bool = False
    window: Callable[[dict], int] | None = None

    @property
    def label(self) -> str:
        return self.name.upper()

    def options(self, overrides: dict, option: str = "neuron_options", over: dict | None = None) -> dict:
        """The defaults (with the options ``over``, e.g. an artifact's, on them) with ``overrides``
        over them, refusing a key that is not an option, a value out of bounds and a ``conflict``."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise OptionError(option, f"{sorted(unknown)[0]}: not an option of neuron {self.name!r} "
                                      f"(options: {', '.join(self.defaults)})")
        options = {**self.defaults, **(over or {}), **overrides}
        for key, value in options.items():
            problem = self.bounds[key].problem(value) if key in self.bounds else None
            if problem:
                raise OptionError(option, f"{key}={value}: {problem}")
        problem = self.conflict(options, set(overrides)) if self.conflict else None
        if problem:
            raise OptionError(option, problem)
        return options

    def check_options(self, options: dict, source: str) -> None:
        """Refuse options read from a file (``source``) that are unknown or out of bounds."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise UserError(f"{source}: {sorted(unknown)[0]} is not an option of neuron {self.name!r}")
        for key, value in options.items():
            problem = self.bounds[key].problem(value) if key in self.bounds else None
            if problem:
                raise UserError(f"{source}: {self.name.upper()} option {key}={value}: {problem}")

    def check_params(self, layer: str, params: dict) -> None:
        """Refuse a layer parameter out of its bounds or unknown (e.g. from a hand-edited profile)."""
        for key, value in params.items():
            if self.bounds and key not in self.bounds:
                raise UserError(f"layer {layer}: {key} is not a parameter of {self.name.upper()} layers "
                                f"(parameters: {', '.join(self.bounds)})")
            problem = self.bounds[key].problem(value) if key in self.bounds else None
            if problem:
                raise UserError(f"layer {layer}: {self.name.upper()} parameter {key}={value}: {problem}")

    def readout_for(self, options: dict, timesteps: int, start_ms: int | None = None) -> Readout:
        """The readout for ``options`` (``start_ms`` over them when given), within ``timesteps``."""
        extra = {"start_ms": start_ms} if start_ms is not None else {}
        return self.readout({**self.defaults, **options, **extra}).within(timesteps)
