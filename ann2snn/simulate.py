"""Time-stepped simulation of a converted network, with exact spike accounting.

The input is constant, so everything that depends on it alone (the first layer's current
W x + b) is computed once per batch (``split_static``); each step runs the rest of the graph,
in which every spiking layer advances its state once and keeps that step's spikes. They are
counted here: per layer and step, the spikes and the synaptic operations they cause (spikes x
fan-out). The readout (``Readout``) turns the output layer into a prediction at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

from .data import TensorData
from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def stateful_modules(snn: nn.Module) -> list[nn.Module]:
    return [m for m in snn.modules() if hasattr(m, "reset")]


def spiking_modules(snn: fx.GraphModule, names: list[str]) -> dict[str, nn.Module]:
    return {name: snn.get_submodule(name) for name in names}


@dataclass(frozen=True)
class Readout:
    """How class scores are read from the output layer, which never spikes: r(t) is the output,
    or its exponential filter r(t) = d r(t-1) + (1 - d) out(t) when ``tau`` is set; the
    prediction at step t >= ``start`` is argmax of sum_{k=start..t} r(k), before it argmax r(t)."""

    tau: float | None = None
    start: int = 0

    def within(self, timesteps: int) -> "Readout":
        """This readout, reading from step 0 when ``start`` lies beyond the simulation."""
        return self if self.start < timesteps else Readout(self.tau, 0)

    def describe(self) -> str:
        r = "output" if self.tau is None else f"output filtered with tau {self.tau:g} ms"
        return (f"argmax of the {r} summed over steps {self.start + 1}..t" if self.start
                else f"argmax of the {r} summed over all steps so far") + \
            (f"; before step {self.start + 1}, of the {r} at t" if self.start else "")


@dataclass
class SimulationResult:
    timesteps: int
    samples: int
    metric: torch.Tensor  # [T] after t+1 steps: samples classified right, or (regression) summed squared error
    spikes: torch.Tensor  # [L, T] spikes emitted by layer l at step t, summed over samples
    synops: torch.Tensor  # [L, T] synaptic operations those spikes caused
    layers: list[str]


@torch.inference_mode()
def simulate(snn: fx.GraphModule, layers: list[str], fanout: dict[str, torch.Tensor], data: TensorData,
             timesteps: int, batch_size: int, device: torch.device, readout: Readout = Readout(),
             on_batch: Callable[[int], None] | None = None, controller=None) -> SimulationResult:
    """Run every sample of ``data`` through ``snn`` for ``timesteps`` steps. A ``controller``
    (e.g. arousal) is reset per batch and called after each step with the readout score."""
    decay = math.exp(-1.0 / readout.tau) if readout.tau else None
    snn = snn.to(device).eval()
    neurons = spiking_modules(snn, layers)
    resettable = stateful_modules(snn)
    fan = [fanout[name].to(device).flatten() for name in layers]
    metric = torch.zeros(timesteps, dtype=torch.float64, device=device)
    regression = data.task == "regression"
    spikes = torch.zeros(len(layers), timesteps, dtype=torch.float64, device=device)
    synops = torch.zeros_like(spikes)
    static, step = split_static(snn)
    for x, y in data.batches(batch_size):
        x, y = x.to(device), y.to(device)
        constant = static(x)  # the input is constant: its currents are computed once per batch
        for m in resettable:
            m.reset()
        if controller is not None:
            controller.reset(len(y), device)
        r = total = None
        for t in range(timesteps):
            out = step(*constant)
            if decay is None:
                r = out
            else:
                r = (1 - decay) * out if r is None else decay * r + (1 - decay) * out
            if t >= readout.start:
                total = r if total is None else total + r
            score = total / (t - readout.start + 1) if t >= readout.start else r
            if regression:
                metric[t] += ((score.reshape(len(y), -1)[:, 0].double() - y.double()) ** 2).sum()
            else:
                metric[t] += (score.argmax(1) == y).sum()
            if controller is not None:
                controller(t, score, neurons.values())
            for i, m in enumerate(neurons.values()):
                per_unit = m.spikes.flatten(1).sum(0)
                spikes[i, t] += per_unit.sum()
                synops[i, t] += (per_unit * fan[i]).sum()
        if on_batch:
            on_batch(len(y))
    return SimulationResult(timesteps, len(data), metric.cpu(), spikes.cpu(), synops.cpu(), list(layers))


@torch.inference_mode()
def ann_accuracy(ann: nn.Module, data: TensorData, batch_size: int, device: torch.device) -> float:
    """Accuracy of the ANN, or for a regression task its NMSE (see ``nmse``)."""
    ann = ann.to(device).eval()
    total = 0.0
    for x, y in data.batches(batch_size):
        out, y = ann(x.to(device)), y.to(device)
        if data.task == "regression":
            total += float(((out.reshape(len(y), -1)[:, 0].double() - y.double()) ** 2).sum())
        else:
            total += int((out.argmax(1) == y).sum())
    return nmse(total, data) if data.task == "regression" else total / max(len(data), 1)


def nmse(squared_error: float, data: TensorData) -> float:
    """Normalised mean squared error: sum (y_hat - y)^2 / sum (y - mean y)^2."""
    y = data.targets.double()
    return squared_error / max(float(((y - y.mean()) ** 2).sum()), 1e-30)


def split_static(snn: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split ``snn`` into (static, dynamic): ``static(x)`` computes once, per sample, every node
    that depends only on the input (e.g. the first layer's constant current ``W x + b``) and
    returns those the time-stepped part needs; ``dynamic(*static(x))`` is one time step and
    equals ``snn(x)``."""
    stateful = {name for name, m in snn.named_modules() if hasattr(m, "reset")}
    static: set[fx.Node] = set()
    for n in snn.graph.nodes:
        if n.op == "output":
            continue
        inputs = n.all_input_nodes
        if n.op == "placeholder" or (not (n.op == "call_module" and n.target in stateful)
                                     and all(i in static for i in inputs)):
            static.add(n)
    boundary = [n for n in snn.graph.nodes if n in static and any(u not in static for u in n.users)]
    head, tail = fx.Graph(), fx.Graph()
    env_head: dict[fx.Node, fx.Node] = {}
    for n in snn.graph.nodes:
        if n in static:
            env_head[n] = head.node_copy(n, lambda a: env_head[a])
    head.output(tuple(env_head[n] for n in boundary))
    env_tail = {n: tail.placeholder(f"static_{i}") for i, n in enumerate(boundary)}
    for n in snn.graph.nodes:
        if n not in static:
            env_tail[n] = tail.node_copy(n, lambda a: env_tail[a])
    return fx.GraphModule(snn, head), fx.GraphModule(snn, tail)
