import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ann2snn.io.data import Normalize, calibration_subset, open_dataset
from ann2snn.errors import OptionError, UserError


def _write_idx(path, array: np.ndarray, magic: int):
    with open(path, "wb") as f:
        f.write(magic.to_bytes(4, "big"))
        for dim in array.shape:
            f.write(int(dim).to_bytes(4, "big"))
        f.write(array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, 2049)
    return tmp_path


def test_named_mnist_loads_from_the_torchvision_layout(fake_mnist):
    data = open_dataset("mnist", "test", fake_mnist)
    assert len(data) == 12 and data.sample_shape == (1, 28, 28) and data.num_classes == 10
    x, y = next(data.batches(5))
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_cifar_layout_is_read_channel_first(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), "labels": [0, 1, 2, 3]}
    pickle.dump(batch, open(folder / "test_batch", "wb"))
    pickle.dump({"label_names": [str(i) for i in range(10)]}, open(folder / "batches.meta", "wb"))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    data = open_dataset("cifar10", "test", tmp_path)
    assert data.sample_shape == (3, 32, 32)
    assert torch.equal(data.inputs[1, 2].flatten(), torch.from_numpy(batch["data"][1, 2048:]))


def test_missing_named_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="ann2snn fetch fashion-mnist"):
        open_dataset("fashion-mnist", "test", tmp_path)


def test_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((5, 5, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = open_dataset(f"folder:{tmp_path}")
    assert len(data) == 4 and data.sample_shape == (3, 5, 5) and data.targets.tolist() == [0, 0, 1, 1]


def test_tensor_file_and_its_errors(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"inputs": torch.rand(6, 2, 3), "targets": torch.tensor([0, 1, 2, 0, 1, 2])}, str(path))
    data = open_dataset(str(path))
    assert data.num_classes == 3 and data.sample_shape == (2, 3)
    save_file({"x": torch.rand(2)}, str(path))
    with pytest.raises(UserError, match="needs tensors 'inputs' and 'targets'"):
        open_dataset(str(path))


def test_calibration_subset_is_deterministic(fake_mnist):
    data = open_dataset("mnist", "train", fake_mnist)
    a, b = calibration_subset(data, 10, seed=3), calibration_subset(data, 10, seed=3)
    c = calibration_subset(data, 10, seed=4)
    assert torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)


def test_normalize_parse_and_apply():
    norm = Normalize.parse("0.5;0.25")
    assert torch.allclose(norm(torch.ones(1, 1, 2, 2)), torch.full((1, 1, 2, 2), 2.0))
    with pytest.raises(OptionError, match="^normalization"):
        Normalize.parse("0.5")


def test_feynman_sets_follow_their_equations_and_are_fixed():
    import math
    a = open_dataset("feynman-i.6.2a", "test")
    theta = a.inputs[:, 0].double()
    assert a.task == "regression" and a.sample_shape == (1,) and len(a) == 2000
    assert torch.allclose(a.targets.double(), torch.exp(-theta ** 2 / 2) / math.sqrt(2 * math.pi), rtol=1e-5)
    assert 1 <= theta.min() and theta.max() <= 3
    b = open_dataset("feynman-i.9.18", "train")
    m1, m2, g, x1, x2, y1, y2, z1, z2 = b.inputs.double().T
    f = g * m1 * m2 / ((x2 - x1) ** 2 + (y2 - y1) ** 2 + (z2 - z1) ** 2)
    assert b.sample_shape == (9,) and torch.allclose(b.targets.double(), f, rtol=1e-5)
    assert torch.equal(open_dataset("feynman-i.9.18", "train").inputs, b.inputs)
    assert not torch.equal(open_dataset("feynman-i.9.18", "test").inputs[:5], b.inputs[:5])


def test_float_targets_make_a_regression_tensor_file(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"inputs": torch.rand(8, 3), "targets": torch.rand(8)}, str(path))
    data = open_dataset(str(path))
    assert data.task == "regression"
    _, y = next(data.batches(4))
    assert y.dtype == torch.float32


def test_fetch_refuses_what_it_cannot_fetch_and_finds_what_is_there(run_cli, tmp_path):
    code, _, err = run_cli("fetch", "cifar10", "--data-dir", tmp_path)
    assert code == 2 and "fetch 'cifar10': can fetch mnist, fashion-mnist" in err
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"")
    code, out, err = run_cli("fetch", "mnist", "--data-dir", tmp_path)  # already there: nothing to run
    assert code == 0 and str(raw) in out


def test_fit_and_val_split_the_training_split_without_overlap():
    from ann2snn.io.data import VALIDATION_SHARE

    train = open_dataset("feynman-i.9.18", "train")
    fit, val = open_dataset("feynman-i.9.18", "fit"), open_dataset("feynman-i.9.18", "val")
    assert len(val) == len(train) // VALIDATION_SHARE and len(fit) + len(val) == len(train)
    assert torch.equal(torch.cat([fit.inputs, val.inputs]), train.inputs)  # fit first, val the tail
    assert (fit.split, val.split) == ("fit", "val")
    with pytest.raises(UserError, match="expected one of train, test, fit, val"):
        open_dataset("feynman-i.9.18", "validation")
