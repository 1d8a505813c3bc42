import math

import numpy as np
import torch

from ann2snn.conversion import statistics as cal
from ann2snn.conversion.graph import normalize
from ann2snn.io.data import TensorData

from conftest import tiny_cnn


def _exact(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q, method="inverted_cdf"))  # nearest rank


def _stream(batches, q):
    eq = cal.ExactQuantile(q)
    passes = 0
    while not eq.done:
        for b in batches:
            eq.update(b)
        eq.end_pass(passes)
        passes += 1
    return eq.value, passes


def test_exact_quantile_matches_nearest_rank():
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(200_000, generator=gen)) * torch.rand(200_000, generator=gen) * 7
    for q in (50.0, 99.0, 99.9, 99.99, 100.0):
        value, passes = _stream(list(x.split(4096)), q)
        assert value == _exact(x.numpy(), q), q
        assert passes <= 4


def test_exact_quantile_independent_of_batching_and_order():
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(50_000, generator=gen)) ** 3
    a, _ = _stream(list(x.split(1000)), 99.9)
    b, _ = _stream(list(x[torch.randperm(len(x), generator=gen)].split(777)), 99.9)
    assert a == b == _exact(x.numpy(), 99.9)


def test_quantile_in_heavy_tie_and_all_zero_cases():
    ties = torch.cat([torch.zeros(1000), torch.full((3000,), 2.5), torch.tensor([9.0])])
    assert _stream([ties], 99.9)[0] == 2.5
    assert _stream([torch.zeros(500)], 99.9)[0] == 0.0


def test_activation_stats_exact_and_batch_size_independent():
    gm, _ = normalize(tiny_cnn())
    x = torch.rand(37, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    data = TensorData("t", "file", x, torch.zeros(37, dtype=torch.long), 3)
    s_small = cal.activation_stats(gm, data, 99.9, batch_size=5)
    s_big = cal.activation_stats(gm, data, 99.9, batch_size=64)
    acts = {}
    hooks = [gm.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
             for n in s_small]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    for name, s in s_small.items():
        ref = acts[name].flatten().numpy()
        assert math.isclose(s.percentile, _exact(ref, 99.9), rel_tol=1e-5)
        assert math.isclose(s.percentile, s_big[name].percentile, rel_tol=1e-5)
        assert math.isclose(s.max, float(ref.max()), rel_tol=1e-5)
        assert s.neurons == acts[name][0].numel()


def test_output_error_ignores_gain_follows_batches_and_survives_a_retry():
    from ann2snn.search.budget import OutputError

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    obs = OutputError(ref, timesteps=4)
    for start, n in ((0, 6), (0, 3), (3, 3), (6, 4)):  # the first batch "runs out of memory", then halves
        obs.reset(n, torch.device("cpu"))
        for t in range(4 if (start, n) != (0, 6) else 2):
            obs(t, (2.5 * ref[start:start + n]).float())
    assert obs.done == 10 and abs(obs.relative()) < 1e-6  # a scaled copy of the ANN's outputs: no error

    noisy = OutputError(ref, timesteps=1)
    noise = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    noisy.reset(10, torch.device("cpu"))
    noisy(0, ref + noise)
    a = float((ref + noise).flatten() @ ref.flatten()) / float(((ref + noise) ** 2).sum())
    expected = float(((a * (ref + noise) - ref) ** 2).sum()) / float(((ref - ref.mean(0)) ** 2).sum())
    assert abs(noisy.relative() - expected) < 1e-9 and expected > 0.05
