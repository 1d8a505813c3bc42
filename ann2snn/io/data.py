"""Data sets: torchvision's named image sets, an image folder, a tensor file, or a generated
regression set.

A data set is named by a spec string:
  ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (torchvision, under ``--data-dir``),
  ``folder:PATH`` (``torchvision.datasets.ImageFolder``),
  ``PATH.safetensors`` / ``PATH.pt`` (tensors ``inputs`` [N, ...] and ``targets`` [N]; uint8
  inputs are scaled to [0, 1]; integer targets are classes, floating-point ones make a
  regression task),
  ``feynman-i.6.2a``, ``feynman-i.9.18`` (AI Feynman equations, generated from a fixed seed:
  10,000 training and 2,000 test samples; docs/science.md section 2).
Named sets are held in memory as uint8 tensors and sliced into batches directly, which is
far faster than one PIL image at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ann2snn.errors import OptionError, UserError
from ann2snn.io.files import tensor_problem
from ann2snn.options import parse_number

NAMED = {  # spec -> (torchvision class, folder torchvision reads, classes)
    "mnist": ("MNIST", "MNIST", 10),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
}
SPLITS = ("train", "test", "fit", "val")
VALIDATION_SHARE = 12  # "val": the last 1/12 of the training split (5,000 of MNIST's 60,000); "fit": the rest
SIGNED = (torch.int8, torch.int16, torch.int32, torch.int64)
UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


def default_data_dir() -> Path:
    return Path(os.environ.get("ANN2SNN_DATA", Path.home() / ".cache" / "ann2snn" / "data"))


@dataclass
class Normalize:
    """Per-channel ``(x - mean) / std`` applied after scaling to [0, 1]; empty means none."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError("as many means as stds")
        real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        bad = next((f"mean {m!r}" for m in self.mean if not (real(m) and abs(m) <= 1e4)), None) or \
            next((f"std {s!r}" for s in self.std if not (real(s) and 1e-6 <= s <= 1e4)), None)
        if bad:  # far beyond any input scaling, and (x - mean) / std stays finite in float32
            raise ValueError(f"finite means, and every std > 0 and finite (|mean| <= 1e4, 1e-6 <= std <= 1e4), not {bad}")

    @classmethod
    def parse(cls, text: str | None) -> "Normalize":
        """Parse ``"MEAN;STD"`` with comma-separated channels, e.g. ``"0.1307;0.3081"``."""
        if not text or text == "none":
            return cls()
        if text.count(";") != 1:
            raise OptionError("normalization", f"{text!r}: expected 'MEAN;STD', e.g. '0.1307;0.3081'")
        mean, std = ([parse_number(v, "normalization", item=text) for v in part.split(",")] for part in text.split(";"))
        try:
            return cls(mean, std)
        except ValueError as exc:
            raise OptionError("normalization", f"{text!r}: {exc}") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mean:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


@dataclass
class TensorData:
    """Samples held in memory: ``inputs`` [N, ...] (uint8 or float), ``targets`` [N] (class
    indices, or real values when ``task`` is "regression", with ``num_classes`` 1 output)."""

    name: str
    split: str
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    normalize: Normalize = field(default_factory=Normalize)
    task: str = "classification"
    skipped: tuple[str, ...] = ()  # files of an image folder left out as unreadable (skip_bad_images)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def subset(self, indices: torch.Tensor) -> "TensorData":
        return dataclasses.replace(self, inputs=self.inputs[indices], targets=self.targets[indices])

    def head(self, limit: int | None) -> "TensorData":
        return self if limit is None or limit >= len(self) else self.subset(torch.arange(limit))

    def sha256(self) -> str:
        """A checksum of the samples as held (inputs and targets, shapes and types)."""
        digest = hashlib.sha256()
        for t in (self.inputs, self.targets):
            digest.update(str((tuple(t.shape), str(t.dtype))).encode())
            digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            x = self.inputs[start:start + batch_size]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            y = self.targets[start:start + batch_size]
            yield self.normalize(x), (y.float() if self.task == "regression" else y.long())


def _missing(spec: str, root: Path) -> UserError:
    folder = NAMED[spec][1]
    offline = (f"ann2snn fetch {spec} --data-dir {root}" if spec in ("mnist", "fashion-mnist")
               else f"extract the python-version archive into {root / folder}")
    return OptionError("dataset", f"{spec}: not found under {root}. Offline: {offline}; online: add {{{{download}}}}")


def _load_named(spec: str, split: str, root: Path, download: bool) -> TensorData:
    import torchvision

    cls_name, folder, classes = NAMED[spec]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError:
        raise _missing(spec, root) from None
    except Exception as exc:  # network errors when --download is given offline
        raise OptionError("dataset", f"{spec}: could not load or download into {root} "
                        f"({type(exc).__name__}: {exc})") from None
    data = torch.as_tensor(ds.data)
    inputs = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    return TensorData(spec, split, inputs.contiguous(), torch.as_tensor(ds.targets), classes)


def _load_tensor_file(spec: str, path: Path) -> TensorData:
    from ann2snn.io.checkpoint import read_state_dict

    if not _exists(path):
        raise OptionError("dataset", f"{spec}: file not found")
    tensors = read_state_dict(path, what="data file")
    if "inputs" not in tensors or "targets" not in tensors:
        raise OptionError("dataset", f"{spec}: a tensor file needs tensors 'inputs' and 'targets', "
                        f"found {sorted(tensors)[:6]}")
    inputs, targets = tensors["inputs"], tensors["targets"]
    for key, t in (("inputs", inputs), ("targets", targets)):
        if not (t.is_floating_point() or t.dtype in SIGNED or t.dtype in UNSIGNED):
            raise OptionError("dataset", f"{spec}: '{key}' has type {str(t.dtype).removeprefix('torch.')}; "
                                         "expected real numbers or integers")
    if targets.dtype in UNSIGNED and targets.dtype != torch.uint8:  # torch computes little on uint16-64
        wide = targets.numpy()
        if wide.size and int(wide.max()) >= 2 ** 31:
            raise OptionError("dataset", f"{spec}: 'targets' holds class {int(wide.max())}; that is no class index")
        targets = torch.from_numpy(wide.astype("int64"))
    if inputs.dtype in UNSIGNED and inputs.dtype != torch.uint8:
        inputs = torch.from_numpy(inputs.numpy().astype("float32"))
    if inputs.dim() < 2 or targets.dim() != 1 or len(inputs) != len(targets) or len(targets) == 0:
        raise OptionError("dataset", f"{spec}: 'inputs' must be [N, ...] and 'targets' [N] with N > 0, "
                        f"got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    return checked_samples(path.name, "file", inputs, targets, "dataset", f"{spec}: ")


def checked_samples(name: str, split: str, inputs: torch.Tensor, targets: torch.Tensor, option: str,
                    where: str = "") -> TensorData:
    """Samples from a file or an API call, refused (naming ``option``) where a value is not a
    finite number (in float32, as simulated) or a class index is negative; float targets are
    regression targets."""
    pairs = (("inputs", inputs), ("targets", targets))
    for key, t in pairs:
        if t.is_complex():
            raise OptionError(option, f"{where}'{key}' has type {str(t.dtype).removeprefix('torch.')}; "
                                      "expected real numbers or integers")
    for key, t in pairs:
        problem = tensor_problem(t)
        if problem:
            raise OptionError(option, f"{where}'{key}' {problem}")
    if targets.is_floating_point():
        return TensorData(name, split, inputs, targets.float(), 1, task="regression")
    if targets.min() < 0:
        raise OptionError(option, f"{where}'targets' must be non-negative class indices or real values")
    return TensorData(name, split, inputs, targets.long(), int(targets.max()) + 1)


def _load_folder(spec: str, path: Path, skip_bad: bool = False) -> TensorData:
    import torchvision

    if not _exists(path) or not path.is_dir():
        raise OptionError("dataset", f"{spec}: folder not found")
    try:
        ds = torchvision.datasets.ImageFolder(str(path))
    except Exception as exc:
        raise OptionError("dataset", f"{spec}: not an image folder ({exc})") from None
    images, targets, skipped = [], [], []
    for file, target in ds.samples:  # in this process: no DataLoader worker wraps the error
        try:
            images.append(_read_image(file, ds.loader))
            targets.append(target)
        except UserError:
            if not skip_bad:
                raise
            skipped.append(file)
    if skipped:
        from ann2snn.progress import notify

        notify(f"skipped {len(skipped)} unreadable image{'s' * (len(skipped) > 1)} of {spec}: "
               + ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else ""))
    if not images:
        raise OptionError("dataset", f"{spec}: none of its {len(skipped)} images can be read")
    if len({tuple(im.shape) for im in images}) != 1:
        raise OptionError("dataset", f"{spec}: images differ in size or channels; resize them first")
    return TensorData(path.name, "folder", torch.stack(images), torch.tensor(targets), len(ds.classes),
                      skipped=tuple(skipped))


def _read_image(file: str, loader) -> torch.Tensor:
    """One image of a folder as a uint8 tensor; a corrupt, truncated or non-image file is a
    one-line error naming it (an interruption passes, even one that a decoder wrapped)."""
    from PIL import UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    from ann2snn.signals import interruption

    try:
        if not stat.S_ISREG(os.stat(file).st_mode):  # a FIFO or device would block the read, or never end
            raise OSError("not a regular file")
        return pil_to_tensor(loader(file))
    except Exception as exc:
        if interruption(exc) is not None:
            raise
        why = ("not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else
               getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)
        raise UserError(f"{file}: cannot read this image ({why}); repair or remove it, or add "
                        "{{skip_bad_images}} to skip unreadable images") from None


def _feynman(spec: str, split: str) -> TensorData:
    """AI Feynman I.6.2a, f = exp(-theta^2 / 2) / sqrt(2 pi), theta ~ U[1, 3]; and I.9.18,
    F = G m1 m2 / ((x2-x1)^2 + (y2-y1)^2 + (z2-z1)^2), m1, m2, G ~ U[1, 2], x1, y1, z1 ~ U[3, 4],
    x2, y2, z2 ~ U[1, 2]; inputs in that order. Fixed seeds per split."""
    n = 10_000 if split == "train" else 2_000
    gen = torch.Generator().manual_seed({"train": 0, "test": 1}[split] + (100 if spec.endswith("9.18") else 0))
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    if spec == "feynman-i.6.2a":
        theta = u(1, 3)
        x, y = theta[:, None], torch.exp(-theta ** 2 / 2) / math.sqrt(2 * math.pi)
    else:
        m1, m2, g, x1, x2, y1, y2, z1, z2 = u(1, 2), u(1, 2), u(1, 2), u(3, 4), u(1, 2), u(3, 4), u(1, 2), u(3, 4), \
            u(1, 2)
        x = torch.stack([m1, m2, g, x1, x2, y1, y2, z1, z2], 1)
        y = g * m1 * m2 / ((x2 - x1) ** 2 + (y2 - y1) ** 2 + (z2 - z1) ** 2)
    return TensorData(spec, split, x.float(), y.float(), 1, task="regression")


FEYNMAN = ("feynman-i.6.2a", "feynman-i.9.18")


def has_splits(spec: str) -> bool:
    """Whether ``spec`` names a data set with train/test splits (a file or folder has none: every
    split of it is the whole of it)."""
    return spec in NAMED or spec in FEYNMAN


def open_dataset(spec: str, split: str = "test", root: str | Path | None = None, download: bool = False,
                 normalize: Normalize | None = None, skip_bad_images: bool = False) -> TensorData:
    """Open a data set by spec; ``split`` applies to named sets only: train, test, or the two
    parts of train, ``fit`` and the held-out ``val`` (its last 1/``VALIDATION_SHARE``), for a
    model trained on ``fit`` whose settings are chosen on ``val`` and measured once on test.
    An unreadable image of a folder is an error naming it, or with ``skip_bad_images`` left
    out (``TensorData.skipped``, and a ``progress.notify`` line)."""
    if split not in SPLITS:
        raise OptionError("split", f"{split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root) if root else default_data_dir()
    if has_splits(spec):
        whole = "test" if split == "test" else "train"
        data = _load_named(spec, whole, root, download) if spec in NAMED else _feynman(spec, whole)
        if split in ("fit", "val"):
            cut = len(data) - len(data) // VALIDATION_SHARE
            data = dataclasses.replace(data.subset(torch.arange(cut) if split == "fit" else
                                                   torch.arange(cut, len(data))), split=split)
    elif spec.startswith("folder:"):
        data = _load_folder(spec, Path(spec[len("folder:"):]), skip_bad_images)
    elif spec.endswith((".safetensors", ".pt", ".pth")):
        data = _load_tensor_file(spec, Path(spec))
    else:
        raise OptionError("dataset", f"{spec!r}: expected one of {', '.join((*NAMED, *FEYNMAN))}, folder:PATH, "
                        "or a .safetensors/.pt tensor file")
    data.normalize = normalize or Normalize()
    if data.normalize.mean and len(data.normalize.mean) not in (1, data.sample_shape[0]):
        raise OptionError("normalization", f": {len(data.normalize.mean)} channels given, the data has "
                        f"{data.sample_shape[0]}")
    return data


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long for the file system
        return False


def data_files(spec: str, root: str | Path | None = None) -> list[Path]:
    """The files a data-set spec reads, for output-versus-input checks: a tensor file, every file
    of an image folder, every file of a named set's folder under ``root``."""
    if spec in FEYNMAN:
        return []
    if spec in NAMED:
        folder = (Path(root) if root else default_data_dir()) / NAMED[spec][1]
    else:
        folder = Path(spec[len("folder:"):]) if spec.startswith("folder:") else Path(spec)
    if not _exists(folder):
        return []
    if not folder.is_dir():
        return [folder]
    return [p for p in folder.rglob("*") if p.is_file()][:100_000]


def calibration_subset(data: TensorData, samples: int, seed: int) -> TensorData:
    """A fixed random subset: the same ``seed`` always draws the same images."""
    if samples <= 0:
        raise OptionError("samples", f"{samples}: must be positive")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[:samples]
    return data.subset(idx.sort().values)


def as_tensor_data(data, name: str = "data", split: str = "in memory") -> TensorData:
    """In-memory samples for the Python API: a ``TensorData``, an ``(inputs, targets)`` pair of
    tensors, a ``torch.utils.data.Dataset`` of (input, target) items or a ``DataLoader`` of
    (inputs, targets) batches. Integer targets are class indices, floating ones regression
    targets. The inputs are used as given (no normalisation is added)."""
    if isinstance(data, TensorData):
        return data
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, targets = data
    elif isinstance(data, DataLoader):
        parts = [(x, y) for x, y in data]
        if not parts:
            raise OptionError(name, ": the DataLoader yields no batches")
        inputs, targets = torch.cat([x for x, _ in parts]), torch.cat([torch.as_tensor(y) for _, y in parts])
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise OptionError(name, ": the Dataset is empty")
        items = [data[i] for i in range(len(data))]
        inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
        targets = torch.stack([torch.as_tensor(y) for _, y in items])
    else:
        raise OptionError(name, f": expected a DataLoader, a Dataset or an (inputs, targets) pair of tensors, "
                                f"not {type(data).__name__}")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise OptionError(name, f": {len(inputs)} inputs and {len(targets)} targets")
    regression = targets.is_floating_point()
    if targets.dim() > 1 and (not regression or targets.reshape(len(targets), -1).shape[1] > 1):
        raise OptionError(name, f": targets of shape {tuple(targets.shape)}; give class indices [N] (not one-hot) "
                                "or one regression value per sample")
    targets = targets.reshape(len(targets), -1).squeeze(1) if regression else targets.reshape(-1)
    return checked_samples(name, split, inputs if inputs.is_complex() else inputs.float(), targets, name, ": ")
