"""Atomic, reproducible output: every file we write appears whole or not at all, and the same
content always gives the same bytes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp (and some writers) make 0600; use the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A ``.safetensors`` file with a canonical header. safetensors writes its metadata in hash-map
    order, which changes from process to process: the same weights then gave a different file
    (and checksum) on every run. The header is re-serialised with the metadata keys sorted and
    the tensors in file order; the tensor bytes are untouched."""
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
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)

