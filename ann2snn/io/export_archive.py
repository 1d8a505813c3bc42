"""``torch.export`` archives (``.pt2``) as input: a model converted without its Python code.

An archive is a zip of JSON (the graph of ATen operators, ``models/model.json``) and raw tensor
bytes. ``torch.export.load`` is never called: it ``exec``s the archive's ``guards_code``, hands
shape expressions to ``sympy.sympify`` (which evaluates Python), resolves operator names attribute
by attribute from ``torch`` and unpickles sample inputs. This module reads the JSON itself and
uses only the fields below, each checked against an allow-list:

- the graph's nodes: an operator name of the form ``torch.ops.aten.NAME.OVERLOAD`` (resolved in
  the ``aten`` namespace only), arguments of plain kinds (tensors by name, numbers, booleans,
  strings, lists of these, dtypes, symbolic sizes by name); anything else is refused by name;
- the signature: which inputs are parameters, buffers and constants (by name), one user input;
- tensor metadata (dtype, sizes, strides, offset) and the raw bytes of weights and constants.

Guards, range constraints, symbolic expressions, sample inputs and pickles are never read, so
no string in the archive is ever evaluated. ``export_graph`` rebuilds the graph from ordinary
modules (``aten.conv2d`` becomes an ``nn.Conv2d``...) for ``graph.normalize``.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import zipfile
from pathlib import Path

import torch
from torch import fx

from ann2snn.errors import UserError
from ann2snn.io.export_graph import DTYPES, rebuild
from ann2snn.io.files import read_input, tensor_problem

EXPORT_REF = "pt2"  # the model reference recorded for an archive: its architecture is its own
SUFFIX = ".pt2"

# Members a plain exported program holds below the archive's top folder; anything else (compiled
# AOTInductor libraries, extra files) is refused.
MEMBERS = re.compile(r"[^/]+/(models/[A-Za-z0-9_]+\.json|data/(weights|constants|sample_inputs)/[A-Za-z0-9_.]+"
                     r"|archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                     r"|extra/[A-Za-z0-9_.]+\.(json|txt))")
MAX_SIZE = 1 << 33  # 8 GiB: an archive whose members add up to more, uncompressed, is refused before it is read


def is_archive(path: str | Path) -> bool:
    return Path(path).suffix == SUFFIX


class Archive:
    """The parts of an archive ann2snn uses: the program's JSON and its named tensors."""

    def __init__(self, data: bytes, name: str):
        self.name = name
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, NotImplementedError, EOFError) as exc:
            raise UserError(f"{name}: not a readable torch.export archive ({exc})") from None
        names = [i.filename for i in infos]
        _check_names(names, name)
        if sum(i.file_size for i in infos) > MAX_SIZE:
            raise UserError(f"{name}: refused: the archive's members add up to more than {MAX_SIZE >> 30} GiB")
        self.sizes = {i.filename: i.file_size for i in infos}
        self.top = names[0].split("/", 1)[0] if names else ""
        models = sorted(n for n in names if n.startswith(f"{self.top}/models/"))
        if len(models) != 1:
            raise UserError(f"{name}: not a readable torch.export archive (it holds {len(models)} programs; "
                            "ann2snn reads archives of one)")
        self.model = models[0].rsplit("/", 1)[1][:-len(".json")]
        self.program = self.json(models[0])
        if not isinstance(self.program, dict) or not isinstance(self.program.get("graph_module"), dict):
            raise UserError(f"{name}: corrupt archive member {models[0]} (no graph_module)")
        order = self.read(f"{self.top}/byteorder", optional=True)
        if order not in (None, b"little"):
            raise UserError(f"{name}: refused: tensors stored in {order[:10]!r} byte order (only little-endian)")

    def read(self, member: str, optional: bool = False) -> bytes | None:
        if member not in self.sizes:
            if optional:
                return None
            raise UserError(f"{self.name}: not a readable torch.export archive ({member} is missing)")
        try:
            return self.zip.read(member)
        except Exception as exc:  # deflate errors, bad CRC, encryption: one line naming the member
            raise UserError(f"{self.name}: not a readable torch.export archive ({member}: "
                            f"{type(exc).__name__})") from None

    def json(self, member: str):
        try:
            return json.loads(self.read(member))
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{self.name}: corrupt archive member {member} ({type(exc).__name__})") from None

    def tensors(self, kind: str) -> dict[str, torch.Tensor]:
        """The archive's ``weights`` or ``constants`` by fully qualified name, from raw bytes."""
        member = f"{self.top}/data/{kind}/{self.model}_{kind}_config.json"
        if self.read(member, optional=True) is None:
            return {}
        config = self.json(member)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise UserError(f"{self.name}: corrupt archive member {member} (no config object)")
        storages: dict[str, bytearray] = {}  # read once; every tensor of a storage is a view, then a copy
        out = {}
        for fqn, entry in entries.items():
            where = f"{self.name}: {kind[:-1]} {fqn[:80]!r}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                raise UserError(f"{where}: corrupt entry in {member}")
            if entry.get("use_pickle") or not isinstance(entry.get("tensor_meta"), dict):
                raise UserError(f"{where}: refused: stored as a pickled Python object (ann2snn reads plain "
                                "tensors only; export a model whose weights are ordinary tensors)")
            path = f"{self.top}/data/{kind}/{entry['path_name']}"
            if path not in storages:
                storages[path] = bytearray(self.read(path))
            out[fqn] = _tensor(storages[path], entry["tensor_meta"], where)
            problem = tensor_problem(out[fqn])
            if problem:
                raise UserError(f"{where}: {problem}")
        return out


def _check_names(names: list[str], name: str) -> None:
    """Members a plain program has, each named once and unambiguously (Python's ``zipfile`` reads
    the last of two copies, other readers the first)."""
    odd = next((n for n in names if not MEMBERS.fullmatch(n) or n.endswith((".so", ".dll", ".dylib", ".py"))), None)
    if odd is not None:
        raise UserError(f"{name}: refused: the archive holds {odd[:80]!r}, which a plain exported program does "
                        "not (compiled code, or a file of another format)")
    seen: set[str] = set()
    for member in names:
        canonical = posixpath.normpath(member.replace("\\", "/")).lstrip("/").casefold()
        if canonical in seen or member.startswith("/") or ".." in member.split("/"):
            raise UserError(f"{name}: refused: the archive member name {member[:80]!r} is ambiguous (given twice, "
                            "or spelled so that readers may disagree on the member it names)")
        seen.add(canonical)
    if len({n.split("/", 1)[0] for n in names}) > 1:
        raise UserError(f"{name}: refused: the archive's members are not under one folder")


def _ints(values, where: str, what: str) -> list[int]:
    """Plain integers of tensor metadata (``{"as_int": 3}``); a symbolic one is refused."""
    if not isinstance(values, list):
        raise UserError(f"{where}: corrupt tensor metadata ({what})")
    out = []
    for v in values:
        v = v.get("as_int") if isinstance(v, dict) else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"{where}: corrupt tensor metadata ({what} must be non-negative integers)")
        out.append(v)
    return out


def _tensor(raw: bytearray, meta: dict, where: str) -> torch.Tensor:
    """A tensor of ``meta``'s dtype, sizes, strides and offset viewed from the storage ``raw``."""
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise UserError(f"{where}: refused: unsupported dtype code {str(meta.get('dtype'))[:20]}")
    if meta.get("layout", 7) != 7:
        raise UserError(f"{where}: refused: not a dense (strided) tensor")
    sizes, strides = _ints(meta.get("sizes"), where, "sizes"), _ints(meta.get("strides"), where, "strides")
    offset = _ints([meta.get("storage_offset", {"as_int": 0})], where, "storage offset")[0]
    if len(sizes) != len(strides):
        raise UserError(f"{where}: corrupt tensor metadata (sizes and strides differ in length)")
    item = torch.empty((), dtype=dtype).element_size()
    if len(raw) % item:
        raise UserError(f"{where}: corrupt archive (its data is not a whole number of {dtype} values)")
    numel = 1
    for s in sizes:
        numel *= s
    last = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) if numel else -1
    if numel == 0:
        raise UserError(f"{where}: refused: an empty tensor (a weight of a plain network holds values)")
    if last >= len(raw) // item or numel > len(raw) // item:
        raise UserError(f"{where}: corrupt archive (the tensor reaches past its data)")
    storage = torch.frombuffer(raw, dtype=dtype)
    return storage.as_strided(sizes, strides, offset).clone()


def read_export(source: str | Path | bytes, name: str | None = None) -> fx.GraphModule:
    """Read an archive (a path or its bytes) into a module graph that ``normalize`` accepts."""
    name = name or str(source if not isinstance(source, bytes) else "archive")
    if not isinstance(source, bytes):
        source = read_input(source, "checkpoint")
    archive = Archive(source, name)
    tensors = archive.tensors("weights")
    tensors.update(archive.tensors("constants"))
    try:
        return rebuild(archive.program, tensors, name)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, AssertionError,
            SyntaxError, OverflowError) as exc:
        raise UserError(f"{name}: not a readable torch.export archive ({type(exc).__name__} in its graph: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
