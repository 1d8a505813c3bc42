"""The fused IF scan against ``if_step``, step by step: the PyTorch path here, the Triton kernel
through Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess, so no GPU is needed."""

import os
import subprocess
import sys

import pytest
import torch

from ann2snn.neurons.kernels import if_scan
from ann2snn.neurons.if_neuron import IFParams, if_init, if_step

SCRIPT = r"""
import torch
from ann2snn.neurons.kernels import _if_scan_triton, if_scan
torch.manual_seed(0)
for constant in (False, True):
    x = torch.rand(5 if constant else 7 * 5, 3, 4) * 0.9
    fan = torch.randint(0, 9, (12,)).float()
    v1, v2 = torch.full((5, 3, 4), 0.35), torch.full((5, 3, 4), 0.35)
    a, ca = if_scan(x, 7, 5, v1, 0.7, fan)
    b, cb = _if_scan_triton(x, 7, 5, v2, 0.7, fan)
    assert torch.equal(a, b) and torch.equal(ca, cb) and torch.equal(v1, v2), (constant, ca, cb)
print("ok")
"""


def _reference(x, steps, batch, threshold, fan):
    p = IFParams(torch.tensor(threshold), 0.5)
    state = if_init(x[:batch], p)
    outs, counts = [], []
    for t in range(steps):
        xt = x if x.shape[0] == batch else x[t * batch:(t + 1) * batch]
        s, state = if_step(xt, state, p)
        outs.append(s * p.threshold)
        per_unit = s.flatten(1).sum(0).double()
        counts.append([per_unit.sum(), (per_unit * fan.double()).sum()])
    return torch.cat(outs), torch.tensor(counts, dtype=torch.float64), state.v


@pytest.mark.parametrize("constant", [False, True])
def test_torch_scan_equals_if_step(constant):
    torch.manual_seed(1)
    steps, batch = 9, 4
    x = torch.rand(batch if constant else steps * batch, 2, 3) * 1.3 - 0.2
    fan = torch.randint(0, 5, (6,)).float()
    out, counts, v = _reference(x, steps, batch, 0.8, fan)
    v_scan = torch.full((batch, 2, 3), 0.5 * 0.8)
    got, got_counts = if_scan(x, steps, batch, v_scan, 0.8, fan)
    assert torch.equal(got, out) and torch.equal(got_counts, counts) and torch.equal(v_scan, v)
    assert counts[:, 0].sum() > 0


def test_triton_kernel_in_the_interpreter_equals_the_torch_scan():
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        pytest.skip("Triton 3.6's interpreter fails on this kernel (InterpreterError: 'only 0-dimensional arrays "
                    "can be converted to Python scalars'); the compiled kernel passes the CUDA test there")
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin",
           **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("constant", [False, True])
def test_triton_kernel_on_cuda_equals_the_torch_scan(constant):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(2)
    steps, batch = 11, 64
    x = torch.rand(batch if constant else steps * batch, 8, 9, 9) * 1.3 - 0.2
    fan = torch.randint(0, 9, (8 * 9 * 9,)).float()
    v_cpu, v_gpu = torch.full((batch, 8, 9, 9), 0.4), torch.full((batch, 8, 9, 9), 0.4, device="cuda")
    out, counts = if_scan(x, steps, batch, v_cpu, 0.8, fan)
    out_g, counts_g = if_scan(x.cuda(), steps, batch, v_gpu, 0.8, fan.cuda())  # the Triton kernel
    assert torch.equal(out, out_g.cpu()) and torch.equal(counts, counts_g.cpu()) and torch.equal(v_cpu, v_gpu.cpu())


@pytest.fixture
def compiling():
    """Neuron steps through torch.compile for the layers built inside the test, off again after."""
    from ann2snn.neurons import compiled
    compiled.enable(True)
    yield compiled
    compiled.enable(False)
    compiled._STATE["failed"] = None


def _tiny_simulation(neuron_name: str, params: dict):
    from conftest import tiny_labelled
    from ann2snn import neurons
    from ann2snn.conversion.statistics import activation_stats
    from ann2snn.search.budget import fitted_layers
    from ann2snn.sim.network import Fanouts, build_network

    gm, data = tiny_labelled(24, 5)
    neuron = neurons.get(neuron_name)
    options = neuron.options(params)
    layers = fitted_layers(activation_stats(gm, data, 99.9, 64, "cpu"), neuron, options)
    net = build_network(gm, neuron, layers, options, 40, Fanouts(gm, data.sample_shape))
    return net, net.simulate(data, 40, 8, torch.device("cpu"))


@pytest.mark.parametrize("neuron,params", [("asn", {"m_f": 0.1}), ("asn", {"m_f": 0.01, "theta0": 1.0,
                                                                            "onset_ms": 8.0, "scale": 8.0}),
                                           ("vsn", {}), ("if", {"per_channel": True, "max_spikes": 2}),
                                           ("if", {})])
def test_compiled_steps_equal_the_reference_step(compiling, neuron, params):
    """--compile runs each neuron's own functional step through torch.compile: the same spikes,
    operations and accuracy at every step, bit for bit (here, on the CPU's C++ backend)."""
    compiling.enable(False)
    ref_net, ref = _tiny_simulation(neuron, params)
    compiling.enable(True)
    net, fused = _tiny_simulation(neuron, params)
    reference = "fused" if neuron == "if" and not params else "reference"  # IF's default: a chunked scan either way
    assert set(net.backends.values()) == {"compiled"} and set(ref_net.backends.values()) == {reference}
    if compiling.status() is not None:
        pytest.skip(f"torch.compile does not work here: {compiling.status()}")
    assert torch.equal(fused.spikes, ref.spikes) and torch.equal(fused.synops, ref.synops)
    assert torch.equal(fused.metric, ref.metric) and ref.spikes.sum() > 0


def test_a_compiler_failure_falls_back_to_the_step_and_says_why(compiling, monkeypatch):
    def broken(fn):
        def fail(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail
    monkeypatch.setattr(compiling, "_compiled", broken)
    compiling.enable(False)
    _, ref = _tiny_simulation("asn", {"m_f": 0.1})
    compiling.enable(True)
    _, ran = _tiny_simulation("asn", {"m_f": 0.1})
    assert compiling.status() == "RuntimeError: no C++ compiler found" and not compiling.enabled()
    assert torch.equal(ran.spikes, ref.spikes)
