"""Layer-by-layer simulation over chunks of time steps.

In a feed-forward SNN, layer l at steps t0..t0+K-1 needs only layer l-1 at those steps, so a
chunk of K steps can run one layer at a time. Time is folded into the batch (row t*B + b is
sample b at step t): every weighted layer runs once per chunk on K*B rows - one large matrix
product instead of K small ones - and every stateful layer (a neuron, a gated max pool) scans
its K steps in order, carrying its state into the next chunk. The arithmetic of each step is
the step-by-step simulation's, so spikes and accuracy are the same (tests compare).

A value that does not change within a chunk travels as B rows, not K*B: the static input
current, and the output of a layer that is constant over the chunk (a time code before its
window opens, and after it closes: ``TTFSNeuron.scan``). A weighted layer then runs on B rows,
and an operation that meets such a value together with time-varying ones repeats it for the
chunk's steps (``MatchRows``). A time code's layers are thus computed over K*B rows only in the
chunks of their own window and their sources' (the simulation cuts chunks at window edges).

A spiking layer that ``scans_chunks`` (backend "fused") runs the whole chunk in its ``scan(x, steps, batch,
fan)``, which also counts spikes and synaptic operations (``kernels.py``: Triton on CUDA,
in-place PyTorch elsewhere); on the "reference" backend ``TimeScan`` calls its one-step
``forward`` K times and counts after each step.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

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
        if self.fused and isinstance(self.inner, SpikingLayer) and self.inner.scans_chunks and \
                self.fan is not None and self.pool is None:
            out, self.counts = self.inner.scan(x, K, B, self.fan)
            return out
        out, counts = None, []
        for t in range(K):
            y = self.inner(x if constant else x[t * B:(t + 1) * B])
            if out is None:
                out = rows_like(y, K * B)
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
    per_unit = spikes.sum(0).flatten().double()  # summed first: no copy of a channels-last layer
    if pool is None:
        return unit_counts(per_unit, fan)
    events = (pool((spikes != 0).float()) > 0).sum(0).flatten().double()
    return torch.stack([per_unit.sum(), (events * fan.double()).sum()])


def unit_counts(per_unit: torch.Tensor, fan: torch.Tensor) -> torch.Tensor:
    """[spikes, synaptic operations] from each unit's spikes summed over the batch (float64)."""
    return torch.stack([per_unit.sum(), (per_unit * fan.double()).sum()])


class MatchRows(nn.Module):
    """An operation of several inputs (a residual sum, a concatenation) whose inputs may mix
    constants of the chunk (B rows) with time-varying values (K*B rows): the constants are
    repeated for the chunk's steps first. ``rows``: the positions, among the arguments' leaves
    (a list of tensors counts each), of those that carry samples (not parameters)."""

    def __init__(self, fn, rows: tuple[int, ...], kwargs: dict):
        super().__init__()
        self.fn, self.rows, self.kwargs = fn, frozenset(rows), kwargs
        self.steps, self.batch = 1, 1

    def forward(self, *args):
        K, B = self.steps, self.batch
        leaves, spec = pytree.tree_flatten(args)
        if K > 1 and any(isinstance(leaves[i], torch.Tensor) and leaves[i].shape[0] == K * B for i in self.rows):
            leaves = [time_rows(a, K, B) if i in self.rows and isinstance(a, torch.Tensor) else a
                      for i, a in enumerate(leaves)]
        return self.fn(*pytree.tree_unflatten(leaves, spec), **self.kwargs)


def time_rows(x: torch.Tensor, steps: int, batch: int) -> torch.Tensor:
    """``x`` as K*B time-major rows: a chunk's constant (B rows) repeated, else as it is."""
    if steps > 1 and x.shape[0] == batch:
        out = rows_like(x, steps * batch)
        out.unflatten(0, (steps, batch)).copy_(x.unsqueeze(0))  # a view of ``out``: its rows are outermost
        return out
    return x


def rows_like(x: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty tensor of ``rows`` rows shaped and laid out (contiguous, or channels last) like ``x``'s."""
    last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if last else torch.contiguous_format)


def _carries_rows(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes whose values have a row per sample (or per sample and step): those reached from
    the inputs; parameters and constants (get_attr) have none."""
    rows: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or (node.op != "get_attr" and any(a in rows for a in node.all_input_nodes)):
            rows.add(node)
    return rows


def _match_rows(gm: fx.GraphModule, stateful: set[str]) -> list[nn.Module]:
    """Every operation of two or more sample-carrying inputs, except stateful modules, becomes a
    ``MatchRows`` module; returns them (their steps and batch are set per chunk)."""
    rows, added = _carries_rows(gm), []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module") or node.op == "call_module" and \
                node.target in stateful or node.kwargs and any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            continue
        leaves, _ = pytree.tree_flatten(tuple(node.args))
        positions = tuple(i for i, a in enumerate(leaves) if isinstance(a, fx.Node) and a in rows)
        if len(positions) < 2:
            continue
        if node.op == "call_module":
            fn = gm.get_submodule(str(node.target))
        elif node.op == "call_method":
            fn = _method(str(node.target))
        else:
            fn = node.target
        name = f"match_rows_{len(added)}"
        module = MatchRows(fn, positions, dict(node.kwargs))
        gm.add_submodule(name, module)
        added.append(module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return added


def _method(name: str):
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


def layered(step: fx.GraphModule, layers: list[str], fan: list[torch.Tensor], fused: bool = True,
            pools: dict[str, nn.Module] | None = None) -> tuple[fx.GraphModule, list[nn.Module], list[TimeScan]]:
    """From the time-stepped part of a network (``simulate.split_static``), the chunked version:
    (module, modules whose ``steps``/``batch`` are set per chunk, the spiking layers' scans in
    the order of ``layers``); ``pools``: layers whose events are counted after a pool."""
    pools = pools or {}
    gm = fx.GraphModule(step, copy.deepcopy(step.graph))  # its own modules and graph: ``step`` stays as it is
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
    chunked += _match_rows(gm, stateful)
    gm.recompile()
    return gm, chunked, [scans[name] for name in layers]


def chunk_steps(batch: int, per_sample_values: int, timesteps: int, budget_bytes: int) -> int:
    """Steps per chunk so that a few activations of the widest layer, K*B rows each, fit the budget."""
    per_step = max(1, 4 * 4 * batch * per_sample_values)  # float32; input, output and temporaries
    return int(max(1, min(timesteps, budget_bytes // per_step)))
