"""A ``torch.export`` program's JSON graph rebuilt from ordinary modules, without torch's loader.

Each ATen node becomes what ``graph.normalize`` would have seen tracing the original model:
``aten.conv2d`` with its weight an ``nn.Conv2d``, ``aten.addmm`` of a transposed weight an
``nn.Linear``, ``aten.batch_norm`` an ``nn.BatchNorm2d``, ``aten.relu`` an ``nn.ReLU``, pooling its
pooling module. Any other operator (or a known one in a form ann2snn does not convert) is
refused by name: no operator outside this table is ever called, so an archive cannot make one
run (a factory such as ``aten.from_file`` would run while the graph is traced). Every field read
is checked here: the operator's name and overload (``aten`` only), each argument's name, kind and
size, tensor names (defined before use), module names. Nothing is evaluated.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from dataclasses import dataclass

import torch
from torch import fx, nn

from ann2snn.errors import UserError

OPERATOR = re.compile(r"torch\.ops\.aten\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
# torch._export.serde.schema.ScalarType: the dtypes a tensor or an argument may have.
DTYPES = {1: torch.uint8, 2: torch.int8, 3: torch.int16, 4: torch.int32, 5: torch.int64, 6: torch.float16,
          7: torch.float32, 8: torch.float64, 12: torch.bool, 13: torch.bfloat16}
MEMORY_FORMATS = {1: torch.contiguous_format, 2: torch.channels_last, 3: torch.channels_last_3d,
                  4: torch.preserve_format}
IDENTITY = {"dropout", "dropout_", "alias", "clone", "contiguous", "detach", "lift_fresh_copy"}
ACTIVATIONS = {"relu": nn.ReLU, "relu_": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh}


@dataclass
class Weight:
    """A parameter, buffer or constant of the archive (``fqn``), possibly transposed in the graph."""
    fqn: str
    value: torch.Tensor
    transposed: bool = False


@dataclass
class Sym:
    """A symbolic size (a dynamic batch dimension): usable only as a view's batch size."""
    name: str


@dataclass
class Unused:
    """An output ann2snn does not rebuild (a pooling's indices, batch norm's saved statistics)."""
    name: str


def rebuild(program: dict, tensors: dict[str, torch.Tensor], name: str) -> fx.GraphModule:
    return _Rebuilder(program, tensors, name).run().eval()


def _one(item: object, where: str) -> tuple[str, object]:
    if not isinstance(item, dict) or len(item) != 1:
        raise UserError(f"{where}: corrupt graph entry")
    return next(iter(item.items()))


class _Rebuilder:
    def __init__(self, program: dict, tensors: dict[str, torch.Tensor], name: str):
        self.name, self.tensors = name, tensors
        gm = program["graph_module"]
        self.json_graph, self.signature = gm["graph"], gm["signature"]
        self.meta = self.json_graph.get("tensor_values") or {}
        self.root, self.graph = nn.Module(), fx.Graph()
        self.values: dict[str, object] = {}
        self.made: dict[str, str] = {}  # weight fqn -> module name (a module used twice is one module)

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.name}: {what}")

    # -- inputs, outputs and values ------------------------------------------------------------
    def inputs(self) -> None:
        users = 0
        for spec in self.signature["input_specs"]:
            kind, body = _one(spec, f"{self.name}: input spec")
            if kind in ("parameter", "buffer", "tensor_constant"):
                fqn = body[f"{kind}_name"]
                if fqn not in self.tensors:
                    raise self.fail(f"the {kind} {str(fqn)[:80]!r} is missing from the archive's data")
                self.values[body["arg"]["name"]] = Weight(fqn, self.tensors[fqn])
            elif kind == "user_input":
                arg_kind, arg = _one(body["arg"], f"{self.name}: user input")
                if arg_kind != "as_tensor":
                    raise self.fail(f"the program takes a non-tensor input ({arg_kind}); ann2snn converts "
                                    "networks with one input tensor")
                users += 1
                safe = fx.Graph().placeholder(self.ident(arg["name"])).name  # as torch names it: input_1
                self.define(arg["name"], self.graph.placeholder(safe))
            else:
                raise self.fail(f"refused: the program takes a {kind[:40]!r} input (ann2snn reads tensors only)")
        if users != 1:
            raise self.fail(f"the exported program takes {users} inputs; ann2snn converts networks with one "
                            "input tensor")
        for spec in self.signature["output_specs"]:
            kind, _ = _one(spec, f"{self.name}: output spec")
            if kind != "user_output":
                raise self.fail(f"the program's output {kind[:40]!r} is not a plain output (a buffer it updates: "
                                "export the model after model.eval())")

    def ident(self, text) -> str:
        """A plain dotted name: identifiers or indices and no Python keyword (fx writes names into the
        code it generates)."""
        if not isinstance(text, str) or len(text) > 200 or not all(
                IDENT.fullmatch(p) and not keyword.iskeyword(p) for p in text.split(".")):
            raise self.fail(f"refused: {str(text)[:60]!r} is not a plain name")
        return text

    def define(self, name: str, value) -> None:
        if isinstance(value, fx.Node):
            sizes = (self.meta.get(name) or {}).get("sizes") or []
            value.meta["shape"] = [s.get("as_int") if isinstance(s, dict) else None for s in sizes]
        self.values[name] = value

    def ref(self, arg) -> object:
        name = arg.get("name") if isinstance(arg, dict) else None
        if name not in self.values:
            raise self.fail(f"the graph uses a tensor {str(name)[:60]!r} before it is defined")
        value = self.values[name]
        if isinstance(value, Unused):
            raise self.fail(f"the graph uses {value.name!r}, an output ann2snn does not rebuild")
        return value

    def value(self, arg, op: str):
        """One argument, by its kind in torch's serialisation schema; other kinds are refused."""
        kind, v = _one(arg, f"{self.name}: an argument of {op}")
        plain = {"as_int": int, "as_float": (int, float), "as_bool": bool, "as_string": str}
        bounded = lambda i: not isinstance(i, (int, float)) or isinstance(i, bool) or (  # noqa: E731
            abs(i) < 2 ** 31 if isinstance(i, int) else math.isfinite(i) and abs(i) < 1e30)
        if kind == "as_none":
            return None
        if kind == "as_tensor":
            return self.ref(v)
        if kind == "as_tensors":
            return [self.ref(t) for t in v]
        if kind == "as_optional_tensors":
            return [None if _one(t, op)[0] == "as_none" else self.ref(_one(t, op)[1]) for t in v]
        if kind in plain or kind[:-1] in plain:
            items = v if kind not in plain else [v]
            want = plain[kind if kind in plain else kind[:-1]]
            if not isinstance(items, list) or any(not isinstance(i, want) or (want is int and isinstance(i, bool))
                                                  or not bounded(i) for i in items):
                raise self.fail(f"refused: an argument of aten.{op} ({kind}) is not a plain value of sane size")
            return v
        if kind in ("as_sym_int", "as_sym_ints"):
            items = [self.sym(i, op) for i in (v if kind == "as_sym_ints" else [v])]
            return items if kind == "as_sym_ints" else items[0]
        table = {"as_scalar_type": DTYPES, "as_memory_format": MEMORY_FORMATS, "as_layout": {7: torch.strided}}
        if kind in table and v in table[kind]:
            return table[kind][v]
        if kind == "as_device" and isinstance(v, dict) and v.get("type") in ("cpu", "cuda"):
            return torch.device("cpu")  # weights are read onto the CPU; the simulation moves them
        raise self.fail(f"refused: an argument of kind {kind[:40]!r} ({op}) is not one ann2snn reads")

    def sym(self, item, op: str):
        kind, v = _one(item, op)
        if kind == "as_int" and isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2 ** 31:
            return v
        if kind == "as_name" and isinstance(self.values.get(v), Sym):
            return self.values[v]
        raise self.fail(f"corrupt symbolic size in {op}")

    def node(self, v) -> fx.Node:
        """A graph value as a node: a weight used as data becomes a buffer read."""
        if isinstance(v, fx.Node):
            return v
        if isinstance(v, Weight):
            target = "const_" + re.sub(r"\W", "_", v.fqn)
            if target not in self.root._buffers:
                self.root.register_buffer(target, v.value.t() if v.transposed else v.value)
            return self.graph.get_attr(target)
        raise self.fail("a symbolic size is used as a tensor (export with a fixed input shape)")

    # -- modules ---------------------------------------------------------------------------------
    def add(self, target: str, module: nn.Module) -> str:
        parent = self.root
        *path, last = self.ident(target).split(".")
        if any(p.startswith("_") or hasattr(fx.GraphModule, p) for p in (*path, last)):
            raise self.fail(f"refused: {target[:60]!r} is not a plain module name (a graph module's own attribute)")
        try:
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            while last in parent._modules:
                last += "_"
            parent.add_module(last, module)
        except (KeyError, TypeError, AttributeError):
            raise self.fail(f"refused: the module name {target[:60]!r} clashes with a Python attribute") from None
        return ".".join([*path, last])

    def call(self, module: nn.Module, x, name: str, weight: Weight | None = None) -> fx.Node:
        """Call ``module`` on ``x``; one owning ``weight`` is named after its owner (``stem.0``)."""
        if weight is None:
            target = self.add(name, module)
        else:
            if weight.fqn not in self.made:
                owner = weight.fqn.rsplit(".", 1)[0] if "." in weight.fqn else name
                self.made[weight.fqn] = self.add(owner, module)
            target = self.made[weight.fqn]
        return self.graph.call_module(target, (self.node(x),))

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        self.inputs()
        for item in self.json_graph["nodes"]:
            self.translate(item)
        outs = []
        for out in self.json_graph["outputs"]:
            kind, v = _one(out, f"{self.name}: graph output")
            if kind != "as_tensor":
                raise self.fail(f"the program returns a {kind[:40]!r}; ann2snn converts networks returning tensors")
            outs.append(self.node(self.ref(v)))
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)

    def translate(self, item: dict) -> None:
        target = item.get("target")
        m = OPERATOR.fullmatch(target) if isinstance(target, str) else None
        if m is None:
            raise self.fail(f"refused: the operator {str(target)[:60]!r} is not an ATen operator "
                            "(symbolic shape arithmetic or a higher-order operator: export with fixed shapes)")
        op, overload = m.groups()
        packet = getattr(torch.ops.aten, op, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
            raise self.fail(f"refused: aten.{op}.{overload} is not an ATen operator")
        named = {}
        for entry in item.get("inputs") or []:
            if entry.get("kind", 1) not in (1, 2) or not IDENT.fullmatch(str(entry.get("name"))):
                raise self.fail(f"refused: an argument of aten.{op} has no plain name ({str(entry.get('name'))[:40]!r})")
            named[entry["name"]] = self.value(entry["arg"], op)
            _check_kind(self, op, entry["name"], named[entry["name"]])
        outputs = []
        for out in item.get("outputs") or []:
            kind, v = _one(out, f"{self.name}: an output of {op}")
            outputs += [t["name"] for t in v] if kind == "as_tensors" else \
                [v.get("as_name")] if kind == "as_sym_int" else [v.get("name") if isinstance(v, dict) else None]
        outputs = [self.ident(o) if o is not None else None for o in outputs]
        result = self.known(op, named, outputs[0] if outputs else op)
        if result is None:  # never run: an operator outside the table is named, not called
            raise self.fail(f"the graph uses aten.{op}.{overload} (node {str(item.get('name') or (outputs[0] if outputs else '?'))[:40]!r}), which "
                            "ann2snn does not convert (or not in this form); train with ReLU, convolutions, linear "
                            "layers, batch norm, pooling, additions and reshapes")
        parts = [result] + [Unused(o) for o in outputs[1:]]  # the first output; the others (indices) are not
        for out, part in zip(outputs, parts):
            if out is not None:
                self.define(out, part)

    def known(self, op: str, a: dict, name: str):
        """The module (or torch function) for ``op`` with its schema-named arguments ``a``; None: kept."""
        rebuild = self.KNOWN.get(op)
        return None if rebuild is None else rebuild(self, op, a.get("input", a.get("self")), a, name)

    # Each takes (op, x: the input, a: the named arguments, name: the first output's name) and returns
    # the rebuilt value, or None when the operator is kept as it is (for the pre-flight table to name).
    def _conv(self, op: str, x, a: dict, name: str):
        if a.get("transposed"):
            return None  # a transposed convolution: named unsupported later
        w, b = a["weight"], a.get("bias")
        if not isinstance(w, Weight) or not (b is None or isinstance(b, Weight)) or w.value.dim() not in (3, 4):
            raise self.fail(f"{name}: weights computed inside the graph are not supported")
        dims, groups = w.value.dim() - 2, a.get("groups", 1)
        padding = a.get("padding", 0)
        cls = nn.Conv1d if dims == 1 else nn.Conv2d
        conv = cls(w.value.shape[1] * groups, w.value.shape[0], tuple(w.value.shape[2:]),
                   _pair(a.get("stride", 1), dims), padding if isinstance(padding, str) else _pair(padding, dims),
                   _pair(a.get("dilation", 1), dims), groups, bias=b is not None)
        return self.call(_loaded(conv, w.value, b), x, name, w)

    def _linear(self, op: str, x, a: dict, name: str):
        """``linear``, or ``addmm`` of a (transposed) weight: an ``nn.Linear``."""
        w, b = (a["weight"], a.get("bias")) if op == "linear" else (a["mat2"], a["self"])
        if op == "addmm":
            x = a["mat1"]
            if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or not isinstance(w, Weight):
                return None
        if not isinstance(w, Weight) or not (b is None or isinstance(b, Weight)):
            raise self.fail(f"{name}: weights computed inside the graph are not supported")
        weight = w.value.t() if w.transposed != (op == "addmm") else w.value
        if weight.dim() != 2 or (b is not None and b.value.shape != weight.shape[:1]):
            return None
        return self.call(_loaded(nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None), weight, b),
                         x, name, w)

    def _transpose(self, op: str, x, a: dict, name: str):
        """A transposed 2-d weight stays a weight, marked transposed."""
        if isinstance(x, Weight) and x.value.dim() == 2 and \
                (op == "t" or sorted(a.get("dims", [a.get("dim0"), a.get("dim1")])) in ([0, 1], [-2, -1], [-1, 0])):
            return Weight(x.fqn, x.value, not x.transposed)
        return None

    def _batch_norm(self, op: str, x, a: dict, name: str):
        w, b, mean, var = (a.get(k) for k in ("weight", "bias", "running_mean", "running_var"))
        if not all(isinstance(t, Weight) or t is None for t in (w, b)) or not isinstance(mean, Weight) or \
                not isinstance(var, Weight) or a.get("training"):
            return None
        dims = len(x.meta.get("shape", [])) if isinstance(x, fx.Node) else 4
        bn = (nn.BatchNorm1d if dims <= 3 else nn.BatchNorm2d)(len(mean.value), eps=a.get("eps", 1e-5),
                                                               affine=w is not None)
        bn.running_mean.copy_(mean.value)
        bn.running_var.copy_(var.value)
        if w is not None:
            bn.weight.data.copy_(w.value)
            bn.bias.data.copy_(b.value if b is not None else torch.zeros_like(w.value))
        return self.call(bn.eval(), x, name, w if w is not None else mean)

    def _activation(self, op: str, x, a: dict, name: str):
        return self.call(ACTIVATIONS[op](), x, name)

    def _pool(self, op: str, x, a: dict, name: str):
        dims = 1 if op.endswith("1d") else 2
        k = _pair(a["kernel_size"], dims)
        common = (k, _pair(a.get("stride") or k, dims), _pair(a.get("padding", 0), dims))
        if op.startswith("max"):
            pool = (nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(
                *common, _pair(a.get("dilation", 1), dims), ceil_mode=bool(a.get("ceil_mode", False)))
        else:
            extra = {"divisor_override": a.get("divisor_override")} if dims == 2 else {}
            pool = (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(
                *common, ceil_mode=bool(a.get("ceil_mode", False)),
                count_include_pad=bool(a.get("count_include_pad", True)), **extra)
        return self.call(pool, x, name)

    def _adaptive_pool(self, op: str, x, a: dict, name: str):
        shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
        size = a.get("output_size")
        if not shape or not isinstance(size, list) or not all(isinstance(s, int) and 0 < s <= (d or 4096)
                                                              for s, d in zip(size, shape[2:])):
            return None  # a pool that grows its input is no pool
        cls = nn.AdaptiveAvgPool1d if op.endswith("1d") else nn.AdaptiveAvgPool2d
        return self.call(cls(tuple(size)), x, name)

    def _mean(self, op: str, x, a: dict, name: str):
        """The mean over both spatial dimensions of a 4-d tensor: a global average pool."""
        shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
        if shape is not None and len(shape) == 4 and isinstance(a.get("dim"), list) and \
                sorted(d % 4 for d in a["dim"]) == [2, 3] and a.get("dtype") is None:
            pooled = self.call(nn.AdaptiveAvgPool2d(1), x, name)
            return pooled if a.get("keepdim", False) else self.graph.call_function(torch.flatten, (pooled, 1))
        return None

    def _identity(self, op: str, x, a: dict, name: str):
        return x if isinstance(x, fx.Node) and not (op.startswith("dropout") and a.get("train")) else None

    def _softmax(self, op: str, x, a: dict, name: str):
        if not isinstance(x, fx.Node):
            return None
        return self.call((nn.LogSoftmax if "log" in op else nn.Softmax)(dim=a["dim"]), x, name)

    def _flatten(self, op: str, x, a: dict, name: str):
        rank = len(x.meta.get("shape") or []) if isinstance(x, fx.Node) else 0
        dims = (a.get("start_dim", 0), a.get("end_dim", -1))
        if not rank or not all(isinstance(d, int) and -rank <= d < rank for d in dims):
            return None
        return self.graph.call_function(torch.flatten, (x, *dims))

    def _view(self, op: str, x, a: dict, name: str):
        if not isinstance(x, fx.Node):
            return None
        return self.view(x, list(a.get("size", a.get("shape"))), x.meta.get("shape"))

    def _sum(self, op: str, x, a: dict, name: str):
        if isinstance(x, fx.Node) and isinstance(a.get("other"), (fx.Node, Weight)) and a.get("alpha", 1) == 1:
            return self.graph.call_function(operator.add, (x, self.node(a["other"])))
        return None

    def _cat(self, op: str, x, a: dict, name: str):
        return self.graph.call_function(torch.cat, ([self.node(t) for t in a["tensors"]], a.get("dim", 0)))

    def _hardtanh(self, op: str, x, a: dict, name: str):
        lo, hi = a.get("min_val", -1.0), a.get("max_val", 1.0)
        if not lo < hi:
            return None
        return self.call(nn.ReLU6() if (lo, hi) == (0, 6) else nn.Hardtanh(lo, hi), x, name)

    def _sym_size(self, op: str, x, a: dict, name: str):
        """The batch size of a tensor: a symbolic size, for a later view."""
        return Sym(name) if isinstance(x, fx.Node) and a.get("dim") == 0 else None

    KNOWN = {**dict.fromkeys(("conv1d", "conv2d", "convolution"), _conv),
             **dict.fromkeys(("linear", "addmm"), _linear),
             **dict.fromkeys(("permute", "t", "transpose"), _transpose),
             **dict.fromkeys(("batch_norm", "_native_batch_norm_legit_no_training"), _batch_norm),
             **dict.fromkeys(ACTIVATIONS, _activation),
             **dict.fromkeys(("max_pool1d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d"),
                             _pool),
             **dict.fromkeys(("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d"), _adaptive_pool),
             "mean": _mean,
             **dict.fromkeys(IDENTITY, _identity),
             **dict.fromkeys(("softmax", "_softmax", "log_softmax", "_log_softmax"), _softmax),
             "flatten": _flatten,
             **dict.fromkeys(("view", "reshape", "_unsafe_view"), _view),
             "add": _sum, "cat": _cat,
             **dict.fromkeys(("hardtanh", "hardtanh_"), _hardtanh),
             "sym_size": _sym_size}

    def view(self, x: fx.Node, size: list, before: list | None) -> fx.Node:
        """A reshape that keeps the batch dimension free where the program's first size is the batch."""
        if size and before and (isinstance(size[0], Sym) or size[0] == before[0] is not None):
            if len(size) == 2:
                return self.graph.call_function(torch.flatten, (x, 1))
            if not any(isinstance(s, Sym) or s == -1 for s in size[1:]):
                return self.graph.call_method("reshape", (x, -1, *size[1:]))
        if any(isinstance(s, Sym) for s in size):
            raise self.fail("a reshape uses a symbolic size other than the batch (export with a fixed input shape)")
        return self.graph.call_method("reshape", (x, *size))


BOOLS = {"ceil_mode", "count_include_pad", "keepdim", "training", "transposed", "train", "cudnn_enabled",
         "half_to_float"}
NUMBERS = {"eps", "momentum", "min_val", "max_val", "p", "alpha", "beta"}
INTS = {"stride", "padding", "dilation", "kernel_size", "output_size", "groups", "dim", "dims", "start_dim", "end_dim",
        "dim0", "dim1", "output_padding", "divisor_override"}


def _check_kind(rebuilder: "_Rebuilder", op: str, name: str, value) -> None:
    """Refuse an argument whose value is not of the kind its schema name takes (``eps`` a
    number, ``ceil_mode`` a flag, ``stride`` integers; ``padding`` may also be a word)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    integers = lambda v: isinstance(v, int) and not isinstance(v, bool) or (  # noqa: E731
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
    ok = (name not in BOOLS or isinstance(value, bool)) and (name not in NUMBERS or number(value)) and \
        (name not in INTS or value is None and name == "divisor_override" or integers(value) or
         name == "padding" and value in ("same", "valid"))
    if not ok:
        raise rebuilder.fail(f"refused: argument {name} of aten.{op} is {str(value)[:30]!r}, not the kind it takes")


def _pair(v, n: int) -> tuple:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * n if len(v) == 1 else v)


def _loaded(module: nn.Module, weight: torch.Tensor, bias: Weight | None) -> nn.Module:
    if module.weight.shape != weight.shape or (bias is not None and module.bias.shape != bias.value.shape):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} does not fit {module}")
    module.weight.data.copy_(weight)
    if bias is not None:
        module.bias.data.copy_(bias.value)
    return module
