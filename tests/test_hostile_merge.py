"""Hostile inputs found by a later run: resealed partial reports, real-valued targets for a
classifier, a FIFO in an image folder, and normalisation or samples that overflow float32."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from test_distributed import _resealed, asn_artifact  # noqa: F401  (a fixture)
from test_hostile import MODEL, TESTS, _image_folder, _one_line_error, flow  # noqa: F401  (a fixture)


def test_merge_refuses_resealed_transfer_and_ann_answers_and_checks_the_artifact_first(
        run_cli, tiny_files, asn_artifact, monkeypatch):  # noqa: F811
    from ann2snn.evaluation import evaluate

    d = tiny_files["dir"]
    for i in range(2):
        assert run_cli("evaluate", asn_artifact, *MODEL, "-d", tiny_files["data"], "-T", 8, "--device", "cpu",
                       "--shard", f"{i}/2", "-r", d / f"p{i}")[0] == 0
    parts = [d / "p0" / "partial.json", d / "p1" / "partial.json"]
    assert json.loads(parts[0].read_text())["sums"]["transfer"] is not None  # an ASN artifact has one

    def forged(part, edit, name):  # resealed, as someone who recomputes the checksum can
        raw = json.loads(part.read_text())
        edit(raw)
        (d / name).write_text(json.dumps(_resealed(raw)))
        return d / name

    def flipped(raw):  # one right answer of the ANN made wrong, the totals made to add up
        raw["sums"]["ann_final"][0], raw["sums"]["ann"] = 0.0, raw["sums"]["ann"] - 1

    def elsewhere(raw):  # a wrong artifact, and a data set that is a big folder
        raw.update(dataset="folder:/usr", artifact_sha256="0" * 64)

    for i, (edit, match) in enumerate([(lambda r: r["sums"].update(transfer=1e6), "inconsistent"),
                                       (lambda r: r["sums"].update(transfer=-50.0), "inconsistent"),
                                       (lambda r: r["sums"].update(transfer=None), "inconsistent"),
                                       (flipped, "the ANN's answers in this partial report are not the artifact's")]):
        _one_line_error(run_cli("merge", forged(parts[0], edit, f"f{i}.json"), parts[1], *MODEL, "-r", d / f"m{i}"),
                        match, absent=[d / f"m{i}"])

    walked = []
    monkeypatch.setattr(evaluate, "data_files", lambda *a: walked.append(a) or [])
    foreign = [forged(p, elsewhere, f"w{i}.json") for i, p in enumerate(parts)]
    _one_line_error(run_cli("merge", *foreign, *MODEL, "-r", d / "mw"), "the artifact changed", absent=[d / "mw"])
    assert not walked
    assert run_cli("merge", *parts, *MODEL, "-r", d / "ok", "--device", "cpu")[0] == 0  # the real ones still merge


def test_real_valued_targets_for_a_classifier_are_refused(run_cli, flow):  # noqa: F811
    from safetensors.torch import load_file

    data = load_file(str(flow["data"]))
    real = flow["dir"] / "real.safetensors"
    save_file({"inputs": data["inputs"], "targets": data["targets"].float()}, str(real))
    _one_line_error(run_cli("evaluate", flow["snn"], *MODEL, "-d", real, "-T", 4, "-r", flow["dir"] / "rep"),
                    f"--dataset {real}: has real-valued targets (regression) but the network has 3 outputs; "
                    "give class indices", absent=[flow["dir"] / "rep" / "report.json"])


def test_a_fifo_in_an_image_folder_is_one_line_or_skipped(tmp_path):
    from ann2snn.io.zoo import resolve_model

    folder = _image_folder(tmp_path / "imgs")
    for bad in ("a/trunc.png", "b/text.png", "b/2.png"):
        (folder / bad).unlink()
    os.mkfifo(folder / "b" / "2.png")  # a FIFO in place of an image: reading it would wait forever
    torch.manual_seed(0)
    model = resolve_model("mlp", {"in_channels": 3, "num_classes": 3, "input_size": 8, "user": {"hidden": 16}})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "ann2snn", "calibrate", tmp_path / "m.safetensors", "-m", "mlp",
                               "--model-arg", "hidden=16", "-d", f"folder:{folder}", "-o", tmp_path / "p.json",
                               *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        return done.returncode, done.stdout, done.stderr

    line = _one_line_error(cli(), f"{folder / 'b' / '2.png'}: cannot read this image (not a regular file)",
                           absent=[tmp_path / "p.json"])
    assert "--skip-bad-images" in line
    code, _, err = cli("--skip-bad-images")
    assert code == 0 and "skipped 1 unreadable image" in err, err


def test_normalisation_and_samples_beyond_float32_are_refused(run_cli, flow, tmp_path):  # noqa: F811
    from ann2snn.errors import OptionError
    from ann2snn.io.data import Normalize, as_tensor_data, open_dataset

    for mean, std, bad in (([9e29], [2e-30], "mean 9e+29"), ([0.5], [2e-30], "std 2e-30"),
                           ([0.5], [1e5], "std 100000.0"), ([-2e4], [1.0], "mean -20000.0")):
        with pytest.raises(ValueError, match=re.escape(f"not {bad}") + "$"):
            Normalize(mean, std)
    Normalize([1e4, -0.5], [1e-6, 1e4])  # the bounds themselves are fine
    base = ("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", tmp_path / "o.json")
    _one_line_error(run_cli(*base, "--normalize", "9e29;2e-30"), "not mean 9e+29", absent=[tmp_path / "o.json"])
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    x[2, 0, 0, 0] = 1e300  # finite in float64, infinite in float32
    save_file({"inputs": x, "targets": torch.zeros(4, dtype=torch.long)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(OptionError, match="'inputs' holds NaN or infinite values"):
        open_dataset(str(tmp_path / "big.safetensors"))
    save_file({"inputs": x.clamp(max=1), "targets": torch.tensor([0.0, 1.0, 1e300, 2.0], dtype=torch.float64)},
              str(tmp_path / "bigy.safetensors"))
    with pytest.raises(OptionError, match="'targets' holds NaN or infinite values"):
        open_dataset(str(tmp_path / "bigy.safetensors"))
    for inputs, targets, key in ((torch.ones(3, 2, dtype=torch.complex64), torch.zeros(3, dtype=torch.long), "inputs"),
                                 (torch.ones(3, 2), torch.zeros(3, dtype=torch.complex128), "targets")):
        with pytest.raises(OptionError, match=f"'{key}' has type complex"):
            as_tensor_data((inputs, targets))
