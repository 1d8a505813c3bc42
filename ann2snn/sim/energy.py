"""Operation counts and the energy model (docs/science.md section 4).

Counts come from the network's connectivity, not from layer-type formulas:
  * ANN MACs: every weighted layer run densely; a MAC is one real connection (padding and
    zero weights excluded), i.e. ``sum(layer_with_weights_1[w != 0](ones))``.
  * Fan-out maps: for every *source* of activity - the analog input, each spiking layer, and
    any weighted layer feeding another weighted layer directly - the number of synapses each
    of its units drives in the next weighted layers, found by one backward pass through a
    linearised copy of the graph (weights -> 1[w != 0], no bias, pools counted as sums).
    A spike of unit i then costs ``fanout[i]`` synaptic operations (SynOps). Graded events
    (VSN: each carries a value) are pooled before they travel: for a spiking layer whose every
    user is an average-pool module (``pooled_sources``), the events counted are the pooled
    units with a non-zero value, each costing the pooled unit's fan-out (``graded=True``).
Energy (Horowitz 2014, 45 nm, compute only): ANN = MACs x E_MAC; SNN = SynOps x E_AC
(x E_MAC for graded spikes, which carry a value) + MACs of layers fed with analog values x E_MAC. The constant analog input is turned into a
current once per sample, so the input layer's MACs are counted once, not once per step.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn.conversion.graph import AVGPOOL, BATCHNORM, MAXPOOL, WEIGHTED, Slot

PRESETS = {  # pJ per operation, Horowitz (2014), 45 nm
    "45nm-fp32": {"mac_pj": 4.6, "ac_pj": 0.9},
    "45nm-fp16": {"mac_pj": 1.5, "ac_pj": 0.4},
    "45nm-int8": {"mac_pj": 0.23, "ac_pj": 0.03},
}
DEFAULT_PRESET = "45nm-fp32"
POOL_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}


def _connections(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer applied with weights 1[w != 0] and no bias: its output counts connections."""
    ones = (module.weight != 0).to(x.dtype)
    if isinstance(module, nn.Linear):
        return F.linear(x, ones)
    return module._conv_forward(x, ones, None)


class _CountPool(torch.autograd.Function):
    """Forward: the pool. Backward: each input unit receives the full gradient of every window
    it belongs to (the pool's VJP divided by its VJP of ones), i.e. a pool counted as a sum."""

    @staticmethod
    def forward(ctx, x, pool):
        ctx.pool = pool
        ctx.save_for_backward(x)
        return pool(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            y = ctx.pool(xx)
            num = torch.autograd.grad(y, xx, grad, retain_graph=True)[0]
            den = torch.autograd.grad(y, xx, torch.ones_like(grad))[0]
        return torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)), None


def _as_avg(pool: nn.Module):
    """Max pools are counted like average pools with the same windows."""
    if isinstance(pool, MAXPOOL):
        fn = F.avg_pool2d if isinstance(pool, nn.MaxPool2d) else F.avg_pool1d
        return lambda x: fn(x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)
    return pool


def pooled_sources(gm: fx.GraphModule, layers: list[str] | None = None) -> dict[str, str]:
    """Spiking layers (ReLU slots, or the modules named ``layers`` in a converted network) whose
    every user is one average-pool module with a fixed window (not adaptive): layer name -> pool
    module name."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and (node.target in layers if layers is not None else
                                         isinstance(gm.get_submodule(node.target), Slot)):
            users = list(node.users)
            if len(users) == 1 and users[0].op == "call_module" and \
                    isinstance(gm.get_submodule(users[0].target), (nn.AvgPool1d, nn.AvgPool2d)):
                out[str(node.target)] = str(users[0].target)
    return out


class _Structure(fx.Interpreter):
    """Runs the linearised graph, making every source a leaf tensor (``pooled``: pool module ->
    layer whose source is that pool's output)."""

    def __init__(self, gm: fx.GraphModule, pooled: dict[str, str] | None = None):
        super().__init__(gm)
        self.pooled = pooled or {}
        self.sources: dict[str, torch.Tensor] = {}
        self.total = torch.zeros(())

    def _leaf(self, name: str, like: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros_like(like, requires_grad=True)
        self.sources[name] = leaf
        return leaf

    def placeholder(self, target, args, kwargs):
        return self._leaf("input", super().placeholder(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, Slot):
            return self._leaf(target, args[0])
        if isinstance(m, WEIGHTED):
            out = _connections(m, args[0])
            self.total = self.total + out.sum()
            return self._leaf(f"{target}:out", out.detach())
        if target in self.pooled:
            return self._leaf(self.pooled[target], m(args[0].detach()))
        if isinstance(m, AVGPOOL + MAXPOOL):
            return _CountPool.apply(args[0], _as_avg(m))
        if isinstance(m, BATCHNORM):
            return args[0]
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target in POOL_FUNCTIONS:
            return _CountPool.apply(args[0], lambda x: target(x, *args[1:], **kwargs))
        return super().call_function(target, args, kwargs)


def fanout_maps(gm: fx.GraphModule, sample_shape: tuple[int, ...], graded: bool = False) -> dict[str, torch.Tensor]:
    """Synapses driven by each unit of each source of a normalised graph, keyed by source name
    (``input``, a spiking layer name, or ``<layer>:out``), shaped like one sample of it; with
    ``graded``, a layer in ``pooled_sources`` is keyed by its name but shaped like its pool's
    output (its events are counted after pooling)."""
    gm = copy.deepcopy(gm).cpu().float().eval()
    interp = _Structure(gm, {pool: layer for layer, pool in pooled_sources(gm).items()} if graded else None)
    interp.run(torch.zeros((1, *sample_shape)))
    if interp.total.requires_grad:
        interp.total.backward()
    return {name: (leaf.grad[0] if leaf.grad is not None else torch.zeros_like(leaf[0])).detach()
            for name, leaf in interp.sources.items()}


def ann_macs(gm: fx.GraphModule, sample_shape: tuple[int, ...]) -> int:
    """MACs of one dense ANN forward pass (real connections only)."""
    gm = copy.deepcopy(gm).cpu().float().eval()
    counts: list[float] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: counts.append(float(_connections(
        mod, torch.ones_like(inp[0])).sum()))) for m in gm.modules() if isinstance(m, WEIGHTED)]
    with torch.no_grad():
        gm(torch.zeros((1, *sample_shape)))
    for h in hooks:
        h.remove()
    return int(round(sum(counts)))


@contextlib.contextmanager
def counting_active_macs(gm: nn.Module) -> Iterator[Callable[[], float]]:
    """While the block runs ``gm`` (any forward passes), count the MACs of an ANN that skips zero
    activations: at every weighted layer, the real connections (weight != 0) whose input is not
    zero - after pooling, where a pool precedes the layer. Yields a function giving the total."""
    totals: list[torch.Tensor] = []

    def count(mod, inp, out):
        totals.append(_connections(mod, (inp[0] != 0).to(inp[0].dtype)).double().sum())

    hooks = [m.register_forward_hook(count) for m in gm.modules() if isinstance(m, WEIGHTED)]
    try:
        yield lambda: float(sum(t.item() for t in totals))
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def ann_active_macs(gm: fx.GraphModule, batches, device: torch.device) -> float:
    """``counting_active_macs`` over the samples of ``batches`` ((inputs, targets) pairs)."""
    gm = gm.to(device).eval()
    with counting_active_macs(gm) as total:
        for x, _ in batches:
            gm(x.to(device))
    return total()


def snn_energy_pj(synops: float, input_macs: float, analog_macs_per_step: float, timesteps: int,
                  preset: str, spike_op: str = "ac") -> float:
    """``spike_op``: what one synaptic event costs, "ac" for binary spikes, "mac" for graded ones."""
    e = PRESETS[preset]
    return synops * e[f"{spike_op}_pj"] + (input_macs + analog_macs_per_step * timesteps) * e["mac_pj"]


def ann_energy_pj(macs: float, preset: str) -> float:
    return macs * PRESETS[preset]["mac_pj"]
