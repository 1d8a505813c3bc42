import csv
import json
import subprocess
import sys

from conftest import tiny_cnn  # noqa: F401  (the CLI imports it as conftest:tiny_cnn)


def _pipeline(run_cli, f, neuron_args=()):
    d = f["dir"]
    code, out, err = run_cli("calibrate", f["checkpoint"], "--model", "conftest:tiny_cnn", "--dataset", f["data"],
                             "--samples", 40, "-o", d / "p.json", *neuron_args)
    assert code == 0, err
    code, out, err = run_cli("convert", "--trust-code", f["checkpoint"], "-c", d / "p.json", "-o", d / "snn.safetensors")
    assert code == 0, err
    assert "converted" in out and "folded into conv" in out
    return d / "snn.safetensors"


def test_calibrate_convert_evaluate_on_a_user_model(run_cli, tiny_files):
    snn = _pipeline(run_cli, tiny_files)
    rep = tiny_files["dir"] / "rep"
    code, out, err = run_cli("evaluate", "--trust-code", snn, "-d", tiny_files["data"], "-T", 48, "-r", rep, "--device", "cpu")
    assert code == 0, err
    report = json.loads((rep / "report.json").read_text())
    for key in ("dataset", "neuron", "timesteps", "device", "ann", "snn", "layers", "curve", "energy"):
        assert key in report
    assert report["ann"]["accuracy"] == 1.0  # labels are the ANN's own predictions
    assert report["snn"]["accuracy"] >= 0.85
    assert len(report["curve"]) == 48 and report["curve"][-1]["timestep"] == 48
    layer_total = sum(layer["spikes_per_sample"] for layer in report["layers"])
    assert abs(layer_total - report["snn"]["spikes_per_sample"]) < 1e-6
    assert abs(report["curve"][-1]["spikes_per_sample"] - layer_total) < 1e-6
    rows = list(csv.DictReader(open(rep / "curve.csv")))
    assert len(rows) == 48 and float(rows[-1]["accuracy"]) == report["snn"]["accuracy"]
    assert (rep / "accuracy_vs_spikes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "IF SNN" in out


def test_same_command_gives_the_same_report(run_cli, tiny_files):
    snn = _pipeline(run_cli, tiny_files)
    reports = []
    for name in ("a", "b"):
        code, _, err = run_cli("evaluate", "--trust-code", snn, "-d", tiny_files["data"], "-T", 8, "-r", tiny_files["dir"] / name,
                               "--device", "cpu", "--batch-size", 7 if name == "a" else 60)
        assert code == 0, err
        report = json.loads((tiny_files["dir"] / name / "report.json").read_text())
        report.pop("timing")
        command = report["provenance"].pop("command")  # names its own report folder and batch size
        assert command.startswith("ann2snn evaluate") and "--batch-size" in command
        reports.append(report)
    assert reports[0] == reports[1]
    p = reports[0]["provenance"]
    assert reports[0]["format"] == "ann2snn-report" and p["torch"] and len(p["artifact_sha256"]) == 64


def test_info_and_help(run_cli, tiny_files):
    snn = _pipeline(run_cli, tiny_files)
    code, out, _ = run_cli("info", snn)
    assert code == 0 and "conftest:tiny_cnn" in out and "ann2snn 0.1.0" in out
    for cmd in ("calibrate", "convert", "evaluate", "demo", "info"):
        code, out, _ = run_cli(cmd, "--help")
        assert code == 0 and "Example: ann2snn" in out


def test_console_script_module_entry():
    done = subprocess.run([sys.executable, "-m", "ann2snn", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ann2snn 0.1.0"


def test_demo_runs_offline(run_cli, tmp_path):
    code, out, err = run_cli("demo", "--out", tmp_path, "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["dataset"]["samples"] == 1000 and report["ann"]["accuracy"] > 0.97
    assert report["snn"]["accuracy"] > 0.9
    assert [v["neuron"] for v in report["variants"]] == ["asn", "vsn", "ttfs"]  # side by side, one table
    assert "SNN TTFS" in out and "answer complete at step 128" in out
    code, _, err = run_cli("demo", "--out", tmp_path / "short", "-T", 16, "--device", "cpu")
    assert code != 0 and "-T 128" in err and "Traceback" not in err and not (tmp_path / "short").exists()


def test_asn_budget_search_sweep_compare_and_finetune(run_cli, tiny_files):
    d = tiny_files["dir"]
    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--neuron", "asn", "--samples", 40, "--budget", 3000, "-T", 30, "-o", d / "asn.json")
    assert code == 0, err
    profile = json.loads((d / "asn.json").read_text())
    search = profile["budget_search"]
    assert len(search["candidates"]) >= 5 and "<- chosen" in out
    spikes = [c["spikes_per_sample"] for c in search["candidates"]]
    assert spikes == sorted(spikes, reverse=True)  # higher m_f, fewer spikes
    if search["budget_met"]:
        assert search["chosen"]["spikes_per_sample"] <= 3000
    assert profile["neuron"]["options"]["m_f"] == search["chosen"]["m_f"]
    assert all(layer["params"]["scale"] > 0 for layer in profile["layers"])

    code, _, err = run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "asn.json", "-o", d / "asn.snn.safetensors")
    assert code == 0, err
    code, out, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 40, "-r", d / "rep",
                             "--sweep", "m_f=0.2,0.45", "--compare", "if", "--start-ms", 10)
    assert code == 0, err
    report = json.loads((d / "rep" / "report.json").read_text())
    assert report["neuron"] == "asn" and "filtered" not in report["readout"] and "steps 11..t" in report["readout"]
    labels = [v["label"] for v in report["variants"]]
    assert labels == ["ASN m_f=0.2", "ASN m_f=0.45", "IF"]
    by_label = {v["label"]: v["snn"]["spikes_per_sample"] for v in report["variants"]}
    assert by_label["ASN m_f=0.45"] < by_label["ASN m_f=0.2"]
    assert "SNN IF" in out

    for bad, message in ((("--spike-penalty", 1), "counts no spikes"), (("--spike-penalty", -1), "must be >= 0"),
                         (("--threshold-lr", 0), "--threshold-lr 0.0: must be positive")):
        code, _, err = run_cli("finetune", "--trust-code", tiny_files["checkpoint"], "-c", d / "asn.json", "-d", tiny_files["data"],
                               "--epochs", 1, "-o", d / "bad.safetensors", "--device", "cpu", *bad)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (d / "bad.safetensors").exists() and not (d / "bad.calib.json").exists()
    code, out, err = run_cli("finetune", "--trust-code", tiny_files["checkpoint"], "-c", d / "asn.json", "-d", tiny_files["data"],
                             "--epochs", 1, "-o", d / "ft.safetensors", "--device", "cpu")
    assert code == 0, err
    # a tensor file has no held-out split: the epochs are scored on the training data, and said to be
    assert "epoch 1/1: training data (the file has no held-out split) accuracy" in out and " test " not in out
    from safetensors.torch import load_file
    before, after = load_file(str(tiny_files["checkpoint"])), load_file(str(d / "ft.safetensors"))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before if before[k].is_floating_point())
    # its profile: the scales it was trained with, statistics of the new weights, the new checkpoint's hash
    tuned = json.loads((d / "ft.calib.json").read_text())
    assert [la["params"] for la in tuned["layers"]] == [la["params"] for la in profile["layers"]]
    assert [la["stats"] for la in tuned["layers"]] != [la["stats"] for la in profile["layers"]]
    assert tuned["finetune"]["from_checkpoint"] == tiny_files["checkpoint"].name
    code, _, err = run_cli("convert", "--trust-code", d / "ft.safetensors", "-c", d / "ft.calib.json", "-o", d / "ft.snn.safetensors")
    assert code == 0, err
    code, _, err = run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "ft.calib.json", "-o", d / "x.safetensors")
    assert code == 2 and "made for other weights" in err


def test_outputs_get_the_usual_permissions(run_cli, tiny_files):
    import os
    snn = _pipeline(run_cli, tiny_files)
    umask = os.umask(0)
    os.umask(umask)
    assert (snn.stat().st_mode & 0o777) == 0o666 & ~umask


def test_regression_pipeline_reports_nmse(run_cli, tmp_path):
    import torch
    from safetensors.torch import save_file
    from ann2snn.io.zoo import resolve_model

    torch.manual_seed(0)
    model = resolve_model("regression_mlp", {"in_channels": 3, "num_classes": 1, "input_size": 1, "user": {"hidden": 8}})
    x = torch.rand(50, 3)
    with torch.no_grad():
        y = model(x)[:, 0] + 0.01 * torch.randn(50)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    save_file({"inputs": x, "targets": y.contiguous()}, str(tmp_path / "d.safetensors"))
    code, out, err = run_cli("calibrate", tmp_path / "m.safetensors", "-m", "regression_mlp", "--model-arg", "hidden=8",
                             "-d", tmp_path / "d.safetensors", "--neuron", "vsn", "--budget", 10,
                             "-o", tmp_path / "p.json", "--samples", 50)
    assert code == 0, err
    assert "NMSE" in out
    code, _, err = run_cli("convert", "--trust-code", tmp_path / "m.safetensors", "-c", tmp_path / "p.json", "-o", tmp_path / "s.st.safetensors")
    assert code == 0, err
    code, out, err = run_cli("evaluate", "--trust-code", tmp_path / "s.st.safetensors", "-d", tmp_path / "d.safetensors", "-T", 1,
                             "-r", tmp_path / "rep", "--sweep", "tradeoff=0")
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["metric"] == "nmse" and "accuracy" not in report["snn"]
    exact = report["variants"][0]["snn"]  # threshold 0 at one step reproduces the ANN
    assert abs(exact["nmse"] - report["ann"]["nmse"]) < 1e-9
    assert report["snn"]["synaptic_event_op"] == "MAC" and 0 < report["snn"]["spike_percent"] <= 100
    assert report["snn"]["spikes_per_sample"] <= exact["spikes_per_sample"]
    code, _, err = run_cli("evaluate", "--trust-code", tmp_path / "s.st.safetensors", "-d", tmp_path / "d.safetensors", "-T", 4,
                           "-r", tmp_path / "rep4", "--arousal-policy", "at=2")  # no class scores to test
    assert code == 2 and "d.safetensors is a regression data set" in err and "Traceback" not in err
    assert not (tmp_path / "rep4").exists()
    code, _, err = run_cli("calibrate", tmp_path / "m.safetensors", "-m", "regression_mlp", "--model-arg", "hidden=8",
                           "-d", tmp_path / "d.safetensors", "--neuron", "asn", "--arousal",
                           "-o", tmp_path / "a.json")
    assert code == 2 and "the uncertainty test compares" in err and not (tmp_path / "a.json").exists()


def test_arousal_reports_three_operating_points(run_cli, tiny_files):
    d = tiny_files["dir"]
    assert run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                   "--neuron", "asn", "--samples", 40, "-o", d / "asn.json")[0] == 0
    assert run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "asn.json", "-o", d / "asn.snn.safetensors")[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 40, "-r", d / "rep",
                             "--arousal-policy", "low=0.45,high=0.1,at=10,threshold=1.0")
    assert code == 0, err
    a = json.loads((d / "rep" / "report.json").read_text())["arousal"]
    assert a["fraction_aroused"] == 1.0  # threshold 1 arouses every input
    assert a["fixed_low"]["spikes_per_sample"] < a["with_arousal"]["spikes_per_sample"]
    assert "aroused" in out
    code, _, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 40, "-r",
                           d / "rep1", "--arousal-policy", "low=0.45,high=0.1,at=10,threshold=1.0,layers=act1")
    assert code == 0, err
    one = json.loads((d / "rep1" / "report.json").read_text())["arousal"]
    assert one["policy"]["layers"] == ["act1"] and one["fixed_high"]["label"].endswith("in act1")
    assert one["fixed_low"] == a["fixed_low"]  # same low-precision run
    assert a["fixed_low"]["spikes_per_sample"] < one["with_arousal"]["spikes_per_sample"] \
        < a["with_arousal"]["spikes_per_sample"]  # act0 stays at low precision
    code, _, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 20, "-r",
                           d / "rep9", "--arousal-policy", "layers=act9")
    assert code == 2 and "act9 is not a spiking layer" in err and not (d / "rep9").exists()
    code, _, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 20, "-r", d / "rep2",
                           "--arousal-policy", "low=0.45,high=0.1,at=10,threshold=0,test=ratio")
    a = json.loads((d / "rep2" / "report.json").read_text())["arousal"]
    assert a["fraction_aroused"] == 0.0 and a["policy"]["test"] == "ratio"
    assert a["with_arousal"]["spikes_per_sample"] == a["fixed_low"]["spikes_per_sample"]
    code, _, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 20, "-r", d / "rep3",
                           "--arousal-policy", "speed=3")
    assert code == 2 and "--arousal-policy 'speed=3'" in err


def test_torch_export_archive_needs_no_model_code(run_cli, tiny_files):
    import torch

    d = tiny_files["dir"]
    model = tiny_cnn()
    archive = d / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), str(archive))
    code, out, err = run_cli("calibrate", archive, "-d", tiny_files["data"], "--samples", 40, "-o", d / "p.json")
    assert code == 0, err
    code, out, err = run_cli("convert", "--trust-code", archive, "-c", d / "p.json", "-o", d / "snn.safetensors")
    assert code == 0, err
    assert "folded into conv" in out and "spiking layer act1" in out
    archive.unlink()  # the artifact carries the architecture with it
    rep = d / "rep"
    code, out, err = run_cli("evaluate", "--trust-code", d / "snn.safetensors", "-d", tiny_files["data"], "-T", 48, "-r", rep,
                             "--device", "cpu")
    assert code == 0, err
    report = json.loads((rep / "report.json").read_text())
    assert report["ann"]["accuracy"] == 1.0 and report["snn"]["accuracy"] >= 0.85
    assert [layer["name"] for layer in report["layers"]] == ["act0", "act1"]
    code, out, _ = run_cli("info", d / "snn.safetensors")
    assert code == 0 and "pt2" in out


def test_calibrate_searches_the_arousal_threshold_for_a_budget(run_cli, tiny_files):
    d, f = tiny_files["dir"], tiny_files
    common = ("-m", "conftest:tiny_cnn", "-d", f["data"], "--neuron", "asn", "--samples", 40, "-T", 30,
              "--arousal-policy", "low=0.45,high=0.1,at=8")

    def search(budget, name):
        code, out, err = run_cli("calibrate", f["checkpoint"], *common, "--budget", budget, "-o", d / name)
        assert code == 0, err
        return json.loads((d / name).read_text())["arousal"]

    generous = search(1e9, "all.json")["search"]
    by = {c["threshold"]: c for c in generous["candidates"]}
    assert generous["chosen"]["threshold"] == 1.0 and by[1.0]["fraction_aroused"] == 1.0
    assert by[0.0]["fraction_aroused"] == 0.0 and by[0.0]["spikes_per_sample"] < by[1.0]["spikes_per_sample"]
    assert not search(1.0, "none.json")["search"]["budget_met"]

    budget = (by[0.0]["spikes_per_sample"] + by[1.0]["spikes_per_sample"]) / 2
    stored = search(budget, "mid.json")
    s = stored["search"]
    assert s["budget_met"] and s["chosen"]["spikes_per_sample"] <= budget
    assert 0.0 <= s["chosen"]["threshold"] < 1.0 and len(s["candidates"]) == 8  # 0, 1 and six bisections
    spikes = [c["spikes_per_sample"] for c in s["candidates"]]  # sorted by threshold
    assert spikes == sorted(spikes)  # a higher threshold arouses more inputs
    above = [c for c in s["candidates"] if c["threshold"] > s["chosen"]["threshold"]]
    assert all(c["spikes_per_sample"] > budget for c in above)

    # the policy travels with the artifact; evaluate --arousal '' runs it, given keys override it
    assert run_cli("convert", "--trust-code", f["checkpoint"], "-c", d / "mid.json", "-o", d / "a.snn.safetensors")[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", d / "a.snn.safetensors", "-d", f["data"], "-T", 30, "-r", d / "rep",
                             "--arousal")
    assert code == 0, err
    a = json.loads((d / "rep" / "report.json").read_text())["arousal"]
    assert a["policy"]["threshold"] == s["chosen"]["threshold"] and a["policy"]["at"] == 8
    assert "artifact" in a["policy_source"] and a["calibration_search"]["chosen"] == s["chosen"]
    code, out, err = run_cli("evaluate", "--trust-code", d / "a.snn.safetensors", "-d", f["data"], "-T", 30, "-r", d / "rep2",
                             "--arousal-policy", "threshold=0")
    a = json.loads((d / "rep2" / "report.json").read_text())["arousal"]
    assert a["policy"]["threshold"] == 0 and a["policy"]["low"] == 0.45 and a["fraction_aroused"] == 0.0
    code, _, err = run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "--arousal-policy", "at=5",
                           "-o", d / "x.json")
    assert code == 2 and "--arousal" in err and "'if'" in err


def test_curve_csv_holds_every_run_in_long_form_and_the_plot_format_is_chosen(run_cli, tiny_files):
    snn = _pipeline(run_cli, tiny_files)
    rep = tiny_files["dir"] / "long"
    code, out, err = run_cli("evaluate", "--trust-code", snn, "-d", tiny_files["data"], "-T", 6, "-r", rep,
                             "--sweep", "v_init=0,0.25", "--compare", "asn,vsn", "--plot-format", "svg")
    assert code == 0, err
    report = json.loads((rep / "report.json").read_text())
    rows = list(csv.DictReader(open(rep / "curve.csv")))
    labels = [report["label"]] + [v["label"] for v in report["variants"]]
    assert len(labels) == 5 and labels[-2:] == ["ASN", "VSN"] and [r["run"] for r in rows] == [label for label in labels for _ in range(6)]
    for label, curve in zip(labels, [report["curve"]] + [v["curve"] for v in report["variants"]]):
        mine = [r for r in rows if r["run"] == label]
        assert [float(r["accuracy"]) for r in mine] == [c["accuracy"] for c in curve]
    assert (rep / "accuracy_vs_spikes.svg").read_text().lstrip().startswith("<?xml")
    assert not (rep / "accuracy_vs_spikes.png").exists() and "accuracy_vs_spikes.svg" in out
    code, _, err = run_cli("evaluate", "--trust-code", snn, "-d", tiny_files["data"], "-T", 6, "-r", rep / "x",
                           "--plot-format", "gif")
    assert code == 2 and "--plot-format 'gif': expected one of png, svg, pdf" in err


def test_arousal_is_compared_with_the_fixed_precision_that_spends_its_spikes(run_cli, tiny_files):
    d = tiny_files["dir"]
    assert run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                   "--neuron", "asn", "--samples", 40, "--param", "m_f=0.2", "-o", d / "asn.json")[0] == 0
    assert run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "asn.json",
                   "-o", d / "asn.snn.safetensors")[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", d / "asn.snn.safetensors", "-d", tiny_files["data"], "-T", 30,
                             "-r", d / "rep", "--arousal-policy", "low=0.45,high=0.1,at=8,threshold=0.6",
                             "--compare", "if")  # a compared run must not be taken for the matched one
    assert code == 0, err
    report = json.loads((d / "rep" / "report.json").read_text())
    a = report["arousal"]
    low, aroused, high = (a[k]["spikes_per_sample"] for k in ("fixed_low", "with_arousal", "fixed_high"))
    assert low < aroused < high, "the test needs arousal between the fixed runs"
    m = a["fixed_same_spikes"]
    assert m["label"].endswith("(spikes as arousal)")
    m_f = float(m["label"].split("m_f=")[1].split()[0])
    assert 0.1 < m_f < 0.45  # between the raised and the start precision
    matched = report["variants"][-1]
    assert matched["label"] == m["label"] and matched["snn"]["spikes_per_sample"] == m["spikes_per_sample"]
    assert abs(m["spikes_per_sample"] - aroused) <= 0.01 * aroused
    assert m["paired_vs_arousal"] == matched["snn"]["paired_vs_main_run"] and "the same spikes" in out
