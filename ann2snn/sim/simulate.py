"""Time-stepped simulation of a converted network, with exact spike accounting.

The input is constant, so everything that depends on it alone (the first layer's current
W x + b) is computed once per batch (``split_static``); each step runs the rest of the graph,
in which every spiking layer advances its state once and keeps that step's spikes. They are
counted here: per layer and step, the spikes and the synaptic operations they cause (spikes x
fan-out). The readout (``Readout``) turns the output layer into a prediction at every step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch
from torch import fx, nn

from ann2snn import progress
from ann2snn.io.data import TensorData
from ann2snn.sim.energy import pooled_sources
from ann2snn.sim.engine import chunk_steps, layered, step_counts, time_rows
from ann2snn.errors import OptionError
from ann2snn.neurons.layer import SpikingLayer, StatefulLayer
from ann2snn.neurons.readout import Readout

if TYPE_CHECKING:
    from ann2snn.sim.arousal import ArousalController


class Observer(Protocol):
    """Sees the readout score after every step of a simulation (batches arrive in order; a batch
    retried after running out of memory starts again with ``reset``)."""

    def reset(self, batch: int, device: torch.device) -> None: ...

    def __call__(self, t: int, score: torch.Tensor) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError("device", f"{name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise OptionError("device", f"{name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{name}: CUDA is not available on this machine")
    return device


def stateful_modules(snn: nn.Module) -> list[StatefulLayer]:
    return [m for m in snn.modules() if isinstance(m, StatefulLayer)]


def spiking_modules(snn: fx.GraphModule, names: list[str]) -> dict[str, SpikingLayer]:
    return {name: snn.get_submodule(name) for name in names}


@dataclass
class SimulationResult:
    timesteps: int
    samples: int
    metric: torch.Tensor  # [T] after t+1 steps: samples classified right, or (regression) summed squared error
    spikes: torch.Tensor  # [L, T] spikes emitted by layer l at step t, summed over samples
    synops: torch.Tensor  # [L, T] synaptic operations those spikes caused
    layers: list[str]
    final: torch.Tensor | None = None  # [N] per sample after the last step: 1 if right (or squared error)


def ieee_float32(fn):
    """Run ``fn`` with TF32 off: cuDNN convolutions default to TF32 (10-bit mantissa) on recent
    GPUs, and a threshold test on such currents flips spikes (measured on an H100: LeNet-5 IF,
    2,000 MNIST images, 98.60% with TF32 vs 98.65% on the CPU; 98.65% with it off)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        flags = torch.backends.cudnn, torch.backends.cuda.matmul
        saved = [f.allow_tf32 for f in flags]
        with contextlib.ExitStack() as undo:
            undo.callback(lambda: [setattr(f, "allow_tf32", v) for f, v in zip(flags, saved)])
            for f in flags:
                f.allow_tf32 = False
            return fn(*args, **kwargs)
    return wrapper


@ieee_float32
@torch.inference_mode()
def simulate(snn: fx.GraphModule, layers: list[str], fanout: dict[str, torch.Tensor], data: TensorData,
             timesteps: int, batch_size: int, device: torch.device, readout: Readout = Readout(),
             on_batch: Callable[[int], None] | None = None, controller: ArousalController | None = None,
             engine: str = "layers", memory_budget: int | None = None, fused: bool = True, label: str = "simulating",
             observers: Sequence[Observer] = (), graded: bool = False,
             channels_last: bool | None = None) -> SimulationResult:
    """Run every sample of ``data`` through ``snn`` for ``timesteps`` steps. ``engine`` 'layers'
    runs chunks of steps one layer at a time (``engine.py``; chunks sized to ``memory_budget``
    bytes, by default 64 MB on CPU and 1 GB on CUDA; ``fused``: the neurons' fused scans where
    they have one), 'steps' the whole network one step at a time (the reference). A
    ``controller`` (arousal) is reset per batch and called after each step with the readout
    score and the spiking layers; the layered engine ends a chunk at each of its
    ``decision_steps``. ``observers`` (``Observer``: agreement with the ANN, output error) are
    reset per batch and see each step's readout score. ``graded``: the layers' events carry a
    value (``Neuron.spike_op`` "mac"), counted after an average pool that follows them. A batch
    that runs out of device memory is retried in halves. Images go ``channels_last`` (default: on
    the CPU), and with them every convolution's output. Progress is reported
    (``progress.task``) as ``label``."""
    if engine not in ("layers", "steps"):
        raise OptionError("engine", f"{engine!r}: expected layers or steps")
    net = _OnDevice(snn, layers, fanout, device, engine, fused, graded, memory_budget,
                    device.type == "cpu" if channels_last is None else channels_last)
    acc = _Accumulator(timesteps, len(layers), data.task == "regression", readout, device)
    hooks = [h for h in (controller, *observers) if h is not None]
    batches, retry = data.batches(batch_size), []  # retry: halves of a batch that ran out of memory
    with progress.task(f"{label}: {timesteps} steps (samples)", len(data)) as shown:
        while (item := retry.pop(0) if retry else next(batches, None)) is not None:
            x, y = item
            try:
                x, y = x.to(device), y.to(device)
                for h in hooks:
                    h.reset(len(y), device)
                reader = acc.batch(y)
                net.run(x, reader, acc, timesteps, controller, observers)
                acc.commit(reader)
            except torch.OutOfMemoryError:
                if len(y) == 1:
                    raise OptionError("batch_size", f": one sample does not fit in {device} memory") from None
                torch.cuda.empty_cache()
                half = len(y) // 2
                retry[:0] = [(x[:half].cpu(), y[:half].cpu()), (x[half:].cpu(), y[half:].cpu())]  # free the device
                continue
            if on_batch:
                on_batch(len(y))
            shown.advance(len(y))
    return SimulationResult(timesteps, len(data), acc.metric.cpu(), acc.spikes.cpu(), acc.synops.cpu(), list(layers),
                            torch.cat(acc.final) if acc.final else torch.zeros(0, dtype=torch.float64))


class _OnDevice:
    """A network moved to its device and split for simulation: the constant part computed once
    per batch (``split_static``), the time-stepped part run step by step (engine 'steps') or in
    chunks of steps layer by layer (engine 'layers', ``engine.layered``)."""

    def __init__(self, snn: fx.GraphModule, layers: list[str], fanout: dict[str, torch.Tensor], device: torch.device,
                 engine: str, fused: bool, graded: bool, memory_budget: int | None, channels_last: bool):
        if memory_budget is None:  # measured: 64 MB chunks run fastest on a 2-core CPU (cache); GPUs like them large
            memory_budget = 1 << 30 if device.type == "cuda" else 1 << 26
        self.engine, self.memory_budget = engine, memory_budget
        # channels last: oneDNN's fast layout for few channels (measured: a 16-channel 3x3 convolution of 256
        # 28x28 images, 9.4 ms -> 5.0 ms on 2 CPU cores); the convolutions' outputs keep it
        self.channels_last = channels_last
        snn = snn.to(device).eval()
        self.neurons = spiking_modules(snn, layers)
        self.resettable = stateful_modules(snn)
        self.fan = [fanout[name].to(device).flatten() for name in layers]
        self.static, self.step = split_static(snn)
        self.pools = counting_pools(snn, self.neurons) if graded else {}
        if engine == "layers":
            self.chunked_step, self.chunked, self.scans = layered(self.step, layers, self.fan, fused, self.pools)
            # a layer counted after its pool has a pooled fan-out map: its own width is the window's area times that
            area = {n: math.prod(p.kernel_size) if isinstance(p.kernel_size, tuple) else
                    p.kernel_size ** (2 if isinstance(p, nn.AvgPool2d) else 1) for n, p in self.pools.items()}
            self.width = {name: f.numel() * area.get(name, 1) for name, f in zip(layers, self.fan)}

    def run(self, x: torch.Tensor, reader: "_Reader", acc: "_Accumulator", timesteps: int, controller,
            observers) -> None:
        """One batch from a fresh state, counted into ``acc`` and read out by ``reader``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        constant = self.static(x)  # the input is constant: its currents are computed once per batch
        for m in self.resettable:
            m.reset()
        if self.engine == "steps":
            for t in range(timesteps):
                score = reader.update(t, self.step(*constant))
                _after_step(t, score, controller, observers, self.neurons)
                for i, (name, m) in enumerate(self.neurons.items()):
                    acc.count(i, t, step_counts(m.spikes, self.fan[i], self.pools.get(name)))
            return
        edges = [e for m in self.neurons.values() if m.window for e in (m.start, m.start + m.window)]
        size = lambda a, b: chunk_steps(len(x), self.widest(a, b), timesteps, self.memory_budget)  # noqa: E731
        for t0, k in _chunks(timesteps, size, [*(controller.decision_steps if controller else ()), *edges]):
            for m in self.chunked:
                m.steps, m.batch = k, len(x)
            out = time_rows(self.chunked_step(*constant), k, len(x)).view(k, len(x), -1)
            for i, scan in enumerate(self.scans):
                acc.count_chunk(i, t0, scan.counts)
            for j in range(k):
                score = reader.update(t0 + j, out[j])
                _after_step(t0 + j, score, controller, observers, self.neurons)

    def widest(self, a: int, b: int) -> int:
        """The widest layer that runs on K*B rows in steps [a, b): every rate code; a time code from
        its sources' window (at most the longest window before its own) to the end of its own."""
        longest = max((m.window for m in self.neurons.values()), default=0)
        return max((self.width[n] for n, m in self.neurons.items()
                    if not m.window or (a < m.start + m.window and b > m.start - longest)), default=1)


def _after_step(t: int, score: torch.Tensor, controller, observers, neurons) -> None:
    for observer in observers:
        observer(t, score)
    if controller is not None:
        controller(t, score, neurons)


def counting_pools(snn: fx.GraphModule, neurons: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The average pool after each layer of graded events in ``energy.pooled_sources``, whose
    events are counted after it; the fan-out maps must then be the pooled ones
    (``energy.fanout_maps(graded=True)``)."""
    return {name: snn.get_submodule(pool) for name, pool in pooled_sources(snn, list(neurons)).items()}


def _chunks(timesteps: int, size: Callable[[int, int], int], decisions) -> list[tuple[int, int]]:
    """(first step, length) of each chunk; a chunk ends after every step d of ``decisions``
    (1-based): arousal's decision steps, and the steps before a time code's window opens or
    after it closes, so that a chunk is wholly inside or outside each window (``engine.py``).
    Between two such ends, chunks are ``size(start, end)`` steps long (the last one shorter)."""
    ends = sorted({min(d, timesteps) for d in decisions if d >= 1} | {timesteps})
    out, t0 = [], 0
    for end in ends:
        if end <= t0:
            continue
        k = max(1, size(t0, end))
        while t0 < end:
            out.append((t0, min(k, end - t0)))
            t0 += out[-1][1]
    return out


class _Accumulator:
    """Per-step totals over the data set: metric (correct count or squared error), spikes and
    synaptic operations per layer. A batch's counts are kept apart until it completes, so a
    batch retried after running out of memory is not counted twice."""

    def __init__(self, timesteps: int, n_layers: int, regression: bool, readout: Readout, device):
        self.regression, self.readout = regression, readout
        self.metric = torch.zeros(timesteps, dtype=torch.float64, device=device)
        self.spikes = torch.zeros(n_layers, timesteps, dtype=torch.float64, device=device)
        self.synops = torch.zeros_like(self.spikes)
        self._spikes, self._synops = torch.zeros_like(self.spikes), torch.zeros_like(self.spikes)
        self.final: list[torch.Tensor] = []

    def batch(self, y: torch.Tensor) -> "_Reader":
        self._spikes.zero_()
        self._synops.zero_()
        return _Reader(self.readout, y, self.regression, torch.zeros_like(self.metric))

    def count(self, i: int, t: int, counts: torch.Tensor) -> None:
        self._spikes[i, t] += counts[0]
        self._synops[i, t] += counts[1]

    def count_chunk(self, i: int, t0: int, counts: torch.Tensor) -> None:
        self._spikes[i, t0:t0 + len(counts)] += counts[:, 0]
        self._synops[i, t0:t0 + len(counts)] += counts[:, 1]

    def commit(self, reader: "_Reader") -> None:
        self.final.append(reader.final.double().cpu())
        self.metric += reader.metric
        self.spikes += self._spikes
        self.synops += self._synops


class _Reader:
    """The readout of one batch, step by step (see ``Readout``)."""

    def __init__(self, readout: Readout, y: torch.Tensor, regression: bool, metric: torch.Tensor):
        self.readout, self.y, self.regression, self.metric = readout, y, regression, metric
        self.decay = math.exp(-1.0 / readout.tau) if readout.tau else None
        self.r = self.total = self.final = None

    def update(self, t: int, out: torch.Tensor) -> torch.Tensor:
        d, start = self.decay, self.readout.start
        if d is None:
            self.r = out
        else:
            self.r = (1 - d) * out if self.r is None else d * self.r + (1 - d) * out
        summed = t >= start and not self.readout.hold  # a held readout: the output alone is the score
        if summed:
            self.total = self.r if self.total is None else self.total + self.r
        score = self.total / (t - start + 1) if summed else self.r
        self.final = per_sample_metric(score, self.y, self.regression)
        self.metric[t] += self.final.sum()
        return score


def ann_accuracy(ann: nn.Module, data: TensorData, batch_size: int, device: torch.device) -> float:
    """Accuracy of the ANN, or for a regression task its NMSE (see ``nmse``)."""
    total = ann_metric_sum(ann, data, batch_size, device)
    return nmse(total, data) if data.task == "regression" else total / max(len(data), 1)


def ann_metric_sum(ann: nn.Module, data: TensorData, batch_size: int, device: torch.device) -> float:
    """The ANN's correct answers (or, regression, summed squared error) on ``data``: a sum, so
    shards of a data set add up."""
    return float(ann_per_sample(ann, data, batch_size, device).sum())


@ieee_float32
@torch.inference_mode()
def ann_per_sample(ann: nn.Module, data: TensorData, batch_size: int, device: torch.device) -> torch.Tensor:
    """Per sample of ``data``: 1 if the ANN is right, else 0 (regression: its squared error), float64."""
    ann = ann.to(device).eval()
    parts = [per_sample_metric(ann(x.to(device)), y.to(device), data.task == "regression").double().cpu()
             for x, y in data.batches(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def per_sample_metric(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """Per sample: squared error of the first output (regression, float64), else whether the
    argmax is right (bool)."""
    out = out.reshape(len(y), -1)
    if regression:
        return (out[:, 0].double() - y.double()) ** 2
    return out.argmax(1) == y



def nmse(squared_error: float, data: TensorData) -> float:
    """Normalised mean squared error: sum (y_hat - y)^2 / sum (y - mean y)^2."""
    y = data.targets.double()
    return squared_error / max(float(((y - y.mean()) ** 2).sum()), 1e-30)


def split_static(snn: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split ``snn`` into (static, dynamic): ``static(x)`` computes once, per sample, every node
    that depends only on the input (e.g. the first layer's constant current ``W x + b``) and
    returns those the time-stepped part needs; ``dynamic(*static(x))`` is one time step and
    equals ``snn(x)``."""
    stateful = {name for name, m in snn.named_modules() if isinstance(m, StatefulLayer)}
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
