"""Helpers for running the peers' converters on our checkpoints in the benches (never imported
by the package)."""

from __future__ import annotations

import copy

from torch import fx, nn

from ann2snn.conversion.graph import Slot


def for_spikingjelly(ann: fx.GraphModule) -> fx.GraphModule:
    """A copy of a normalised ANN (``Artifact.ann``: the checkpoint's function, batch norm
    folded) whose ReLU slots are plain ``nn.ReLU`` modules, which SpikingJelly's
    RateCodingRecipe replaces with IF nodes (it traces into our ``Slot`` subclass and refuses
    the functional relu it finds there). Residual sums stay ``operator.add``, which it passes."""
    gm = copy.deepcopy(ann)
    for name, module in list(gm.named_modules()):
        if type(module) is Slot:
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, nn.ReLU())
    gm.recompile()
    return gm.eval()
