"""Reading ANN weights: ``.safetensors`` or a ``.pt``/``.pth`` state dict loaded without pickle code."""

from __future__ import annotations

import hashlib

import io
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from ann2snn.errors import UserError
from ann2snn.io.files import file_sha256, read_input, tensor_problem  # noqa: F401  (file_sha256: re-exported)
from ann2snn.io.export_archive import EXPORT_REF, read_export
from ann2snn.io.zoo import resolve_model

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def read_state_dict(path: str | Path, trust_pickle: bool = False, what: str = "checkpoint"
                    ) -> dict[str, torch.Tensor]:
    """Load a state dict. ``.pt`` files go through ``torch.load(weights_only=True)`` unless the
    user trusts the file; common wrappers ({'state_dict': ...}, {'model': ...}) are unwrapped."""
    path = Path(path)
    data = read_input(path, what)
    if path.suffix == ".safetensors":
        try:
            state = load(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"{path}: not a readable .safetensors file ({exc})") from None
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error says enough
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"it would import {found.group(1)}" if found else "it holds Python objects, not only tensors"
            raise UserError(f"{path}: refused to unpickle ({what}); pass {{{{trust_pickle}}}} only if you "
                            "trust this file") from None
        except Exception as exc:
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict):
            for key in _WRAPPER_KEYS:
                if key in state and isinstance(state[key], dict):
                    state = state[key]
                    break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Load ``path`` into ``model`` strictly (``load_state``)."""
    return load_state(model, read_state_dict(path, trust_pickle), path)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    """Load a state dict (read from ``path``) into ``model`` strictly: every key present, every
    shape equal, all finite."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"{path}: weights do not match the model ({'; '.join(parts)})")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                            f"the model expects {tuple(value.shape)}")
        problem = tensor_problem(state[key])
        if problem:
            raise UserError(f"{path}: tensor {key!r} {problem}")
    model.load_state_dict(state)
    return model.eval()


def load_model(ref: str, kwargs: dict, path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Build the architecture ``ref`` (zoo name or ``module:callable``) and load its weights;
    a ``torch.export`` archive (``ref`` 'pt2') carries both."""
    if ref == EXPORT_REF:
        return read_export(path)
    return load_weights(resolve_model(ref, kwargs), path, trust_pickle)


def state_sha256(model: nn.Module) -> str:
    """A checksum of a model's weights and buffers (names, shapes, types and values), the same
    whichever file or process they came from."""
    digest = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        digest.update(f"{key}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
