"""The normalised graph must compute what the model computes.

Two guards against a silently wrong network:

``trace`` traces a model with ``torch.fx`` and ``functionalize`` makes in-place operations explicit. ``torch.fx`` records ``y.relu_()`` as a
node whose result nobody reads, while later code reads ``y`` - the same tensor, mutated. Once
the ReLU is replaced by a (non-mutating) spiking slot, those later reads would see the value
before the ReLU and the spiking layer would be dropped. Every read of a mutated tensor after
the in-place node is therefore rewired to the node's result. An in-place operation on a view
of a tensor that is read afterwards cannot be rewired that way and is refused.

``verify`` runs the model and its normalised graph on a batch and refuses, naming the first
spiking slot whose values differ (else the output), when they disagree beyond float tolerance.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ann2snn.conversion.checks import fx_errors_unprinted
from ann2snn.errors import UserError

OUT_OF_PLACE = {torch.relu_: torch.relu, F.relu_: F.relu, torch.clamp_: torch.clamp, torch.clamp_min_: torch.clamp_min,
                torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh, F.hardtanh_: F.hardtanh, F.elu_: F.elu,
                F.leaky_relu_: F.leaky_relu, operator.iadd: operator.add, operator.isub: operator.sub,
                operator.imul: operator.mul, operator.itruediv: operator.truediv}
INPLACE_FUNCTIONS = set(OUT_OF_PLACE)
VIEW_METHODS = {"view", "view_as", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute",
                "narrow", "select", "expand", "expand_as", "t", "unflatten", "as_strided", "diagonal",
                "contiguous"}
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.narrow, torch.select, torch.transpose, torch.permute,
                  torch.squeeze, torch.unsqueeze, torch.reshape, torch.t, torch.diagonal}


def _mutated(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` writes in place, if any."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") \
            and node.target != "requires_grad_":
        return first
    if node.op == "call_function" and (node.target in INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
                                       or (node.target in (F.relu, F.relu6, F.hardtanh, F.silu, F.dropout)
                                           and len(node.args) > 1 and node.args[-1] is True)):
        return first
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False) is True:
        return first
    return None


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """Turn an in-place node into the out-of-place operation that returns the same value."""
    if node.op == "call_method" and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
    elif node.op == "call_function" and node.target in OUT_OF_PLACE:
        node.target = OUT_OF_PLACE[node.target]
    elif node.op == "call_function":
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        elif len(node.args) > 1 and node.args[-1] is True:
            node.args = (*node.args[:-1], False)
    elif node.op == "call_module":
        gm.get_submodule(node.target).inplace = False


def _is_view(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in VIEW_METHODS) or \
        (node.op == "call_function" and node.target in VIEW_FUNCTIONS)


def functionalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewire every read of a tensor after an in-place write to it to the write's result, then
    make the write out of place (the same value, no tensor mutated: calibration hooks, the
    fan-out count and the simulation may hold on to any intermediate value)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = _mutated(gm, node)
        if target is None:
            continue
        chain = [target]
        while _is_view(chain[-1]) and isinstance(chain[-1].args[0], fx.Node):
            chain.append(chain[-1].args[0])
        later = lambda n: [u for u in n.users if u is not node and order[u] > order[node]]  # noqa: E731
        if len(chain) > 1 and any(later(n) for n in chain[1:]):
            raise UserError(f"node '{node.name}': an in-place operation on a view ({chain[0].name} of "
                            f"{chain[-1].name}) that is read afterwards; write it out of place "
                            "(e.g. y = y.relu() instead of y[...].relu_())")
        for user in later(target):
            user.replace_input_with(target, node)
        _out_of_place(gm, node)
    gm.graph.lint()
    gm.recompile()
    return gm


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` in eval mode, in-place operations made explicit; a failure
    names the reason."""
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model cannot be traced by torch.fx ({msg[:200]}); data-dependent control "
                        "flow in forward() must be removed before conversion") from None
    return functionalize(gm)  # in-place writes made explicit


@torch.no_grad()
def verify(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> None:
    """Refuse ``gm`` (``graph.normalize(model)``) if it computes other values than ``model`` on
    ``x``, naming the first spiking slot that differs (``gm.meta['slot_sources']`` maps a slot to
    the traced node it replaced), else the output."""
    model, gm = model.eval(), gm.eval()
    try:
        expected = model(x)
    except Exception:
        return  # the shape check that follows reports inputs the model does not take
    try:
        with fx_errors_unprinted():
            got = gm(x)
    except Exception as exc:  # the model takes x, its rebuilt graph does not
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"the normalised graph fails on an input the model takes ({type(exc).__name__}: {first}); "
                        "nothing was converted") from None
    if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor) or \
            not bool(torch.isfinite(expected).all()):
        return  # overflow: calibration names the layer where it starts
    if expected.shape == got.shape and _close(got, expected):
        return
    where = _first_differing_slot(model, gm, x)
    diff = (got.float() - expected.float()).abs().max() if expected.shape == got.shape else float("nan")
    raise UserError(f"the normalised graph computes other values than the model ({where}; largest "
                    f"output difference {float(diff):.3g}), so a layer the pre-flight table lists would be "
                    "converted wrongly; nothing was converted")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


def _first_differing_slot(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> str:
    sources: dict[str, str] = gm.meta.get("slot_sources", {})
    traced = trace(model)
    want, have = _values(traced, x, set(sources.values())), _values(gm, x, set(sources))
    for slot, original in sources.items():
        a, b = have.get(slot), want.get(original)
        if a is not None and b is not None and a.shape == b.shape and not _close(a, b):
            return f"first at node '{original}', spiking layer {slot}"
    return "at the output"


def _values(gm: fx.GraphModule, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    """The values of the nodes (by name) or modules (by target) in ``names``, as computed."""
    seen: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            key = str(n.target) if n.op == "call_module" and str(n.target) in names else n.name
            if key in names and isinstance(out, torch.Tensor):
                seen[key] = out.detach().clone()
            return out

    try:
        Recorder(gm).run(x)
    except Exception:
        pass
    return seen
