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
  norm is already folded into the convolutions of the normalised graph.
Anything else (ASN, VSN, max pooling, residual sums, reset by subtraction) is refused, naming
the layer or node: NIR has no node for it, or would simulate another network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from ann2snn.store.artifact import Artifact
from ann2snn.errors import UserError
from ann2snn.io.files import atomic_path

DT = 1e-4  # seconds per step in the NIR file; R = 1/DT makes v += I per step


def _import_nir():
    try:
        import nir
    except ImportError:
        raise UserError("NIR export needs the nir package: pip install 'ann2snn[nir]'") from None
    return nir


def _check_layers(art: Artifact) -> None:
    if art.neuron.name != "if":
        raise UserError(f"NIR export: the artifact's neurons are {art.neuron.label}; NIR has no node for them "
                        "(only IF networks are exported)")
    for layer in art.meta.layers:
        p = layer.params
        fix = []
        if p.get("reset", "subtract") != "zero":
            fix.append("reset=zero (NIR's IF resets to a value, not by subtraction)")
        if p.get("v_init", 0.5) != 0:
            fix.append("v_init=0 (NIR has no initial membrane)")
        if isinstance(p["threshold"], list):
            fix.append("one threshold per layer (not per_channel)")
        if p.get("max_spikes", 1) != 1:
            fix.append("max_spikes=1")
        if fix:
            raise UserError(f"NIR export: layer {layer.name} needs " + ", ".join(fix) +
                            "; calibrate with --param reset=zero --param v_init=0 and convert again")


def to_nir(art: Artifact):
    """The artifact's spiking network as a ``nir.NIRGraph``."""
    nir = _import_nir()
    _check_layers(art)
    snn: fx.GraphModule = art.snn
    thresholds = {layer.name: float(layer.params["threshold"]) for layer in art.meta.layers}
    shape = tuple(art.meta.input.shape)
    x = torch.zeros((1, *shape))
    nodes, edges = {}, []
    name_of, scale = {}, {}  # fx node -> NIR node name, spike height it carries
    env = {}
    for node in snn.graph.nodes:
        if node.op == "placeholder":
            nodes["input"] = nir.Input(input_type={"input": np.array(shape)})
            name_of[node], scale[node], env[node] = "input", 1.0, x
            continue
        if node.op == "output":
            src = node.args[0]
            if scale.get(src, 1.0) != 1.0:
                raise UserError("NIR export: the network ends in spikes, not in a weighted layer")
            nodes["output"] = nir.Output(output_type={"output": np.array(env[src].shape[1:])})
            edges.append((name_of[src], "output"))
            continue
        src = node.args[0] if node.args else None
        if node.op == "call_module":
            m = snn.get_submodule(node.target)
            out = env[src] if node.target in thresholds else m(env[src])  # shapes only; neurons are not stepped
            key = str(node.target).replace(".", "_")
            if node.target in thresholds:
                if scale[src] != 1.0:
                    raise UserError(f"NIR export: spiking layer {node.target} is fed by another's spikes with no "
                                    "weighted layer between to carry their height")
                full = lambda v: np.full(env[src].shape[1:], v, dtype=np.float32)  # noqa: E731
                # NIR fires at v > v_threshold, ann2snn at v >= theta: the next float32 below theta
                below = np.nextafter(np.float32(thresholds[node.target]), np.float32(-np.inf))
                nodes[key] = nir.IF(r=full(1.0 / DT), v_threshold=full(below), v_reset=full(0.0))
                scale[node] = thresholds[node.target]
            elif isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
                w = (m.weight.detach() * scale[src]).numpy()
                b = m.bias.detach().numpy() if m.bias is not None else np.zeros(w.shape[0], dtype=np.float32)
                nodes[key] = nir.Conv2d(input_shape=tuple(env[src].shape[2:]), weight=w, stride=m.stride,
                                        padding=m.padding, dilation=m.dilation, groups=m.groups, bias=b)
                scale[node] = 1.0
            elif isinstance(m, nn.Linear):
                w = (m.weight.detach() * scale[src]).numpy()
                b = m.bias.detach().numpy() if m.bias is not None else np.zeros(w.shape[0], dtype=np.float32)
                nodes[key] = nir.Affine(weight=w, bias=b)
                scale[node] = 1.0
            elif isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.count_include_pad and m.divisor_override is None:
                nodes[key] = nir.AvgPool2d(kernel_size=np.array(_pair(m.kernel_size)),
                                           stride=np.array(_pair(m.stride or m.kernel_size)),
                                           padding=np.array(_pair(m.padding)))
                scale[node] = scale[src]
            elif isinstance(m, nn.Flatten):
                nodes[key] = _flatten(nir, env[src], m.start_dim, m.end_dim)
                scale[node] = scale[src]
            else:
                raise UserError(f"NIR export: node {node.name} ({type(m).__name__}) has no NIR counterpart here")
        elif node.op == "call_function" and node.target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            out, key = torch.flatten(env[src], start), node.name
            nodes[key] = _flatten(nir, env[src], start, -1)
            scale[node] = scale[src]
        else:
            raise UserError(f"NIR export: node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) "
                            "has no NIR counterpart here (residual sums and max pooling are not exported)")
        if len(node.all_input_nodes) != 1:
            raise UserError(f"NIR export: node {node.name} has {len(node.all_input_nodes)} inputs; only chains export")
        env[node], name_of[node] = out.detach(), key
        edges.append((name_of[src], key))
    return nir.NIRGraph(nodes=nodes, edges=edges)


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
