"""One spiking network, built the one way every caller needs it: evaluation, the spike-budget
search, the operating-point choice and the arousal threshold search.

``build_network`` fills a normalised ANN's slots with a neuron type's layers (``to_snn``, with
max pooling and bias ramps as asked), takes the fan-out maps for that type's events (binary
spikes, or graded events counted after an average pool: ``energy.fanout_maps``) and the neuron's
readout. ``Network.simulate`` runs it (``simulate.simulate``) with an arousal controller and
observers (``simulate.Observer``: agreement with the ANN, output error) attached as hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx

from ann2snn.conversion.bias_ramp import BiasRampRecord
from ann2snn.conversion.graph import slot_schedule, to_snn
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.io.data import TensorData
from ann2snn.neurons import Neuron
from ann2snn.neurons.readout import Readout
from ann2snn.sim.arousal import ArousalController
from ann2snn.sim.energy import fanout_maps
from ann2snn.sim.simulate import Observer, SimulationResult, simulate
from ann2snn.store.artifact import build_neurons
from ann2snn.store.profile import ProfileLayer


class Fanouts:
    """The fan-out maps of one ANN for one sample shape, by kind of event, each computed once."""

    def __init__(self, ann: fx.GraphModule, sample_shape: tuple[int, ...]):
        self.ann, self.sample_shape = ann, tuple(sample_shape)
        self._maps: dict[bool, dict[str, torch.Tensor]] = {}

    def __call__(self, graded: bool = False) -> dict[str, torch.Tensor]:
        if graded not in self._maps:
            self._maps[graded] = fanout_maps(self.ann, self.sample_shape, graded=graded)
        return self._maps[graded]


@dataclass
class Network:
    """A spiking network ready to simulate: its graph, neuron type, spiking layers (in order),
    the fan-out maps its events are counted with, its readout, and the bias ramps it runs with."""

    snn: fx.GraphModule
    neuron: Neuron
    layers: list[str]
    fanout: dict[str, torch.Tensor]
    readout: Readout
    ramps: list[BiasRampRecord] | None = None

    @property
    def graded(self) -> bool:
        return self.neuron.spike_op == "mac"

    @property
    def answer_step(self) -> int:
        """The step by which a time code's answer is complete (``graph.slot_schedule``); 0 for a
        rate code, which answers from the first step and refines."""
        windows = {name: self.snn.get_submodule(name).window for name in self.layers}
        return slot_schedule(self.snn, windows)["output"] if any(windows.values()) else 0

    @property
    def backends(self) -> dict[str, str]:
        """Each spiking layer's backend ("fused" or "reference"), as it was built."""
        return {name: self.snn.get_submodule(name).backend for name in self.layers}

    def simulate(self, data: TensorData, timesteps: int, batch_size: int, device: torch.device, *,
                 controller: ArousalController | None = None, observers: Sequence[Observer] = (),
                 on_batch: Callable[[int], None] | None = None, label: str = "simulating",
                 **engine) -> SimulationResult:
        """Every sample of ``data`` for ``timesteps`` steps; ``engine``: ``simulate``'s engine options."""
        return simulate(self.snn, self.layers, self.fanout, data, timesteps, batch_size, device, self.readout,
                        on_batch, controller, label=label, observers=observers, graded=self.graded, **engine)


def answer_step(ann: fx.GraphModule, neuron: Neuron, params: dict[str, dict]) -> int | None:
    """The step by which the answer of ``neuron``'s network with these layer parameters (by
    layer name) is complete, for a time code (``Neuron.window``; ``graph.slot_schedule``); None
    for a rate code."""
    if neuron.window is None:
        return None
    return slot_schedule(ann, {name: neuron.window(p) for name, p in params.items()})["output"]


def build_network(ann: fx.GraphModule, neuron: Neuron, layers: list[ProfileLayer], options: dict, timesteps: int,
                  fanouts: Fanouts, *, maxpool: str = "gated", ramps: list[BiasRampRecord] | None = None,
                  calibration: LayerCalibrationRecord | None = None, start_ms: int | None = None) -> Network:
    """The network of ``neuron`` with the per-layer parameters of ``layers`` in ``ann``'s slots
    (with bias ramps and layer calibration when given), read out as ``options`` say within
    ``timesteps`` (from ``start_ms`` when given)."""
    snn = to_snn(ann, build_neurons(neuron, layers), maxpool, ramps, calibration)
    return Network(snn, neuron, [layer.name for layer in layers], fanouts(neuron.spike_op == "mac"),
                   neuron.readout_for(options, timesteps, start_ms), ramps)
