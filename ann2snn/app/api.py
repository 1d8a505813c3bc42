"""The Python API: the CLI's three steps on in-memory objects - the pipeline's own core
(``pipeline.calibrate_model``, ``pipeline.convert_model``), which the CLI's file-based steps call too.

    import ann2snn
    profile = ann2snn.calibrate(model, (x_train, y_train), neuron="asn")   # a Profile
    snn = ann2snn.convert(model, profile)          # a SpikingNetwork (an nn.Module)
    report = ann2snn.evaluate(snn, test_loader, timesteps=200)
    report.accuracy, report.spikes_per_sample, report.to_json()
    ann2snn.save(snn, "net.snn.safetensors"); snn = ann2snn.load("net.snn.safetensors", model)

Data may be a ``DataLoader``, a ``Dataset`` or an ``(inputs, targets)`` pair of tensors
(``data.as_tensor_data``), already normalised as the model expects.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ann2snn import neurons
from ann2snn.app import pipeline
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.store.artifact import Artifact, load_artifact, save_artifact
from ann2snn.io.data import as_tensor_data
from ann2snn.errors import OptionError
from ann2snn.evaluation.evaluate import make_plan, run_plan
from ann2snn.io.files import check_outputs
from ann2snn.options import CalibrationOptions, RunOptions, default_of
from ann2snn.store.profile import Profile
from ann2snn.evaluation.report import Report, write_report
from ann2snn.sim.simulate import stateful_modules

IN_MEMORY = pipeline.IN_MEMORY
_CAL = partial(default_of, CalibrationOptions)  # the defaults of the options these keywords set
_RUN = partial(default_of, RunOptions)


class SpikingNetwork(nn.Module):
    """A converted network. Calling it on an input batch advances every neuron one time step
    (1 ms) and returns the output layer's value at that step; ``reset()`` clears the state
    before a new input. ``run(x, timesteps)`` returns the outputs of every step [T, batch, ...].
    ``meta`` says how it was made (``artifact.ArtifactMeta``), ``ann`` is the source network."""

    def __init__(self, artifact: Artifact):
        super().__init__()
        self.snn, self.ann = artifact.snn, artifact.ann
        self.meta, self.neuron = artifact.meta, artifact.neuron

    def reset(self) -> None:
        for m in stateful_modules(self.snn):
            m.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.snn(x)

    @torch.no_grad()
    def run(self, x: torch.Tensor, timesteps: int) -> torch.Tensor:
        self.reset()
        return torch.stack([self(x) for _ in range(timesteps)])

    @property
    def artifact(self) -> Artifact:
        return Artifact(self.ann, self.snn, self.meta, self.neuron)


@contextlib.contextmanager
def _as_given(model: nn.Module):
    """The model in eval mode for the block, its own mode restored after; refused off the CPU
    (ann2snn copies what it needs and runs it on ``device``)."""
    where = {str(t.device) for t in [*model.parameters(), *model.buffers()]}
    if where - {"cpu"}:
        raise OptionError("model", f": its tensors are on {', '.join(sorted(where))}; pass it on the CPU "
                                   "(device= chooses where ann2snn runs)")
    training = model.training
    try:
        yield model.eval()
    finally:
        model.train(training)


def calibrate(model: nn.Module, data, neuron: str = "if", *, budget: float | None = _CAL("budget"),
              timesteps: int | None = _CAL("timesteps"), options: dict | None = None, samples: int = _CAL("samples"),
              seed: int = _CAL("seed"), arousal: str | ArousalPolicy | bool | None = None,
              batch_size: int = _CAL("batch_size"), device: str = "auto",
              search_samples: int | None = _CAL("search_samples")) -> Profile:
    """Fit per-layer operating points on (a ``samples`` subset drawn with ``seed`` of) ``data``,
    as ``ann2snn calibrate`` does: ``options`` are the neuron's (``--param``; without a
    ``percentile``, the neuron's own), ``budget`` and ``timesteps`` search its precision,
    ``arousal`` (True, or a policy or its text) stores a policy; that search, or the
    operating-point choice, simulates ``search_samples`` of the subset, drawn at random
    (``CalibrationOptions``, whose defaults these are). Returns the ``Profile``
    (``profile.save_profile`` writes it). A DataLoader is read whole, in its own order, before the
    subset is drawn: a shuffling one gives another subset each call. The model stays as given
    (its mode is restored; it must be on the CPU)."""
    kind = neurons.get(neuron)
    choice = CalibrationOptions(samples=samples, seed=seed, batch_size=batch_size, budget=budget, timesteps=timesteps,
                                search_samples=search_samples)
    request = pipeline.calibration_request(kind, options, _policy(arousal), choice)
    tensors = as_tensor_data(data, "data")
    with _as_given(model):
        return pipeline.calibrate_model(model, tensors, request, device=device)[0]


def convert(model: nn.Module, profile: Profile, *, maxpool: str = pipeline.DEFAULT_MAXPOOL) -> SpikingNetwork:
    """Swap the model's ReLUs for the profile's neurons (``ann2snn convert``); ``maxpool`` is one
    of ``graph.MAXPOOL_MODES``."""
    pipeline.check_maxpool(maxpool)
    with _as_given(model):
        artifact, _ = pipeline.convert_model(model, profile, maxpool=maxpool)
    return SpikingNetwork(artifact)


def _policy(arousal: str | ArousalPolicy | bool | None) -> str | ArousalPolicy | None:
    """The API's ``arousal`` as the pipeline takes it: True for the defaults (''), False for none."""
    return "" if arousal is True else None if arousal is False else arousal


def evaluate(snn: SpikingNetwork, data, timesteps: int, *, arousal: str | ArousalPolicy | bool = False,
             sweep: list[dict] | None = None, compare: list[str] | None = None,
             start_ms: int | None = _RUN("start_ms"), preset: str = _RUN("preset"),
             batch_size: int = _RUN("batch_size"), device: str = "auto",
             report_dir: str | Path | None = None, plot_format: str = "png") -> Report:
    """Simulate ``snn`` on ``data`` for ``timesteps`` steps and return the ``Report`` that
    ``ann2snn evaluate`` writes (written too, given ``report_dir``). ``arousal``: True for the
    stored policy or the defaults, or a policy (or its text) over them."""
    tensors = as_tensor_data(data, "data")
    run = RunOptions(timesteps=timesteps, batch_size=batch_size, preset=preset, start_ms=start_ms)
    if report_dir is not None:
        from ann2snn.evaluation.report import report_outputs

        check_outputs(report_outputs(report_dir, plot_format), [], [("report folder", report_dir)])
    report = run_plan(make_plan(snn.artifact, tensors, run, device, sweep or [], compare or [], _policy(arousal)))
    if report_dir is not None:
        write_report(report, report_dir, plot_format)
    return report


def save(snn: SpikingNetwork, path: str | Path) -> None:
    """Write ``snn`` as an SNN artifact (``.snn.safetensors``, as ``ann2snn convert`` writes)."""
    check_outputs([("SNN artifact", path)], [])
    save_artifact(path, snn.snn, snn.meta)


def load(path: str | Path, model: nn.Module | None = None, *, trust_code: bool = False) -> SpikingNetwork:
    """Read an SNN artifact. ``model``: an instance of the architecture (its weights are replaced
    by the artifact's); without it, a zoo architecture is rebuilt by name, and model code the
    file names is imported only with ``trust_code``."""
    return SpikingNetwork(load_artifact(path, trust_code=trust_code, model=model))
