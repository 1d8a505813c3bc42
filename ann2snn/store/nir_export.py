"""Export an IF network to NIR, the Neuromorphic Intermediate Representation (``nir``, an
optional dependency: ``pip install 'ann2snn[nir]'``), for simulators and chips that read it.

NIR's IF node integrates ``dv/dt = R I`` and resets to ``v_reset`` after a spike at
``v > v_threshold``; spikes have height 1. What maps onto it exactly, one NIR step per ann2snn
step (R = 1/dt with dt = 1e-4 s, the convention of NIR readers):
- IF layers calibrated with ``--param reset=zero --param v_init=0`` (NIR has no reset by
  subtraction and no initial membrane), one threshold per layer, one spike per step; NIR fires
  at v > v_threshold, ann2snn at v >= theta, so v_threshold is the float32 just below theta;
- the spike height theta is folded into the next weighted layer's weights (theta W);
- Conv2d, Linear (as Affine, bias included: it is added every step), AvgPool2d, Flatten; batch
  norm is already folded into the convolutions of the normalised graph, and a layer
  calibration's constant current into the bias of the weighted layer before it.
Anything else (ASN, VSN, max pooling, residual sums, reset by subtraction) is refused, naming
the layer or node: NIR has no node for it, or would simulate another network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from ann2snn import neurons
from ann2snn.conversion.layer_calibration import CurrentShift
from ann2snn.neurons import NIRExport
from ann2snn.store.artifact import Artifact
from ann2snn.errors import UserError
from ann2snn.io.files import atomic_path



def _import_nir():
    try:
        import nir
    except ImportError:
        raise UserError("NIR export needs the nir package: pip install 'ann2snn[nir]'") from None
    return nir


def _check_layers(art: Artifact) -> NIRExport:
    export = art.neuron.nir
    if export is None:
        exported = neurons.names(lambda n: n.nir is not None).upper()
        raise UserError(f"NIR export: the artifact's neurons are {art.neuron.label}; NIR has no node for them "
                        f"(exported: {exported} networks)")
    for layer in art.meta.layers:
        fix = export.problems(layer.params)
        if fix:
            raise UserError(f"NIR export: layer {layer.name} needs " + ", ".join(fix) + f"; {export.fix}")
    return export


def to_nir(art: Artifact):
    """The artifact's spiking network as a ``nir.NIRGraph``."""
    nir = _import_nir()
    export = _check_layers(art)
    snn: fx.GraphModule = art.snn
    shape = tuple(art.meta.input.shape)
    chain = _Chain(nir, export, {layer.name: layer.params for layer in art.meta.layers})
    for node in snn.graph.nodes:
        if node.op == "placeholder":
            chain.add_input(node, shape)
        elif node.op == "output":
            chain.add_output(node)
        else:
            chain.add_operation(snn, node)
    return nir.NIRGraph(nodes=chain.nodes, edges=chain.edges)


class _Chain:
    """The NIR nodes and edges of the graph so far; per fx node, its NIR node's name, the spike
    height its output carries (1: currents) and an example output (shapes only: neurons are not
    stepped)."""

    def __init__(self, nir, export: NIRExport, params: dict[str, dict]):
        self.nir, self.export, self.params = nir, export, params
        self.nodes, self.edges = {}, []
        self.name_of, self.scale, self.env = {}, {}, {}

    def add_input(self, node: fx.Node, shape: tuple) -> None:
        self.nodes["input"] = self.nir.Input(input_type={"input": np.array(shape)})
        self.name_of[node], self.scale[node], self.env[node] = "input", 1.0, torch.zeros((1, *shape))

    def add_output(self, node: fx.Node) -> None:
        src = node.args[0]
        if self.scale.get(src, 1.0) != 1.0:
            raise UserError("NIR export: the network ends in spikes, not in a weighted layer")
        self.nodes["output"] = self.nir.Output(output_type={"output": np.array(self.env[src].shape[1:])})
        self.edges.append((self.name_of[src], "output"))

    def add_operation(self, snn: fx.GraphModule, node: fx.Node) -> None:
        """A module call or a flatten, fed by one node."""
        src = node.args[0] if node.args else None
        if node.op == "call_module" and isinstance(snn.get_submodule(node.target), CurrentShift):
            return self._fold_shift(snn.get_submodule(node.target), node, src)
        if node.op == "call_module":
            out, key = self._module(snn, node, src)
        elif node.op == "call_function" and node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            out, key = torch.flatten(self.env[src], start), node.name
            self.nodes[key] = _flatten(self.nir, self.env[src], start, -1)
            self.scale[node] = self.scale[src]
        else:
            raise UserError(f"NIR export: node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) "
                            "has no NIR counterpart here (residual sums and max pooling are not exported)")
        if len(node.all_input_nodes) != 1:
            raise UserError(f"NIR export: node {node.name} has {len(node.all_input_nodes)} inputs; only chains export")
        self.env[node], self.name_of[node] = out.detach(), key
        self.edges.append((self.name_of[src], key))

    def _fold_shift(self, m: CurrentShift, node: fx.Node, src: fx.Node) -> None:
        """A layer calibration's constant current, added to the bias of the weighted layer before it."""
        name = self.name_of[src]
        target = self.nodes.get(name)
        if not hasattr(target, "bias") or len(src.users) != 1:
            raise UserError(f"NIR export: the layer calibration of {m.layer} follows no weighted layer to fold into")
        self.nodes[name] = dataclasses.replace(target, bias=np.asarray(target.bias) + m.shift.numpy())
        self.env[node], self.name_of[node], self.scale[node] = m(self.env[src]).detach(), name, self.scale[src]

    def _module(self, snn: fx.GraphModule, node: fx.Node, src: fx.Node) -> tuple[torch.Tensor, str]:
        """A spiking layer or another module: its example output and NIR node name."""
        m = snn.get_submodule(node.target)
        spiking = node.target in self.params
        out = self.env[src] if spiking else m(self.env[src])
        key = str(node.target).replace(".", "_")
        if spiking:
            if self.scale[src] != 1.0:
                raise UserError(f"NIR export: spiking layer {node.target} is fed by another's spikes with no "
                                "weighted layer between to carry their height")
            params = self.params[node.target]
            self.nodes[key] = self.export.node(self.nir, tuple(self.env[src].shape[1:]), params)
            self.scale[node] = self.export.height(params)
        else:
            self.nodes[key], self.scale[node] = _module_node(self.nir, node, m, self.env[src], self.scale[src])
        return out, key


def _module_node(nir, node: fx.Node, m: nn.Module, x: torch.Tensor, height: float) -> tuple[object, float]:
    """The NIR node of module ``m`` fed ``x`` with spikes of ``height``, and the height its output
    carries: a weighted layer folds the height into its weights, pooling and flattening pass it on."""
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        w, b = _scaled(m, height)
        return nir.Conv2d(input_shape=tuple(x.shape[2:]), weight=w, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=m.groups, bias=b), 1.0
    if isinstance(m, nn.Linear):
        w, b = _scaled(m, height)
        return nir.Affine(weight=w, bias=b), 1.0
    if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.count_include_pad and m.divisor_override is None:
        return nir.AvgPool2d(kernel_size=np.array(_pair(m.kernel_size)),
                             stride=np.array(_pair(m.stride or m.kernel_size)),
                             padding=np.array(_pair(m.padding))), height
    if isinstance(m, nn.Flatten):
        return _flatten(nir, x, m.start_dim, m.end_dim), height
    raise UserError(f"NIR export: node {node.name} ({type(m).__name__}) has no NIR counterpart here")


def _scaled(m: nn.Module, height: float) -> tuple[np.ndarray, np.ndarray]:
    """A weighted layer's weights times the spike height it is fed, and its bias (zeros if none)."""
    w = (m.weight.detach() * height).numpy()
    b = m.bias.detach().numpy() if m.bias is not None else np.zeros(w.shape[0], dtype=np.float32)
    return w, b


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _flatten(nir, x: torch.Tensor, start: int, end: int):
    """nir.Flatten counts dimensions without the batch: torch's start_dim 1 is NIR's 0."""
    return nir.Flatten(input_type={"input": np.array(x.shape[1:])}, start_dim=start - 1 if start > 0 else start,
                       end_dim=end - 1 if end > 0 else end)


def write_nir(art: Artifact, output: str | Path) -> None:
    """``to_nir`` written to ``output`` (HDF5), whole or not at all."""
    nir = _import_nir()
    graph = to_nir(art)
    with atomic_path(output) as tmp:
        nir.write(str(tmp), graph)
