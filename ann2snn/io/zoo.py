"""Model zoo: a registry of reference architectures, filled by a decorator (as timm does).

Every zoo constructor takes ``in_channels``, ``num_classes`` and ``input_size`` (side of a
square image) so that one name serves every image data set. ``resolve_model`` also accepts
``package.module:callable`` for a user's own architecture.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from ann2snn.errors import OptionError, UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn: Callable[..., nn.Module]):
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


@register("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, hidden: int = 256) -> nn.Module:
    """Two hidden ReLU layers."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * input_size * input_size, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register("regression_mlp")
def regression_mlp(in_channels: int = 1, num_classes: int = 1, input_size: int = 1, hidden: int = 64,
                   depth: int = 3) -> nn.Module:
    """An MLP for vector inputs (``in_channels`` features) and ``num_classes`` real outputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, activation: str = "relu") -> nn.Module:
    """LeNet-5 with average pooling: conv6-pool-conv16-pool-fc120-fc84-fc; ReLU, or GELU/SiLU
    (``--model-arg activation=gelu``: a network only VSN converts)."""
    if activation not in ACTIVATIONS:
        raise OptionError("model_args", f"activation={activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    side = ((input_size + 4 - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), act(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), act(), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), act(),
        nn.Linear(120, 84), act(),
        nn.Linear(84, num_classes),
    )


@register("vgg_small")
def vgg_small(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 32) -> nn.Module:
    """VGG-style CNN for 32x32 inputs: three blocks of two 3x3 conv + BN + ReLU, avg-pooled."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for mult in (1, 2, 4):
        for _ in range(2):
            layers += [nn.Conv2d(c_in, width * mult, 3, padding=1, bias=False),
                       nn.BatchNorm2d(width * mult), nn.ReLU()]
            c_in = width * mult
        layers.append(nn.AvgPool2d(2))
    side = input_size // 8
    layers += [nn.Flatten(), nn.Dropout(0.2), nn.Linear(c_in * side * side, 256), nn.ReLU(),
               nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register("vgg16_bn")
def vgg16_bn(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 64) -> nn.Module:
    """CIFAR-style VGG-16 with batch norm: 13 3x3 conv + BN + ReLU in five blocks, each ended by a
    2x2 max pool, then 512-wide fully connected + ReLU and the classifier. ``width`` (64) scales
    every layer (width 8: a small variant for tests). A pool that would take the side below 1 is
    left out (28x28 inputs: four pools, 28 -> 14 -> 7 -> 3 -> 1), so inputs of at least 16x16."""
    if input_size < 16:
        raise OptionError("model_args", f"input_size={input_size}: vgg16_bn needs inputs of at least 16x16")
    layers: list[nn.Module] = []
    c_in, side = in_channels, input_size
    for v in VGG16:
        if v == "M":
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        c_out = v * width // 64
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    hidden = 512 * width // 64
    layers += [nn.Flatten(), nn.Linear(c_in * side * side, hidden), nn.ReLU(), nn.Dropout(0.5),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Residual block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet of basic blocks for small images: a 3x3 stem, stages of ``blocks`` blocks at
    widths ``width`` x ``mults`` (stride 2 from the second stage on, 1x1 conv + batch-norm
    shortcuts), global average pooling; with ``maxpool`` the stem ends in a 2x2 max pool."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks: int = 1, maxpool: bool = False,
                 mults: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(2)] if maxpool else []))
        stages, c_in = [], width
        for i, mult in enumerate(mults):
            for b in range(blocks):
                stages.append(BasicBlock(c_in, width * mult, stride=2 if (i > 0 and b == 0) else 1))
                c_in = width * mult
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@register("resnet_small")
def resnet_small(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 16,
                 blocks: int = 1, maxpool: bool = False) -> nn.Module:
    return ResNetSmall(in_channels, num_classes, width, blocks, maxpool)


@register("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 64) -> nn.Module:
    """CIFAR-style ResNet-18: 3x3 stem, four stages of two basic blocks at 64-128-256-512
    channels (``width`` scales them; 8: a small variant for tests), global average pooling."""
    return ResNetSmall(in_channels, num_classes, width, blocks=2, mults=(1, 2, 4, 8))


def stored_reference(stored: str, given: str | None, trust_code: bool, path: str, what: str) -> str:
    """The architecture a data file (profile, artifact) names, once it is safe to build. A zoo
    name (or ``pt2``, an archive's own graph) is looked up in the registry; a
    ``package.module:callable`` stored in a file would import and call code, so it is used only
    when the user names the same reference (``given``) or trusts the file's code (``trust_code``)."""
    if given is not None and given != stored:
        raise OptionError("model_ref", f"{given}: the {what} {path} was made for {stored!r}")
    if stored in _REGISTRY or stored == "pt2" or given == stored or trust_code:
        return stored
    raise UserError(f"{path}: the {what} names the model code {stored!r}, which ann2snn imports and runs only "
                    f"when you ask for it: add {{{{model_ref}}}} {stored} if you trust that code (or {{{{trust_code}}}})")


def resolve_model(ref: str, kwargs: dict | None = None) -> nn.Module:
    """Build a model from a zoo name or ``package.module:callable``.

    Zoo models receive ``kwargs`` (image geometry and any user arguments); a user callable
    receives only the user's own arguments, which ``kwargs['user']`` holds.
    """
    kwargs = dict(kwargs or {})
    if ref in _REGISTRY:
        user = kwargs.pop("user", {})
        try:
            return _REGISTRY[ref](**{**kwargs, **user})  # the user's arguments over the data's geometry
        except Exception as exc:  # a bad argument: wrong name, negative size, too large to allocate
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise OptionError("model_ref", f"{ref}: bad model argument ({type(exc).__name__}: {first})") from None
    if ":" not in ref:
        raise OptionError("model", f"{ref!r}: not a zoo model ({', '.join(list_models())}) "
                        "nor 'package.module:callable'")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's module, not ours
        raise OptionError("model", f"{ref}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise OptionError("model", f"{ref}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise OptionError("model", f"{ref}: {attr!r} is not callable")
    try:
        model = fn(**kwargs.get("user", {}))
    except Exception as exc:
        raise OptionError("model", f"{ref}: calling {attr}() failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise OptionError("model", f"{ref}: {attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def model_kwargs(ref: str, sample_shape: tuple[int, ...], num_classes: int, user: dict | None = None) -> dict:
    """Constructor arguments: a zoo model gets the data's geometry (which ``user`` arguments,
    e.g. num_classes, override), a user callable only ``user``."""
    kwargs: dict = {"user": dict(user or {})}
    if ref in _REGISTRY:
        if len(sample_shape) == 1:  # vectors: features as channels
            sample_shape = (sample_shape[0], 1, 1)
        if len(sample_shape) == 3 and sample_shape[1] != sample_shape[2]:
            raise OptionError("model", f"{ref}: zoo models take square images, the data is {sample_shape}")
        kwargs.update(in_channels=int(sample_shape[0]), num_classes=int(num_classes),
                      input_size=int(sample_shape[-1]))
    return kwargs
