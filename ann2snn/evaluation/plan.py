"""The runs ``evaluate`` makes of an artifact's network: one ``Run`` each (label, neuron type,
options, per-layer parameters, optional controller), and the three runs of an arousal evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ann2snn.neurons import Neuron
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.sim.arousal import ArousalController
from ann2snn.store.profile import NeuronSpec, ProfileLayer


@dataclass
class Run:
    """One simulation ``evaluate`` makes of an artifact's network: its label in the report, the
    neuron type, options and per-layer parameters to build it with, and an optional controller
    called after every step (arousal); ``spike_matched``: the fixed-precision run that spends the
    arousal run's spikes (``evaluation.with_spike_matched_run``)."""

    label: str
    neuron: Neuron
    spec: NeuronSpec
    layers: list[ProfileLayer]
    controller: Any = None
    spike_matched: bool = False


def matched_run(neuron: Neuron, policy: ArousalPolicy, spec: NeuronSpec, layers: list[ProfileLayer],
                fraction: float) -> Run:
    """A fixed-precision run ``fraction`` of the way from the start precision to the raised one
    in the layers arousal raises (``PrecisionControl.between``)."""
    control = neuron.precision_control
    moved = [replace(layer, params=control.between(layer.params, policy, fraction)) if policy.raises(layer.name)
             else layer for layer in layers]
    label = control.between_label(layers[0].params, policy, fraction) + " (spikes as arousal)"
    return Run(label, neuron, spec, moved, spike_matched=True)


def arousal_runs(neuron: Neuron, policy: ArousalPolicy, spec: NeuronSpec, layers: list[ProfileLayer]
                 ) -> list[Run]:
    """The three runs of ``evaluate --arousal``, from the network at its start precision (``spec``,
    ``layers``; ``artifact.variant`` with ``control.start(policy)``; the neuron must have
    ``precision_control``): under arousal control, fixed
    at the start precision, and fixed at the raised precision in the layers arousal raises."""
    control = neuron.precision_control
    raised = [replace(layer, params=control.raised(layer.params, policy)) if policy.raises(layer.name) else layer
              for layer in layers]
    raised_spec = spec if policy.layers else replace(spec, options=control.raised_options(spec.options, policy))
    return [Run(f"{neuron.label} arousal", neuron, spec, layers, ArousalController(policy, control)),
            Run(control.start_label(policy), neuron, spec, layers),
            Run(control.raised_label(policy), neuron, raised_spec, raised)]
