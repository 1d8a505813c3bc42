"""Files in and out, safely.

Output: every file we write appears whole or not at all (a short temporary name beside it,
renamed only when complete), never replaces anything but a regular file, and the same content
always gives the same bytes. ``check_outputs`` runs before any long work: it refuses an output
that is one of the command's inputs (same resolved path or inode), that exists and is not a
regular file (a directory, a device such as /dev/null, a FIFO, a socket), or that cannot be
written (a parent that is a file, a read-only folder), so a mistake costs a second, not a
simulation. Every path in or out goes through ``checked_path`` first: a name the file system or
our records cannot take (not UTF-8, over 255 bytes) is a one-line error naming it. Input:
``read_input`` opens only regular files (a FIFO would block forever), JSON is read with a
nesting limit and written strictly (no NaN or Infinity).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ann2snn.errors import UserError
from ann2snn.io.markup import printable

PathLike = str | os.PathLike


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def checked_path(path: PathLike, what: str) -> Path:
    """``path`` if the file system and our records can take its name, else a one-line error: UTF-8
    (it is printed, and recorded in profiles and artifacts), no NUL, each name at most 255 bytes
    and the whole at most 4,095."""
    text = os.fsdecode(path)
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate (bytes that are not UTF-8) is refused first
    why = ("is not valid UTF-8; rename it" if any("\ud800" <= c <= "\udfff" for c in text) else
           "holds a NUL character" if b"\0" in raw else
           "has a name longer than 255 bytes, the file system's limit" if max(map(len, raw.split(b"/"))) > 255 else
           "is longer than 4,095 bytes, the system's limit" if len(raw) > 4095 else None)
    if why:
        shown = printable(text)
        raise UserError(f"{shown[:300]}{'...' * (len(shown) > 300)}: the {what}'s path {why}")
    return Path(text)


def check_outputs(outputs: Iterable[tuple[str, PathLike | None]], inputs: Iterable[PathLike | None],
                  directories: Iterable[tuple[str, PathLike | None]] = ()) -> None:
    """Refuse, before any work, outputs that would replace an input or a non-file, or that cannot
    be written. ``outputs`` and ``directories`` are (what it is, path) pairs: files the command
    writes, and folders it writes files into (e.g. a report folder)."""
    probed: set[Path] = set()  # folders already shown writable
    for what, folder in directories:
        if folder is None:
            continue
        folder = checked_path(folder, what)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder}: the {what} must be a folder; this is a file")
        _check_writable_folder(folder, what, folder, probed)
    ins = {}  # (device, inode) -> path: a file is the same under any name, link or relative path
    for p in inputs:
        if p is not None and (ident := _identity(Path(p))) is not None:
            ins.setdefault(ident, Path(p))
    seen: dict[tuple, str] = {}
    for what, path in outputs:
        if path is None:
            continue
        path = checked_path(path, what)
        ident = _identity(path)
        if ident is not None and ident in ins:
            raise UserError(f"{path}: the {what} would replace the input {ins[ident]}; choose another path")
        key = ident or (str(path.resolve()),)
        if key in seen:
            raise UserError(f"{path}: given both as the {seen[key]} and as the {what}; choose two paths")
        seen[key] = what
        _check_writable_folder(path.parent, what, path, probed)
        _check_replaceable(path, what)


def _identity(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except (OSError, ValueError):  # missing, or a name the system cannot take (checked_path says which)
        return None
    return (st.st_dev, st.st_ino)


def _check_replaceable(path: Path, what: str) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{path}: cannot write the {what} ({_why(exc)})") from None
    if stat.S_ISLNK(mode):
        mode = path.stat().st_mode if path.exists() else stat.S_IFREG
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"{path}: the {what} would replace {kind}; give a file path")


def _check_writable_folder(folder: Path, what: str, target: Path, probed: set[Path]) -> None:
    """The nearest existing ancestor of ``folder`` must be a folder we can create a file in
    (tried once per folder: ``probed``)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{target}: cannot write the {what}: {probe} is a file, not a folder")
    if probe in probed:
        return
    trial = probe / f".a2s-{secrets.token_hex(4)}.part"
    try:
        os.close(os.open(trial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as exc:
        raise UserError(f"{target}: cannot write the {what} in {probe} ({_why(exc)})") from None
    trial.unlink()
    probed.add(probe)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.
    Refuses to replace anything but a regular file; any OS failure (permission, disk full, a
    name too long) is a ``UserError`` naming ``path``, and leaves no temporary file behind."""
    path = checked_path(path, "output")
    _check_replaceable(path, "output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path}: cannot create its folder ({_why(exc)})") from None
    tmp = path.parent / f".a2s-{secrets.token_hex(6)}.part"  # short: a legal long name stays legal
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({_why(exc)})") from None
    try:
        yield tmp
        _check_replaceable(path, "output")  # nothing else took the name meanwhile
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"{path}: no space left on the device; nothing was written") from None
        raise UserError(f"{path}: cannot write ({_why(exc)})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tensor_problem(t: torch.Tensor) -> str | None:
    """What makes a tensor read from a file unusable, or None: complex values, or values that are
    NaN or infinite once in float32, the precision ann2snn computes in (a float64 1e300 is inf
    there; float8 types are checked through float32 too)."""
    if t.is_complex():
        return "holds complex values"
    if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
        return "holds NaN or infinite values (in float32)"
    return None


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_text(value: Any, **kwargs) -> str:
    """Strict JSON: a NaN or infinity is a bug to report, not a token other readers reject."""
    return json.dumps(value, allow_nan=False, **kwargs)


def read_input(path: PathLike, what: str) -> bytes:
    """The bytes of an input file; a one-line error if it is missing, not a regular file (a FIFO
    would block forever, a folder cannot be read) or unreadable."""
    path = check_input(path, what)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({_why(exc)})") from None


def check_input(path: PathLike, what: str) -> Path:
    """``path`` if it is a regular file, else a one-line error saying what it is."""
    path = checked_path(path, what)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({_why(exc)})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{path}: the {what} is {kind}")
    return path


def parse_json(text: str | bytes, where: str, what: str = "file") -> Any:
    """JSON from a file we did not write; deep nesting, NaN, numbers beyond a float (1e400) and bad
    bytes are one-line errors."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise UserError(f"{where}: not a JSON {what} (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{where}: not a JSON {what} ({exc})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is beyond the range of a float")
    return value


def write_safetensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A ``.safetensors`` file with a canonical header (``safetensors_bytes``)."""
    raw = safetensors_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The bytes of a ``.safetensors`` file with a canonical header. safetensors writes its
    metadata in hash-map order, which changes from process to process: the same weights then
    gave a different file (and checksum) on every run. The header is re-serialised with the
    metadata keys sorted and the tensors in file order; the tensor bytes are untouched."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    canonical = {**({"__metadata__": dict(sorted(meta.items()))} if meta else {}),
                 **dict(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))}
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= n:  # pad with spaces to the same length, as safetensors itself pads
        raw = raw[:8] + text + b" " * (n - len(text)) + raw[8 + n:]
    return raw
