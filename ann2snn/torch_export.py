"""``torch.export`` archives (``.pt2``) as input: a model converted without its Python code.

An exported program is a graph of ATen operators whose weights live in the archive. ``read_export``
loads it safely and rebuilds the graph from ordinary modules - ``aten.conv2d`` with its weight
becomes an ``nn.Conv2d``, ``aten.relu`` an ``nn.ReLU``, ``aten.batch_norm`` an ``nn.BatchNorm2d``
and so on - so ``graph.normalize`` sees what it would have seen tracing the original model.
Operators with no module counterpart are kept as they are and named in the pre-flight table.

Safety: ``torch.export.load`` unpickles the archive's sample inputs, and any pickled weight, with
``weights_only=False`` as a fallback. Unless the user trusts the file (``trust_pickle``):
archives whose member names are ambiguous (a name twice - Python's ``zipfile`` reads the last
copy, torch's reader the first - or names that differ only in spelling) are refused, every
pickle is first checked to load with ``weights_only=True``, archives with custom objects are
refused, and the load itself runs with every ``torch.load`` forced to ``weights_only=True``, so
a fall-back to full unpickling is impossible rather than merely checked beforehand.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import operator
import posixpath
import re
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from torch import fx, nn

from .errors import UserError
from .files import read_input

EXPORT_REF = "pt2"  # the model reference recorded for an archive: its architecture is its own
SUFFIX = ".pt2"


def is_archive(path: str | Path) -> bool:
    return Path(path).suffix == SUFFIX


def read_export(source: str | Path | bytes, trust_pickle: bool = False, name: str | None = None) -> fx.GraphModule:
    """Load an archive (a path or its bytes) into a module graph that ``normalize`` accepts."""
    name = name or str(source if not isinstance(source, bytes) else "archive")
    if not isinstance(source, bytes):
        source = read_input(source, "checkpoint")
    if not trust_pickle:
        _check_pickles(source, name)
    try:
        with warnings.catch_warnings(), (contextlib.nullcontext() if trust_pickle else _weights_only()), \
                _quiet_logs():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(source))
        gm = program.module()
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise UserError(f"{name}: not a readable torch.export archive ({type(exc).__name__}: {first})") from None
    return _rebuild(gm, name)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """torch logs failed loads at length before raising; the error line says what matters."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block loads tensors only, whatever its caller asked for."""
    load = torch.load

    def tensors_only(*args, **kwargs):
        kwargs["weights_only"] = True
        return load(*args, **kwargs)

    torch.load = tensors_only
    try:
        yield
    finally:
        torch.load = load


SYMBOL = re.compile(r"[a-z]{1,3}\d+")  # shape symbols: s0, u3, ...
SYMPY_NAMES = {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
               "CeilDiv", "LShift", "RShift", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
               "RoundToInt", "RoundDecimal", "ToFloat", "FloatTrueDiv", "IntTrueDiv", "FloatPow", "PowByNatural",
               "Identity", "Max", "Min", "Abs", "floor", "ceiling", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
               "Not", "True", "False", "oo", "Integer", "Rational", "Pow", "sqrt"}
EXPR_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?(?:e[+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*/%()<>=!,&|~]))")
OPERATOR_TARGET = re.compile(r"torch\.ops(\.[A-Za-z][A-Za-z0-9_]*){2,3}|(_operator|math)\.[A-Za-z][A-Za-z0-9_]*")


def _plain_operator(target: str) -> bool:
    """``torch.ops.NAMESPACE.OP[.OVERLOAD]`` (not a method of ``torch.ops`` such as
    ``load_library``), or a function of ``_operator`` or ``math``."""
    if not OPERATOR_TARGET.fullmatch(target):
        return False
    parts = target.split(".")
    return parts[0] != "torch" or not hasattr(type(torch.ops), parts[2])


def _check_graph_text(archive: zipfile.ZipFile, names: list[str], name: str) -> None:
    """Refuse strings in the archive's graph description that torch would evaluate as code:
    symbolic shape expressions go to ``sympy.sympify`` (which runs Python), operator names are
    resolved attribute by attribute from ``torch``. Only arithmetic on shape symbols and the
    functions torch's own serialiser writes, and ``torch.ops``/``_operator``/``math`` operators,
    are accepted."""
    for member in (n for n in names if n.endswith(".json")):
        try:
            value = json.loads(archive.read(member))
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{name}: corrupt archive member {member} ({type(exc).__name__})") from None
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                stack.extend(item)
            elif isinstance(item, dict):
                for key, sub in item.items():
                    if key == "expr_str" and isinstance(sub, str) and not _plain_expression(sub):
                        raise UserError(f"{name}: refused: a shape expression in {member} is not plain arithmetic "
                                        f"({sub[:60]!r}); pass {{{{trust_pickle}}}} only if you trust this file")
                    if key == "target" and isinstance(sub, str) and not _plain_operator(sub) \
                            and not sub.startswith("#"):
                        raise UserError(f"{name}: refused: the operator {sub[:60]!r} in {member} is not a torch "
                                        "operator; pass {{trust_pickle}} only if you trust this file")
                    stack.append(sub)


def _plain_expression(text: str) -> bool:
    """Arithmetic on shape symbols: no powers (9**9**9 would never finish), short numbers."""
    if len(text) > 400 or "**" in text or re.search(r"\d{19}", text) or re.search(r"\bPow\b|\bPowByNatural\b", text):
        return False
    pos = 0
    while pos < len(text):
        m = EXPR_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            return text[pos:].strip() == ""
        ident = m.group(2)
        if ident is not None and ident not in SYMPY_NAMES and not SYMBOL.fullmatch(ident):
            return False
        pos = m.end()
    return True


# Members a plain exported program holds, below the archive's top folder; anything else (compiled
# AOTInductor libraries, extra files torch would load by their folder alone) is refused.
MEMBERS = re.compile(r"[^/]+/(models/[A-Za-z0-9_]+\.json|data/(weights|constants|sample_inputs)/[A-Za-z0-9_.]+"
                     r"|archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                     r"|extra/[A-Za-z0-9_.]+\.(json|txt))")


def _check_pickles(data: bytes, name: str) -> None:
    """Refuse an archive with members a plain exported program does not have, ambiguous member
    names, graph text torch would run, or a pickle that would import more than plain tensors."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise UserError(f"{name}: not a readable torch.export archive ({exc})") from None
    odd = next((n for n in names if not MEMBERS.fullmatch(n) or n.endswith((".so", ".dll", ".dylib", ".py"))), None)
    if odd is not None:
        raise UserError(f"{name}: refused: the archive holds {odd!r}, which a plain exported program does not "
                        "(compiled code, or a file torch would load); pass {{trust_pickle}} only if you trust it")
    try:
        _check_contents(archive, names, name)
    except UserError:
        raise
    except Exception as exc:  # a corrupt or odd zip: compression, encryption, deflate errors, odd JSON
        raise UserError(f"{name}: not a readable torch.export archive ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None


def _check_contents(archive: zipfile.ZipFile, names: list[str], name: str) -> None:
    _check_graph_text(archive, names, name)
    spelled: dict[str, str] = {}
    for member in names:
        canonical = posixpath.normpath(member.replace("\\", "/")).lstrip("/").casefold()
        if member in spelled.values() or canonical in spelled or member.startswith("/") or ".." in member.split("/"):
            raise UserError(f"{name}: refused: the archive member name {member!r} is ambiguous (given twice, "
                            "or spelled so that readers may disagree on the member it names)")
        spelled[canonical] = member
    pickled = [n for n in names if n.endswith(".pt")]
    for config in (n for n in names if n.endswith("_config.json") and "/data/" in n):
        entries = json.loads(archive.read(config)).get("config", {})
        folder = config.rsplit("/", 1)[0]
        for entry in entries.values():
            if not isinstance(entry, dict):
                raise UserError(f"{name}: corrupt archive member {config} (an entry is not an object)")
            path = str(entry.get("path_name", ""))
            if path.startswith(("custom_obj", "opaque_obj")):
                raise UserError(f"{name}: refused to load (the archive holds a pickled Python object, {path}); "
                                "pass {{trust_pickle}} only if you trust this file")
            if entry.get("use_pickle"):
                pickled.append(f"{folder}/{path}")
    for member in pickled:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # about pickle protocols; the error says enough
                torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"{name}: refused to unpickle archive member {member} (it holds Python objects, "
                            "not only tensors); pass {{trust_pickle}} only if you trust this file") from None


def _arg(node: fx.Node, i: int, key: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


def _pair(v, n: int):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * n if len(v) == 1 else v)


class _Rebuilder:
    """Walks the ATen graph and writes an equivalent graph of modules and torch functions."""

    def __init__(self, src: fx.GraphModule, name: str):
        self.src, self.name = src, name
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.env: dict[fx.Node, object] = {}
        self.made: dict[str, str] = {}  # weight target -> module name (a module used twice is one module)

    def tensor(self, node) -> torch.Tensor | None:
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise UserError(f"{self.name}: node {node}: weights computed inside the graph are not supported")
        obj = self.src
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj.detach().clone()

    def module(self, node: fx.Node, key: fx.Node | None, make) -> fx.Node:
        """Call a module built by ``make()``, named after its weight's owner (``stem.0``)."""
        owner = str(key.target).rsplit(".", 1)[0] if isinstance(key, fx.Node) else node.name
        if owner not in self.made:
            self._add(owner, make())
            self.made[owner] = owner
        return self.graph.call_module(self.made[owner], (self.env[node.args[0]],))

    def _add(self, target: str, module: nn.Module) -> None:
        parent = self.root
        *path, last = target.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)

    def simple(self, node: fx.Node, module: nn.Module) -> fx.Node:
        self._add(node.name, module)
        return self.graph.call_module(node.name, (self.env[node.args[0]],))

    def run(self) -> fx.GraphModule:
        for node in self.src.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "get_attr" or (node.op == "call_module" and "guard" in str(node.target)):
                continue
            elif node.op == "output":
                out = node.args[0]
                out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
                self.graph.output(self.map(out))
            else:
                self.env[node] = self.translate(node)
        self.graph.lint()
        return fx.GraphModule(self.root, self.graph)

    def map(self, value):
        if isinstance(value, fx.Node):
            if value.op == "get_attr":  # a constant used by an operator we keep as is
                target = "const_" + str(value.target).replace(".", "_")
                if not hasattr(self.root, target):
                    self.root.register_buffer(target, self.tensor(value))
                return self.graph.get_attr(target)
            return self.env[value]
        if isinstance(value, (list, tuple)):
            return type(value)(self.map(v) for v in value)
        return value

    def translate(self, node: fx.Node):  # noqa: C901 - one branch per operator family
        aten = torch.ops.aten
        op = node.target
        packet = getattr(op, "overloadpacket", None)
        x = lambda: self.env[node.args[0]]  # noqa: E731
        if op is operator.getitem:
            src = node.args[0]
            if getattr(src.target, "overloadpacket", None) in (aten._native_batch_norm_legit_no_training,
                                                               aten.max_pool2d_with_indices) and node.args[1] == 0:
                return self.env[src]
        if packet in (aten.conv1d, aten.conv2d, aten.convolution):
            w, b = self.tensor(node.args[1]), self.tensor(_arg(node, 2, "bias"))
            if packet is aten.convolution:
                if node.args[6]:
                    return self.keep(node)  # transposed convolution: named unsupported later
                stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
            else:
                stride, padding, dilation, groups = (_arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0),
                                                     _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1))
            if isinstance(padding, str):
                padding_arg = padding
            else:
                padding_arg = _pair(padding, w.dim() - 2)
            cls = nn.Conv1d if w.dim() == 3 else nn.Conv2d
            dims = w.dim() - 2

            def make():
                m = cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), _pair(stride, dims), padding_arg,
                        _pair(dilation, dims), groups, bias=b is not None)
                m.weight.data.copy_(w)
                if b is not None:
                    m.bias.data.copy_(b)
                return m
            return self.module(node, node.args[1], make)
        if packet is aten.linear:
            w, b = self.tensor(node.args[1]), self.tensor(_arg(node, 2, "bias"))

            def make():
                m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
                m.weight.data.copy_(w)
                if b is not None:
                    m.bias.data.copy_(b)
                return m
            return self.module(node, node.args[1], make)
        if packet in (aten.batch_norm, aten._native_batch_norm_legit_no_training):
            w, b, mean, var = (self.tensor(a) for a in node.args[1:5])
            eps = node.args[7] if packet is aten.batch_norm else node.args[6]
            dims = node.args[0].meta.get("val").dim() if "val" in node.args[0].meta else 4

            def make():
                m = (nn.BatchNorm1d if dims <= 3 else nn.BatchNorm2d)(len(mean), eps=eps, affine=w is not None)
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                if w is not None:
                    m.weight.data.copy_(w)
                    m.bias.data.copy_(b if b is not None else torch.zeros_like(w))
                return m.eval()
            return self.module(node, node.args[1] if node.args[1] is not None else node.args[3], make)
        if packet in (aten.relu, aten.relu_):
            return self.simple(node, nn.ReLU())
        if packet in (aten.max_pool1d, aten.max_pool2d, aten.max_pool2d_with_indices):
            dims = 1 if packet is aten.max_pool1d else 2
            k = _pair(node.args[1], dims)
            stride = _arg(node, 2, "stride", []) or k
            return self.simple(node, (nn.MaxPool1d if dims == 1 else nn.MaxPool2d)(
                k, _pair(stride, dims), _pair(_arg(node, 3, "padding", 0), dims),
                _pair(_arg(node, 4, "dilation", 1), dims), ceil_mode=bool(_arg(node, 5, "ceil_mode", False))))
        if packet in (aten.avg_pool1d, aten.avg_pool2d):
            dims = 1 if packet is aten.avg_pool1d else 2
            k = _pair(node.args[1], dims)
            stride = _arg(node, 2, "stride", []) or k
            kwargs = dict(ceil_mode=bool(_arg(node, 4, "ceil_mode", False)),
                          count_include_pad=bool(_arg(node, 5, "count_include_pad", True)))
            if dims == 2:
                kwargs["divisor_override"] = _arg(node, 6, "divisor_override", None)
            return self.simple(node, (nn.AvgPool1d if dims == 1 else nn.AvgPool2d)(
                k, _pair(stride, dims), _pair(_arg(node, 3, "padding", 0), dims), **kwargs))
        if packet in (aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d):
            cls = nn.AdaptiveAvgPool1d if packet is aten.adaptive_avg_pool1d else nn.AdaptiveAvgPool2d
            return self.simple(node, cls(tuple(node.args[1])))
        if packet is aten.mean and _arg(node, 1, "dim") is not None and \
                sorted(d % 4 for d in _arg(node, 1, "dim")) == [2, 3] and node.args[0].meta["val"].dim() == 4:
            pooled = self.simple(node, nn.AdaptiveAvgPool2d(1))
            return pooled if _arg(node, 2, "keepdim", False) else self.graph.call_function(torch.flatten, (pooled, 1))
        if packet in (aten.dropout, aten.dropout_, aten.alias, aten.clone, aten.contiguous, aten.detach,
                      aten.lift_fresh_copy):
            return x()
        if packet in (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax):
            cls = nn.LogSoftmax if "log" in str(packet) else nn.Softmax
            return self.simple(node, cls(dim=node.args[1]))
        if packet is aten.flatten:
            return self.graph.call_function(torch.flatten, (x(), _arg(node, 1, "start_dim", 0),
                                                            _arg(node, 2, "end_dim", -1)))
        if packet in (aten.view, aten.reshape, aten._unsafe_view):
            shape = list(node.args[1])
            before = tuple(node.args[0].meta["val"].shape) if "val" in node.args[0].meta else None
            if before and shape and shape[0] == before[0]:  # keep the batch dimension free
                if len(shape) == 2:
                    return self.graph.call_function(torch.flatten, (x(), 1))
                if -1 not in shape[1:]:
                    return self.graph.call_method("reshape", (x(), -1, *shape[1:]))
            return self.graph.call_method("reshape", (x(), *shape))
        if packet in (aten.add, aten.add_) and _arg(node, 2, "alpha", 1) == 1 and \
                all(isinstance(a, fx.Node) for a in node.args[:2]):
            return self.graph.call_function(operator.add, (self.env[node.args[0]], self.env[node.args[1]]))
        if packet is aten.cat:
            return self.graph.call_function(torch.cat, ([self.env[n] for n in node.args[0]], _arg(node, 1, "dim", 0)))
        if packet in (aten.hardtanh, aten.hardtanh_):
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            return self.simple(node, nn.ReLU6() if (lo, hi) == (0, 6) else nn.Hardtanh(lo, hi))
        for family, cls in ((aten.gelu, nn.GELU), (aten.silu, nn.SiLU), (aten.sigmoid, nn.Sigmoid),
                            (aten.tanh, nn.Tanh)):
            if packet is family:
                return self.simple(node, cls())
        return self.keep(node)

    def keep(self, node: fx.Node) -> fx.Node:
        """An operator with no module counterpart: copied as is, for the pre-flight table to name."""
        return self.graph.call_function(node.target, self.map(tuple(node.args)), self.map(dict(node.kwargs)))


def _rebuild(gm: fx.GraphModule, name: str) -> fx.GraphModule:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UserError(f"{name}: the exported program takes {len(placeholders)} inputs; ann2snn converts "
                        "networks with one input tensor")
    return _Rebuilder(gm, name).run().eval()
