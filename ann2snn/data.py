"""Data sets: torchvision's named image sets, an image folder, or a tensor file.

A data set is named by a spec string:
  ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (torchvision, under ``--data-dir``),
  ``folder:PATH`` (``torchvision.datasets.ImageFolder``),
  ``PATH.safetensors`` / ``PATH.pt`` (tensors ``inputs`` [N, C, H, W] and ``targets`` [N];
  uint8 inputs are scaled to [0, 1]).
Named sets are held in memory as uint8 tensors and sliced into batches directly, which is
far faster than one PIL image at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import UserError

NAMED = {  # spec -> (torchvision class, folder torchvision reads, classes)
    "mnist": ("MNIST", "MNIST", 10),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST", 10),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
}
SPLITS = ("train", "test")


def default_data_dir() -> Path:
    return Path(os.environ.get("ANN2SNN_DATA", Path.home() / ".cache" / "ann2snn" / "data"))


@dataclass
class Normalize:
    """Per-channel ``(x - mean) / std`` applied after scaling to [0, 1]; empty means none."""

    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> "Normalize":
        """Parse ``"MEAN;STD"`` with comma-separated channels, e.g. ``"0.1307;0.3081"``."""
        if not text or text == "none":
            return cls()
        try:
            mean_s, std_s = text.split(";")
            mean = [float(v) for v in mean_s.split(",")]
            std = [float(v) for v in std_s.split(",")]
        except ValueError:
            raise UserError(f"--normalize {text!r}: expected 'MEAN;STD', e.g. '0.1307;0.3081'") from None
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise UserError(f"--normalize {text!r}: as many means as stds, and every std > 0")
        return cls(mean, std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mean:
            return x
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std


@dataclass
class ImageData:
    """Images held in memory: ``inputs`` [N, C, H, W] (uint8 or float), ``targets`` [N]."""

    name: str
    split: str
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int
    normalize: Normalize = field(default_factory=Normalize)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.inputs.shape[1:])

    def subset(self, indices: torch.Tensor) -> "ImageData":
        return ImageData(self.name, self.split, self.inputs[indices], self.targets[indices],
                         self.num_classes, self.normalize)

    def head(self, limit: int | None) -> "ImageData":
        return self if limit is None or limit >= len(self) else self.subset(torch.arange(limit))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            x = self.inputs[start:start + batch_size]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            yield self.normalize(x), self.targets[start:start + batch_size].long()


def _missing(spec: str, root: Path) -> UserError:
    folder = NAMED[spec][1]
    offline = (f"python scripts/fetch_data.py {spec} --data-dir {root}" if spec in ("mnist", "fashion-mnist")
               else f"extract the python-version archive into {root / folder}")
    return UserError(f"--dataset {spec}: not found under {root}. Offline: {offline}; online: add --download")


def _load_named(spec: str, split: str, root: Path, download: bool) -> ImageData:
    import torchvision

    cls_name, folder, classes = NAMED[spec]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError:
        raise _missing(spec, root) from None
    except Exception as exc:  # network errors when --download is given offline
        raise UserError(f"--dataset {spec}: could not load or download into {root} "
                        f"({type(exc).__name__}: {exc})") from None
    data = torch.as_tensor(ds.data)
    inputs = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    return ImageData(spec, split, inputs.contiguous(), torch.as_tensor(ds.targets), classes)


def _load_tensor_file(spec: str, path: Path) -> ImageData:
    from .checkpoint import read_state_dict

    if not path.is_file():
        raise UserError(f"--dataset {spec}: file not found")
    tensors = read_state_dict(path)
    if "inputs" not in tensors or "targets" not in tensors:
        raise UserError(f"--dataset {spec}: a tensor file needs tensors 'inputs' and 'targets', "
                        f"found {sorted(tensors)[:6]}")
    inputs, targets = tensors["inputs"], tensors["targets"]
    if inputs.dim() < 2 or targets.dim() != 1 or len(inputs) != len(targets) or len(targets) == 0:
        raise UserError(f"--dataset {spec}: 'inputs' must be [N, ...] and 'targets' [N] with N > 0, "
                        f"got {tuple(inputs.shape)} and {tuple(targets.shape)}")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise UserError(f"--dataset {spec}: 'inputs' holds NaN or infinite values")
    if targets.is_floating_point() or targets.min() < 0:
        raise UserError(f"--dataset {spec}: 'targets' must be non-negative integer class indices")
    return ImageData(path.name, "file", inputs, targets.long(), int(targets.max()) + 1)


def _load_folder(spec: str, path: Path) -> ImageData:
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    if not path.is_dir():
        raise UserError(f"--dataset {spec}: folder not found")
    try:
        ds = torchvision.datasets.ImageFolder(str(path))
    except Exception as exc:
        raise UserError(f"--dataset {spec}: not an image folder ({exc})") from None
    images = [pil_to_tensor(ds.loader(p)) for p, _ in ds.samples]
    if len({tuple(im.shape) for im in images}) != 1:
        raise UserError(f"--dataset {spec}: images differ in size or channels; resize them first")
    return ImageData(path.name, "folder", torch.stack(images), torch.tensor(ds.targets), len(ds.classes))


def open_dataset(spec: str, split: str = "test", root: str | Path | None = None, download: bool = False,
                 normalize: Normalize | None = None) -> ImageData:
    """Open a data set by spec; ``split`` applies to named sets only."""
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root) if root else default_data_dir()
    if spec in NAMED:
        data = _load_named(spec, split, root, download)
    elif spec.startswith("folder:"):
        data = _load_folder(spec, Path(spec[len("folder:"):]))
    elif spec.endswith((".safetensors", ".pt", ".pth")):
        data = _load_tensor_file(spec, Path(spec))
    else:
        raise UserError(f"--dataset {spec!r}: expected one of {', '.join(NAMED)}, folder:PATH, "
                        "or a .safetensors/.pt tensor file")
    data.normalize = normalize or Normalize()
    if data.normalize.mean and len(data.normalize.mean) not in (1, data.sample_shape[0]):
        raise UserError(f"--normalize: {len(data.normalize.mean)} channels given, the data has "
                        f"{data.sample_shape[0]}")
    return data


def calibration_subset(data: ImageData, samples: int, seed: int) -> ImageData:
    """A fixed random subset: the same ``seed`` always draws the same images."""
    if samples <= 0:
        raise UserError(f"--samples {samples}: must be positive")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[:samples]
    return data.subset(idx.sort().values)
