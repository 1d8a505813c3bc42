"""The neuron contract: everything the converter, calibration, simulation, budget search,
arousal, fine-tuning and the report need from a neuron type, in one description object.

A neuron module (``if_neuron.py``, ``asn.py``, ``vsn.py``) keeps its functional core - params
and state ``NamedTuple``s, a pure ``*_step``, its transfer function - and a thin ``nn.Module``,
and ends with one ``NEURON = Neuron(...)``. Adding a neuron type is one new file and one line
in ``neurons/__init__.py``'s registry. The rest of the package receives a ``Neuron`` (resolved
once, at the edge, by ``neurons.get``) and never looks a type up by name again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from ..errors import OptionError
from ..readout import Readout

if TYPE_CHECKING:
    from ..arousal import ArousalPolicy
    from ..calibrate import LayerStats


@dataclass(frozen=True)
class Precision:
    """The knob that trades accuracy for spikes, and the values ``calibrate --budget`` tries."""

    knob: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class PrecisionControl:
    """How arousal (``arousal.py``) raises an input's precision in this neuron type.

    The network starts at ``start(policy)`` (option overrides, e.g. ASN m_f = low); an aroused
    input's layers switch to the precision ``raised(params, policy)`` describes (per-layer
    parameters, e.g. ASN m_f = high), through the module's ``set_precision(mask, value)``, where
    value is the policy field ``policy_field``. ``raised_options`` is the option set a network
    wholly at high precision reports."""

    policy_field: str
    mechanism: str  # one line for the report
    start: Callable[["ArousalPolicy"], dict]
    raised: Callable[[dict, "ArousalPolicy"], dict]
    raised_options: Callable[[dict, "ArousalPolicy"], dict]
    start_label: Callable[["ArousalPolicy"], str]
    raised_label: Callable[["ArousalPolicy"], str]
    start_text: Callable[["ArousalPolicy"], str]  # "run at m_f 0.3"
    switch_text: Callable[["ArousalPolicy", str], str]  # given "every ASN layer": "switch ... to m_f 0.1"


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

    @property
    def label(self) -> str:
        return self.name.upper()

    def options(self, overrides: dict, option: str = "neuron_options") -> dict:
        """The defaults with ``overrides`` over them, refusing a key that is not an option."""
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise OptionError(option, f"{sorted(unknown)[0]}: not an option of neuron {self.name!r} "
                                      f"(options: {', '.join(self.defaults)})")
        return {**self.defaults, **overrides}

    def readout_for(self, options: dict, timesteps: int, start_ms: int | None = None) -> Readout:
        """The readout for ``options`` (``start_ms`` over them when given), within ``timesteps``."""
        extra = {"start_ms": start_ms} if start_ms is not None else {}
        return self.readout({**self.defaults, **options, **extra}).within(timesteps)
