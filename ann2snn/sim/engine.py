"""Layer-by-layer simulation over chunks of time steps.

In a feed-forward SNN, layer l at steps t0..t0+K-1 needs only layer l-1 at those steps, so a
chunk of K steps can run one layer at a time. Time is folded into the batch (row t*B + b is
sample b at step t): every weighted layer runs once per chunk on K*B rows - one large matrix
product instead of K small ones - and every stateful layer (a neuron, a gated max pool) scans
its K steps in order, carrying its state into the next chunk. The arithmetic of each step is
the step-by-step simulation's, so spikes and accuracy are the same (tests compare).

A spiking layer whose backend is "fused" runs the whole chunk in its ``scan(x, steps, batch,
fan)``, which also counts spikes and synaptic operations (``kernels.py``: Triton on CUDA,
in-place PyTorch elsewhere); on the "reference" backend ``TimeScan`` calls its one-step
``forward`` K times and counts after each step.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ann2snn.neurons.layer import SpikingLayer, StatefulLayer


class TimeScan(nn.Module):
    """Runs a stateful one-step module over the chunk's steps. Input: K*B time-major rows, or B
    rows of a constant (the static input current); output: K*B rows. For spiking layers
    (``fan`` given) ``counts`` holds [K, 2]: spikes and synaptic operations per step, summed
    over the batch."""

    def __init__(self, inner: nn.Module, fan: torch.Tensor | None = None, fused: bool = True,
                 pool: nn.Module | None = None):
        super().__init__()
        self.inner, self.fan, self.fused, self.pool = inner, fan, fused, pool
        self.steps, self.batch = 1, 1
        self.counts: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, B = self.steps, self.batch
        constant = x.shape[0] != K * B
        if self.fused and isinstance(self.inner, SpikingLayer) and self.inner.backend == "fused" and \
                self.fan is not None and self.pool is None:
            out, self.counts = self.inner.scan(x, K, B, self.fan)
            return out
        out, counts = None, []
        for t in range(K):
            y = self.inner(x if constant else x[t * B:(t + 1) * B])
            if out is None:
                out = y.new_empty((K * B, *y.shape[1:]))
            out[t * B:(t + 1) * B] = y
            if self.fan is not None:
                counts.append(step_counts(self.inner.spikes, self.fan, self.pool))
        if self.fan is not None:
            self.counts = torch.stack(counts)
        return out


def step_counts(spikes: torch.Tensor, fan: torch.Tensor, pool: nn.Module | None = None) -> torch.Tensor:
    """[spikes, synaptic operations] of one step, summed over the batch (float64: exact counts).
    With ``pool`` (graded events pooled before they travel, ``energy.pooled_sources``) the
    synaptic operations are those of the pooled units that carry a non-zero value."""
    per_unit = spikes.flatten(1).sum(0).double()
    if pool is None:
        return torch.stack([per_unit.sum(), (per_unit * fan.double()).sum()])
    events = (pool((spikes != 0).float()) > 0).flatten(1).sum(0).double()
    return torch.stack([per_unit.sum(), (events * fan.double()).sum()])


class RepeatSteps(nn.Module):
    """A constant (B rows) repeated for the chunk's K steps, where a non-stateful operation
    meets it together with values that change in time."""

    def __init__(self):
        super().__init__()
        self.steps = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.steps, *x.shape).reshape(-1, *x.shape[1:])


def layered(step: fx.GraphModule, layers: list[str], fan: list[torch.Tensor], fused: bool = True,
            pools: dict[str, nn.Module] | None = None) -> tuple[fx.GraphModule, list[nn.Module], list[TimeScan]]:
    """From the time-stepped part of a network (``simulate.split_static``), the chunked version:
    (module, modules whose ``steps``/``batch`` are set per chunk, the spiking layers' scans in
    the order of ``layers``); ``pools``: layers whose events are counted after a pool."""
    pools = pools or {}
    gm = fx.GraphModule(step, step.graph)  # its own module tree: wrapping does not touch ``step``
    stateful = {name for name, m in step.named_modules() if isinstance(m, StatefulLayer)}
    chunked: list[nn.Module] = []
    scans: dict[str, TimeScan] = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in stateful:
            name = str(node.target)
            scan = TimeScan(step.get_submodule(name), fan[layers.index(name)] if name in layers else None, fused,
                            pools.get(name))
            gm.add_submodule(name, scan)
            chunked.append(scan)
            if name in layers:
                scans[name] = scan
    for i, node in enumerate(n for n in list(gm.graph.nodes) if n.op == "placeholder"):
        plain_users = [u for u in node.users if not (u.op == "call_module" and u.target in stateful)]
        if plain_users:  # a constant meets time-varying values: give it the chunk's rows
            repeat = RepeatSteps()
            gm.add_submodule(f"repeat_static_{i}", repeat)
            chunked.append(repeat)
            with gm.graph.inserting_after(node):
                rep = gm.graph.call_module(f"repeat_static_{i}", (node,))
            for u in plain_users:
                u.replace_input_with(node, rep)
    gm.recompile()
    return gm, chunked, [scans[name] for name in layers]


def chunk_steps(batch: int, per_sample_values: int, timesteps: int, budget_bytes: int) -> int:
    """Steps per chunk so that a few activations of the widest layer, K*B rows each, fit the budget."""
    per_step = max(1, 4 * 4 * batch * per_sample_values)  # float32; input, output and temporaries
    return int(max(1, min(timesteps, budget_bytes // per_step)))
