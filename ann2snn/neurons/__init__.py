"""Neuron types. Each module holds the functional core (params, state, ``*_step``, transfer
function), a thin ``nn.Module``, and the two hooks the converter calls:

  ``fit(stats, options) -> params``   per-layer parameters from calibration statistics
  ``build(params) -> nn.Module``      the spiking layer for those parameters
  ``readout(options) -> Readout``     how the output layer is read

``NAME`` is the ``--neuron`` value, ``DEFAULTS`` the network-wide options a calibration
profile may set. Optional: ``PRECISION`` (knob and values that ``--budget`` searches),
``DEFAULT_TIMESTEPS`` (steps a budget search simulates), ``SPIKE_OP`` ("ac" or "mac": the
cost of one synaptic event), ``transfer_module`` (for transfer-aware fine-tuning).
"""

from __future__ import annotations

from types import ModuleType

from ..errors import UserError
from . import asn, if_neuron, vsn

NEURONS: dict[str, ModuleType] = {"if": if_neuron, "asn": asn, "vsn": vsn}


def get(name: str, option: str = "--neuron") -> ModuleType:
    if name not in NEURONS:
        raise UserError(f"{option} {name!r}: expected one of {', '.join(NEURONS)}")
    return NEURONS[name]
