"""Neuron types: one module each (functional core, thin ``nn.Module``, and a ``NEURON``
description - the contract in ``neuron.py``), registered here by name (the ``--neuron`` value).
``get`` resolves a name once, at the edge; everything downstream takes the ``Neuron``."""

from __future__ import annotations

from ann2snn.errors import OptionError, UserError
from ann2snn.neurons import asn
from ann2snn.neurons import if_neuron
from ann2snn.neurons import ttfs
from ann2snn.neurons import vsn
from ann2snn.neurons.neuron import NIRExport, Neuron, Precision, PrecisionControl, StepOps

NEURONS: dict[str, Neuron] = {n.name: n for n in (if_neuron.NEURON, asn.NEURON, vsn.NEURON, ttfs.NEURON)}
BASELINE = if_neuron.NEURON  # the rate-coded reference every report and default operating point compares with

__all__ = ["BASELINE", "NEURONS", "NIRExport", "Neuron", "Precision", "PrecisionControl", "StepOps", "get", "names", "stored"]


def get(name: str, option: str = "neuron") -> Neuron:
    """The neuron type called ``name``; ``option`` names the parameter that gave it, for errors."""
    if name not in NEURONS:
        raise OptionError(option, f"{name!r}: expected one of {', '.join(NEURONS)}")
    return NEURONS[name]


def stored(name: str, options: dict, source: str) -> Neuron:
    """The neuron type a file (``source``) names, its stored options checked against its bounds."""
    if name not in NEURONS:
        raise UserError(f"{source}: unknown neuron type {name!r} (known: {', '.join(NEURONS)})")
    neuron = NEURONS[name]
    neuron.check_options(options, source)
    return neuron


def names(which) -> str:
    """The registered neuron types with a capability (``which(neuron)``), e.g. 'asn, vsn'."""
    return ", ".join(name for name, n in NEURONS.items() if which(n))
