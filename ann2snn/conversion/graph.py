"""Graph conversion with torch.fx: trace the ANN, normalise its graph, swap ReLUs for neurons.

``normalize`` rewrites a traced ANN into a *normalised ANN* that computes the same function
and that every later stage works on:
  * Dropout and Identity are removed; a trailing softmax/log-softmax is removed (monotone).
  * BatchNorm that follows a Conv/Linear (its only user) is folded into it:
    ``W' = W * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``.
  * Every ReLU - ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, ``clamp(min=0)``,
    ``clamp_min(0)`` - becomes a call of a ``nn.ReLU`` submodule ``act<i>``: the slots that
    ``to_snn`` fills with spiking neurons. GELU and SiLU (``nn.GELU``, ``F.gelu``, ``nn.SiLU``,
    ``F.silu``) become slots too, computing the same function (``GELUSlot``, ``SiLUSlot``); only
    neurons that list them in ``ACTIVATIONS`` (VSN) accept such a slot (``check_activations``).
  * ``maxpool -> relu`` becomes ``relu -> maxpool`` (they commute), so max pooling always acts
    on spikes; in the SNN it is rate-gated (``GatedMaxPool``) or a plain max (``MAXPOOL_MODES``).
Every node gets a row in the pre-flight table; any unsupported node stops the conversion.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn.conversion import layer_calibration
from ann2snn.conversion.bias_ramp import BiasRampRecord, attach
from ann2snn.conversion.layer_calibration import LayerCalibrationRecord
from ann2snn.conversion.bias_ramp import modules as ramp_modules
from ann2snn.conversion.equivalence import trace
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons.layer import SpikingLayer, StatefulLayer

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d)
RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)
REMOVED_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)
SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax)

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
LINEAR_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.flatten, F.avg_pool1d,
                    F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
SHAPE_FUNCTIONS = {getattr, operator.getitem}
REMOVED_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d}
SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "size", "squeeze", "unsqueeze"}
LINEAR_METHODS = {"add", "add_"}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
HINTS = {"relu6": "replace ReLU6 by ReLU and fine-tune", "hardtanh": "replace Hardtanh by ReLU",
         "sigmoid": "train with ReLU", "tanh": "train with ReLU", "mul": "only additive merges are supported"}


class Slot(nn.ReLU):
    """A ReLU that ``to_snn`` will replace by a spiking layer (its type marks the slot)."""

    activation = "relu"


class GELUSlot(Slot):
    """A GELU slot: computes GELU (``approximate`` as the model had it); only VSN fills it."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.activation = "gelu" if approximate == "none" else "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class SiLUSlot(Slot):
    """A SiLU slot: computes x sigmoid(x); only VSN fills it."""

    activation = "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


@dataclass
class Row:
    """One line of the pre-flight table."""

    node: str
    op: str
    status: str  # input | output | kept | converted | rewritten | removed | unsupported
    detail: str


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return str(node.target)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        if node.target in RELU_FUNCTIONS:
            return True
        if node.target is torch.clamp or node.target is torch.clamp_min:
            return _clamps_at_zero(node)
    if node.op == "call_method":
        if node.target in ("relu", "relu_"):
            return True
        if node.target in ("clamp", "clamp_", "clamp_min", "clamp_min_"):
            return _clamps_at_zero(node)
    return False


def _smooth_slot(gm: fx.GraphModule, node: fx.Node) -> Slot | None:
    """The slot for a GELU or SiLU node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.GELU:
            return GELUSlot(mod.approximate)
        return SiLUSlot() if type(mod) is nn.SiLU else None
    if node.op == "call_function" and node.target is F.gelu:
        return GELUSlot(node.kwargs.get("approximate", "none"))
    if node.op == "call_function" and node.target is F.silu:
        return SiLUSlot()
    return None


def _clamps_at_zero(node: fx.Node) -> bool:
    args = list(node.args[1:])
    lo = node.kwargs.get("min", args[0] if args else None)
    hi = node.kwargs.get("max", args[1] if len(args) > 1 else None)
    return lo == 0 and hi is None


def _fold_bn(weighted: nn.Module, bn: nn.Module) -> nn.Module:
    """Return a copy of ``weighted`` with eval-mode batch norm folded into weight and bias."""
    fused = copy.deepcopy(weighted)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    bias = weighted.bias.detach() if weighted.bias is not None else torch.zeros_like(bn.running_mean)
    shape = (-1,) + (1,) * (weighted.weight.dim() - 1)
    fused.weight = nn.Parameter(weighted.weight.detach() * scale.view(shape))
    fused.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return fused


def _unused_name(gm: fx.GraphModule, name: str) -> str:
    base, i = name, 0
    while _has_submodule(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _has_submodule(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def _replace(gm: fx.GraphModule, node: fx.Node, by: fx.Node) -> None:
    node.replace_all_uses_with(by)
    gm.graph.erase_node(node)


def normalize(model: nn.Module, rewrite: bool = True) -> tuple[fx.GraphModule, list[Row]]:
    """Trace and normalise ``model`` (see module docstring). Raises ``UserError`` listing every
    unsupported node; otherwise returns the normalised graph and the pre-flight rows. With
    ``rewrite=False`` only the ReLUs become slots (for training with another activation)."""
    gm = trace(model)
    rows: list[Row] = []
    n_act = 0
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    for node in list(gm.graph.nodes):
        desc, mod = _describe(gm, node), (gm.get_submodule(node.target) if node.op == "call_module" else None)
        smooth = _smooth_slot(gm, node)
        if not rewrite and not _is_relu(gm, node) and smooth is None:
            continue
        if node.op in ("placeholder", "output", "get_attr"):
            rows.append(Row(node.name, desc, "input" if node.op == "placeholder" else
                            ("output" if node.op == "output" else "kept"), ""))
        elif _is_relu(gm, node) or smooth is not None:
            rows.append(_make_slot(gm, node, desc, smooth, f"act{n_act}"))
            n_act += 1
        elif _is_removed(node, mod):
            _replace(gm, node, node.args[0])
            rows.append(Row(node.name, desc, "removed", "no-op at inference"))
        elif isinstance(mod, BATCHNORM):
            rows.append(_fold_batchnorm(gm, node, mod, desc))
        elif _is_softmax(node, mod):
            rows.append(_drop_softmax(gm, node, desc, output_node))
        else:
            rows.append(_other_row(node, mod, desc))
    # a ReLU that followed a max pool was turned into act<i> above; place it before the pool
    if rewrite:
        _move_maxpools_after_relu(gm, rows)
    _tidy(gm)
    _refuse_unsupported(rows)
    return gm, rows


def _make_slot(gm: fx.GraphModule, node: fx.Node, desc: str, smooth: Slot | None, name: str) -> Row:
    """Replace the activation ``node`` by a call of a new slot named ``name`` (or a free variant)."""
    name = _unused_name(gm, name)
    gm.add_submodule(name, smooth or Slot())
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node.args[0],))
    _replace(gm, node, new)
    gm.meta.setdefault("slot_sources", {})[name] = node.name
    return Row(node.name, desc, "converted", f"spiking layer {name}" + (
        f" ({smooth.activation.upper()}: VSN only; its gate z >= T >= 0 drops the negative part)"
        if smooth is not None else ""))


def _is_removed(node: fx.Node, mod: nn.Module | None) -> bool:
    """Dropout or Identity: a no-op at inference."""
    return isinstance(mod, REMOVED_MODULES) or (node.op == "call_function" and node.target in REMOVED_FUNCTIONS)


def _is_softmax(node: fx.Node, mod: nn.Module | None) -> bool:
    return (isinstance(mod, SOFTMAX_MODULES) or (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS)
            or (node.op == "call_method" and node.target in SOFTMAX_METHODS))


def _fold_batchnorm(gm: fx.GraphModule, node: fx.Node, bn: nn.Module, desc: str) -> Row:
    """Fold the batch norm ``node`` into the Conv/Linear before it when that is its only user."""
    src = node.args[0]
    src_mod = gm.get_submodule(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
    if not (isinstance(src_mod, WEIGHTED) and len(src.users) == 1):
        return Row(node.name, desc, "kept", "per-channel affine (not after conv/linear)")
    shared = sum(n.op == "call_module" and n.target == src.target for n in gm.graph.nodes) > 1
    target = _unused_name(gm, f"{src.target}_bn") if shared else src.target
    gm.add_submodule(target, _fold_bn(src_mod, bn))
    src.target = target  # a module called twice keeps its unfolded weights elsewhere
    _replace(gm, node, src)
    return Row(node.name, desc, "rewritten", f"folded into {target}")


def _drop_softmax(gm: fx.GraphModule, node: fx.Node, desc: str, output_node: fx.Node) -> Row:
    """Remove a softmax that feeds the output only (argmax unchanged); refuse one inside."""
    if list(node.users) != [output_node]:
        return Row(node.name, desc, "unsupported", "softmax inside the network")
    _replace(gm, node, node.args[0])
    return Row(node.name, desc, "removed", "monotone readout: argmax unchanged")


def _other_row(node: fx.Node, mod: nn.Module | None, desc: str) -> Row:
    """The row of a node kept as it is (synapses, linear maps, reshapes, max pools) or unsupported."""
    if isinstance(mod, WEIGHTED):
        return Row(node.name, desc, "kept", "synapses")
    if isinstance(mod, AVGPOOL) or (node.op == "call_function" and node.target in LINEAR_FUNCTIONS) or \
            (node.op == "call_method" and node.target in LINEAR_METHODS):
        return Row(node.name, desc, "kept", "linear: acts on spikes and currents alike")
    if isinstance(mod, RESHAPE_MODULES) or (node.op == "call_method" and node.target in RESHAPE_METHODS) \
            or (node.op == "call_function" and node.target in SHAPE_FUNCTIONS):
        return Row(node.name, desc, "kept", "reshape")
    if isinstance(mod, MAXPOOL):
        return Row(node.name, desc, "rewritten", "max pool on spikes")
    key = (type(mod).__name__ if mod is not None else getattr(node.target, "__name__", str(node.target))).lower()
    hint = next((h for k, h in HINTS.items() if k in key), "no spiking equivalent")
    return Row(node.name, desc, "unsupported", hint)


def _tidy(gm: fx.GraphModule) -> None:
    """Drop what the rewrites left unused, check the graph and regenerate its code."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _refuse_unsupported(rows: list[Row]) -> None:
    bad = [r for r in rows if r.status == "unsupported"]
    if bad:
        listed = "; ".join(f"node '{r.node}' {r.op}: {r.detail}" for r in bad)
        raise UserError(f"unsupported operation(s), nothing was converted: {listed}")


def _move_maxpools_after_relu(gm: fx.GraphModule, rows: list[Row]) -> None:
    """``act(maxpool(x))`` -> ``maxpool(act(x))``; a max pool on anything but spikes (slots, their
    concatenation or reshaping) is refused."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), MAXPOOL):
            continue
        users = list(node.users)
        if len(users) == 1 and _is_act(gm, users[0]) and type(gm.get_submodule(users[0].target)) is Slot:
            act = users[0]
            x = node.args[0]
            with gm.graph.inserting_before(node):
                new_act = gm.graph.call_module(act.target, (x,))
            node.args = (new_act,) + tuple(node.args[1:])
            _replace(gm, act, node)
            row = next(r for r in rows if r.node == node.name)
            row.detail = "moved after the ReLU (they commute); max pool on spikes"
        elif not _carries_spikes(gm, node.args[0]):
            row = next(r for r in rows if r.node == node.name)
            row.status, row.detail = "unsupported", "max pool must follow a ReLU (pool spikes, not currents; " \
                "GELU and SiLU do not commute with max)"


def _carries_spikes(gm: fx.GraphModule, node) -> bool:
    """Whether ``node`` holds spiking-layer outputs: a slot, a max pool of them, or their
    concatenation or reshaping."""
    if not isinstance(node, fx.Node):
        return False
    if _is_act(gm, node) or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), MAXPOOL)):
        return True
    if node.op == "call_function" and node.target is torch.cat:
        return all(_carries_spikes(gm, n) for n in node.args[0])
    if (node.op == "call_method" and node.target in RESHAPE_METHODS) or \
            (node.op == "call_module" and isinstance(gm.get_submodule(node.target), RESHAPE_MODULES)) or \
            (node.op == "call_function" and node.target is torch.flatten):
        return _carries_spikes(gm, node.args[0])
    return False


def _is_act(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), Slot)


def spiking_layers(gm: fx.GraphModule) -> list[str]:
    """Names of the ReLU slots of a normalised graph, in execution order."""
    return [str(n.target) for n in gm.graph.nodes if _is_act(gm, n)]


def slot_shapes(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each slot's output shape (without the batch) for one blank input of ``input_shape``."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [gm.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))) for name in spiking_layers(gm)]
    try:
        with torch.no_grad():
            gm(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def analog_fed(gm: fx.GraphModule) -> set[str]:
    """The slots that the network's analog input reaches on a path through no other slot (the
    first layer of a plain CNN, the stem of a ResNet, a layer a skip connection from the input
    joins): part of their input current is the same at every step from the first on."""
    analog: dict[fx.Node, bool] = {}  # whether the input reaches a node's value through no slot
    fed: set[str] = set()
    for n in gm.graph.nodes:
        reached = n.op == "placeholder" or any(analog[a] for a in n.all_input_nodes)
        if _is_act(gm, n):
            if reached:
                fed.add(str(n.target))
            reached = False  # a slot's output is spikes
        analog[n] = reached
    return fed


def slot_schedule(gm: fx.GraphModule, windows: dict[str, int]) -> dict[str, int]:
    """For each spiking layer (the modules ``windows`` names, in a normalised graph or a
    converted one), the step its window opens: the step by which every layer feeding it has
    closed its own (``windows``: its length; 0 for rate codes, which all start at step 0), and for
    ``"output"`` the step by which the graph's output is complete: a time code's schedule
    (``SpikingLayer.place``)."""
    ready: dict[fx.Node, int] = {}  # the step by which a node's value is complete
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        at = max((ready[a] for a in n.all_input_nodes), default=0)
        if n.op == "call_module" and str(n.target) in windows:
            out[str(n.target)] = at
            at += int(windows[str(n.target)])
        if n.op == "output":
            out["output"] = at
        ready[n] = at
    return out


def slot_activations(gm: fx.GraphModule) -> dict[str, str]:
    """For each slot, the activation it computes: relu, gelu or silu."""
    return {str(n.target): gm.get_submodule(n.target).activation for n in gm.graph.nodes if _is_act(gm, n)}


def check_activations(activations: dict[str, str], neuron: str, accepted: tuple[str, ...]) -> None:
    """Refuse a slot whose activation the neuron type cannot stand in for, naming it."""
    bad = [(name, act) for name, act in activations.items() if act not in accepted]
    if bad:
        name, act = bad[0]
        raise UserError(f"layer {name} is {act.upper()}: {neuron.upper()} neurons replace "
                        f"{', '.join(a.upper() for a in accepted)} only (use {{{{neuron}}}} vsn, or train with ReLU)")


def layer_sources(gm: fx.GraphModule) -> dict[str, str]:
    """For each slot, the node feeding it (shown in tables so users recognise the layer)."""
    return {str(n.target): _describe(gm, n.args[0]) for n in gm.graph.nodes if _is_act(gm, n)}


def graph_signature(gm: fx.GraphModule) -> list[str]:
    """A readable fingerprint of the normalised graph, stored in artifacts to detect mismatches."""
    sig = []
    for n in gm.graph.nodes:
        target = (type(gm.get_submodule(n.target)).__name__ if n.op == "call_module"
                  else getattr(n.target, "__name__", str(n.target)))
        sig.append(f"{n.op}:{n.target if n.op == 'call_module' else ''}:{target}")
    return sig


class GatedMaxPool(StatefulLayer):
    """Rate-gated max pooling (Rueckauer et al. 2017): each pooling window passes the output of
    the input unit whose output summed over time so far is largest (ties go to the first). For
    binary spikes of equal height that is the unit that has spiked most."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = copy.deepcopy(pool)
        self.pool.return_indices = True
        self.counts: torch.Tensor | None = None

    def reset(self) -> None:
        self.counts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counts = x.clone() if self.counts is None else self.counts + x
        _, idx = self.pool(self.counts)
        flat = x.flatten(2)
        return flat.gather(2, idx.flatten(2)).view(idx.shape)


MAXPOOL_MODES = {
    "gated": "rate-gated: each window passes the unit with the most output so far (Rueckauer et al. 2017)",
    "spikes": "max of the window's outputs at each step: for binary spikes, a spike when any input spikes",
}


def to_snn(gm: fx.GraphModule, neurons: dict[str, nn.Module], maxpool: str = "gated",
           ramps: list[BiasRampRecord] | None = None,
           calibration: LayerCalibrationRecord | None = None) -> fx.GraphModule:
    """Copy a normalised graph, filling each ReLU slot with its spiking neuron module; each max
    pool (which now always follows a slot) becomes a ``GatedMaxPool`` (``maxpool='gated'``) or
    stays a plain max over the step's spikes (``'spikes'``: cheaper, over-counts when several
    inputs of a window spike in turn). ``ramps``: bias ramps before the layers they name
    (``bias_ramp.py``); ``calibration``: the layer calibration's constant currents, after them
    (``layer_calibration.py``)."""
    if maxpool not in MAXPOOL_MODES:
        raise OptionError("maxpool", f"{maxpool!r}: expected one of {', '.join(MAXPOOL_MODES)}")
    snn = copy.deepcopy(gm)
    missing = set(spiking_layers(gm)) - set(neurons)
    if missing:
        raise UserError(f"no neuron parameters for layer(s) {', '.join(sorted(missing))}")
    starts = slot_schedule(gm, {name: m.window if isinstance(m, SpikingLayer) else 0 for name, m in neurons.items()})
    for name, module in neurons.items():
        if isinstance(module, SpikingLayer):
            module.place(starts[name])
        snn.add_submodule(name, module)
    for n in snn.graph.nodes:
        if maxpool == "gated" and n.op == "call_module" and isinstance(snn.get_submodule(n.target), MAXPOOL):
            snn.add_submodule(n.target, GatedMaxPool(snn.get_submodule(n.target)))
    snn.recompile()
    if ramps:
        attach(snn, ramp_modules(ramps, spiking_layers(gm)))
    return layer_calibration.apply(snn, calibration, spiking_layers(gm))
