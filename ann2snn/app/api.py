"""The Python API: the CLI's three steps on in-memory objects, with the same code underneath.

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
from pathlib import Path

import torch
from torch import nn

from ann2snn import neurons
from ann2snn.app import pipeline
from ann2snn.neurons.arousal_policy import ArousalPolicy
from ann2snn.sim.arousal import check_class_scores
from ann2snn.store.artifact import Artifact, ArtifactMeta, build_neurons, load_artifact, save_artifact
from ann2snn.io.checkpoint import state_sha256
from ann2snn.conversion.checks import model_outputs
from ann2snn.conversion.graph import MAXPOOL_MODES, graph_signature, spiking_layers, to_snn
from ann2snn.io.data import as_tensor_data, calibration_subset
from ann2snn.sim.energy import DEFAULT_PRESET
from ann2snn.conversion.equivalence import verify
from ann2snn.errors import OptionError, UserError
from ann2snn.evaluation.evaluate import make_plan, run_plan
from ann2snn.io.files import check_outputs
from ann2snn.options import CalibrationOptions, RunOptions
from ann2snn.store.profile import ModelInfo, Profile, check_profile
from ann2snn.evaluation.report import Report, write_report
from ann2snn.sim.simulate import resolve_device, stateful_modules

IN_MEMORY = "(in memory)"


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


def _model_info(model: nn.Module) -> ModelInfo:
    cls = type(model)
    digest = state_sha256(model)
    return ModelInfo(ref=f"{cls.__module__}:{cls.__qualname__}", kwargs={"user": {}}, checkpoint=IN_MEMORY,
                     checkpoint_sha256=digest, weights_sha256=digest)


def calibrate(model: nn.Module, data, neuron: str = "if", *, budget: float | None = None,
              timesteps: int | None = None, options: dict | None = None, samples: int = 2000, seed: int = 0,
              arousal: str | ArousalPolicy | bool | None = None, batch_size: int = 256,
              device: str = "auto", search_samples: int | None = None) -> Profile:
    """Fit per-layer operating points on (a ``samples`` subset drawn with ``seed`` of) ``data``,
    as ``ann2snn calibrate`` does: ``options`` are the neuron's (``--param``), ``budget`` and
    ``timesteps`` search its precision, ``arousal`` (True, or a policy or its text) stores a
    policy; that search, or the operating-point choice, simulates ``search_samples`` of the subset,
    drawn at random (``CalibrationOptions``). Returns the ``Profile`` (``profile.save_profile`` writes
    it). A DataLoader is read whole, in its own order, before the subset is drawn: a shuffling one
    gives another subset each call. The model stays as given (its mode is restored; it must be on the CPU)."""
    kind = neurons.get(neuron)
    choice = CalibrationOptions(samples=samples, seed=seed, batch_size=batch_size, budget=budget, timesteps=timesteps,
                                search_samples=search_samples)
    opts, policy, choose = pipeline.calibration_request(
        kind, options, "" if arousal is True else None if arousal is False else arousal, choice)
    tensors = as_tensor_data(data, "data")
    subset = calibration_subset(tensors, samples, seed) if len(tensors) > samples else tensors
    with _as_given(model):
        gm, _ = pipeline.normalize_for(model, type(model).__name__, kind)
        outputs = model_outputs(gm, subset.sample_shape, "data")
        verify(model, gm, next(subset.batches(batch_size))[0])
        info = _model_info(model)
    if policy is not None:
        policy.check_layers(spiking_layers(gm))
        check_class_scores("data", subset.task, outputs)
    return pipeline.fit_profile(gm, kind, opts, subset, info, IN_MEMORY, choice, resolve_device(device), policy,
                                choose=choose)


def convert(model: nn.Module, profile: Profile, *, maxpool: str = "gated") -> SpikingNetwork:
    """Swap the model's ReLUs for the profile's neurons (``ann2snn convert``); ``maxpool`` is one
    of ``graph.MAXPOOL_MODES``."""
    if maxpool not in MAXPOOL_MODES:
        raise OptionError("maxpool", f"{maxpool!r}: expected one of {', '.join(MAXPOOL_MODES)}")
    kind = neurons.get(profile.neuron.type)
    with _as_given(model):
        gm, _ = pipeline.normalize_for(model, type(model).__name__, kind)
        digest = state_sha256(model)
        verify(model, gm, torch.randn((4, *profile.input.shape), generator=torch.Generator().manual_seed(0)))
    check_profile(profile, gm, "profile", digest)
    try:
        snn = to_snn(gm, build_neurons(kind, profile.layers, "profile"), maxpool, profile.bias_ramps)
    except UserError as exc:
        raise exc.within("profile: ") from None
    meta = ArtifactMeta(model=profile.model, graph=graph_signature(gm), input=profile.input, neuron=profile.neuron,
                        layers=profile.layers, calibration=profile.data, maxpool=maxpool, arousal=profile.arousal,
                        bias_ramps=profile.bias_ramps)
    return SpikingNetwork(Artifact(gm.eval(), snn.eval(), meta, kind))


def evaluate(snn: SpikingNetwork, data, timesteps: int, *, arousal: str | ArousalPolicy | bool = False,
             sweep: list[dict] | None = None, compare: list[str] | None = None, start_ms: int | None = None,
             preset: str = DEFAULT_PRESET, batch_size: int = 256, device: str = "auto",
             report_dir: str | Path | None = None, plot_format: str = "png") -> Report:
    """Simulate ``snn`` on ``data`` for ``timesteps`` steps and return the ``Report`` that
    ``ann2snn evaluate`` writes (written too, given ``report_dir``). ``arousal``: True for the
    stored policy or the defaults, or a policy (or its text) over them."""
    tensors = as_tensor_data(data, "data")
    run = RunOptions(timesteps=timesteps, batch_size=batch_size, preset=preset, start_ms=start_ms)
    if report_dir is not None:
        from ann2snn.evaluation.report import report_outputs

        check_outputs(report_outputs(report_dir, plot_format), [], [("report folder", report_dir)])
    policy = "" if arousal is True else None if arousal is False else arousal
    report = run_plan(make_plan(snn.artifact, tensors, run, device, sweep or [], compare or [], policy))
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
