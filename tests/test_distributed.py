"""Data-parallel runs: torchrun with 2 CPU ranks (gloo), and --shard + merge, give the report a
single process gives; a rank that fails ends every rank with one line naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
MODEL = ["-m", "conftest:tiny_cnn"]


def _torchrun(args: list, cwd: Path, ranks: int = 2, extra_env: dict | None = None):
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "ann2snn", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _report(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    report.pop("timing")
    report["provenance"].pop("command")  # the command lines differ; all else must not
    return report


@pytest.fixture
def asn_artifact(run_cli, tiny_files):
    f, d = tiny_files, tiny_files["dir"]
    assert run_cli("calibrate", f["checkpoint"], *MODEL, "-d", f["data"], "--neuron", "asn", "--samples", 40,
                   "-o", d / "a.json")[0] == 0
    assert run_cli("convert", f["checkpoint"], *MODEL, "-c", d / "a.json", "-o", d / "a.snn")[0] == 0
    return d / "a.snn"


def test_two_ranks_give_the_single_process_report(run_cli, tiny_files, asn_artifact):
    d = tiny_files["dir"]
    args = ["evaluate", asn_artifact, *MODEL, "-d", tiny_files["data"], "-T", 24, "--start-ms", 0, "--device", "cpu",
            "--sweep", "m_f=0.3", "--compare", "if", "--batch-size", 7]
    assert run_cli(*args, "-r", d / "one")[0] == 0
    done = _torchrun([*args, "-r", d / "two"], d)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _report(d / "two") == _report(d / "one")
    assert done.stdout.count("Spiking layers") == 1  # rank 0 alone prints


def test_a_budget_search_on_two_ranks_chooses_as_one_does(run_cli, tiny_files):
    f, d = tiny_files, tiny_files["dir"]
    args = ["calibrate", f["checkpoint"], *MODEL, "-d", f["data"], "--neuron", "asn", "--samples", 30, "-T", 12,
            "--budget", 400, "--device", "cpu"]
    assert run_cli(*args, "-o", d / "one.json")[0] == 0
    done = _torchrun([*args, "-o", d / "two.json"], d)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((d / n).read_text()) for n in ("one.json", "two.json"))
    assert two["budget_search"] == one["budget_search"] and two["layers"] == one["layers"]
    arousal = ["--arousal-policy", "low=0.45,high=0.1,at=4"]
    assert run_cli(*args, *arousal, "-o", d / "aone.json")[0] == 0
    done = _torchrun([*args, *arousal, "-o", d / "atwo.json"], d)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((d / n).read_text())["arousal"] for n in ("aone.json", "atwo.json"))
    assert two == one and len(one["search"]["candidates"]) >= 2


def test_a_failing_rank_ends_every_rank_with_one_line(tiny_files, asn_artifact, monkeypatch):
    from ann2snn.app import pipeline

    d = tiny_files["dir"]
    (d / "flaky.py").write_text("import os\nfrom conftest import tiny_cnn\n\n"
                                "def make():\n    if os.environ.get('RANK') == '1':\n"
                                "        raise RuntimeError('no memory left on this node')\n    return tiny_cnn()\n")
    raw = json.loads((d / "a.json").read_text())
    raw["model"]["ref"] = "flaky:make"
    (d / "f.json").write_text(json.dumps(raw))
    monkeypatch.syspath_prepend(str(d))
    pipeline.convert(tiny_files["checkpoint"], d / "f.json", d / "f.snn", model_ref="flaky:make")
    done = _torchrun(["evaluate", d / "f.snn", "--trust-code", "-d", tiny_files["data"], "-T", 8, "-r", d / "rep",
                      "--device", "cpu"], d, extra_env={"PYTHONPATH": f"{d}{os.pathsep}{TESTS}"})
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ann2snn: error:")]
    assert len(lines) == 2 and all("rank 1 of 2" in ln and "no memory left" in ln for ln in lines), done.stderr
    assert "ann2snn/" not in done.stderr  # no traceback of ours (torchrun reports the exit status its own way)
    assert not (d / "rep").exists() or not any((d / "rep").iterdir())


def test_shards_and_merge_give_the_single_process_report(run_cli, tiny_files, asn_artifact):
    d = tiny_files["dir"]
    args = ["evaluate", asn_artifact, *MODEL, "-d", tiny_files["data"], "-T", 16, "--device", "cpu",
            "--arousal-policy", "low=0.45,high=0.1,at=5,threshold=0.6"]
    assert run_cli(*args, "-r", d / "one")[0] == 0
    for i in range(3):
        code, out, err = run_cli(*args, "--shard", f"{i}/3", "-r", d / f"s{i}")
        assert code == 0 and "partial.json" in out, err
        assert not (d / f"s{i}" / "report.json").exists()
    parts = [d / f"s{i}" / "partial.json" for i in (2, 0, 1)]
    assert run_cli("merge", *parts, *MODEL, "-r", d / "merged", "--device", "cpu")[0] == 0
    one, merged = _report(d / "one"), _report(d / "merged")
    # one process also searches the fixed precision that spends arousal's spikes; shards cannot
    # (no shard knows the total), so the merged report leaves that run out and says so
    matched = one["arousal"].pop("fixed_same_spikes")
    assert matched["label"].endswith("(spikes as arousal)") and one["variants"][-1]["label"] == matched["label"]
    one["variants"].pop()
    assert merged["arousal"].pop("fixed_same_spikes") is None
    assert merged == one
    code, _, err = run_cli("merge", *parts[:2], *MODEL, "-r", d / "m2")
    assert code == 2 and "shard 1 is missing" in err and not (d / "m2").exists()
    assert run_cli(*args[:-2], "--shard", "1/3", "-r", d / "other")[0] == 0  # no arousal: another evaluation
    code, _, err = run_cli("merge", parts[0], d / "s0" / "partial.json", d / "other" / "partial.json", *MODEL,
                           "-r", d / "m3")
    assert code == 2 and "belongs to another evaluation" in err
    code, _, err = run_cli(*args, "--shard", "3/3", "-r", d / "bad")
    assert code == 2 and "--shard '3/3'" in err
    tampered = json.loads(parts[0].read_text())
    tampered["sums"]["runs"][0]["metric"] = tampered["sums"]["runs"][0]["metric"][:-1]
    (d / "t.json").write_text(json.dumps(_resealed(tampered)))
    code, _, err = run_cli("merge", d / "t.json", *parts[1:], *MODEL, "-r", d / "m4")
    assert code == 2 and "do not fit its shard" in err and not (d / "m4").exists()
    for i, part in enumerate(parts):  # every shard names an option ann2snn does not have
        tampered = json.loads(part.read_text())
        tampered["run"]["bogus"] = 1
        (d / f"t{i}.json").write_text(json.dumps(_resealed(tampered)))
    code, _, err = run_cli("merge", *(d / f"t{i}.json" for i in range(3)), *MODEL, "-r", d / "m5")
    assert code == 2 and "unknown field 'bogus'" in err


def _resealed(raw: dict) -> dict:
    from ann2snn.evaluation.evaluate import _sealed

    return _sealed({k: v for k, v in raw.items() if k != "sha256"})


def test_merge_refuses_forged_or_foreign_partials(run_cli, tiny_files, asn_artifact):
    d = tiny_files["dir"]
    args = ["evaluate", asn_artifact, *MODEL, "-d", tiny_files["data"], "-T", 8, "--device", "cpu"]
    for i in range(2):
        assert run_cli(*args, "--shard", f"{i}/2", "-r", d / f"p{i}")[0] == 0
    parts = [d / "p0" / "partial.json", d / "p1" / "partial.json"]

    def forged(edit, name, seal=True):  # resealed, as someone who recomputes the checksum can
        raw = json.loads(parts[0].read_text())
        edit(raw)
        (d / name).write_text(json.dumps(_resealed(raw) if seal else raw))
        return d / name

    def tenfold(raw):
        spikes = raw["sums"]["runs"][0]["spikes"]
        spikes[:] = [[v * 10 for v in row] if isinstance(row, list) else row * 10 for row in spikes]

    code, _, err = run_cli("merge", forged(tenfold, "x10.json", seal=False), parts[1], *MODEL, "-r", d / "mx")
    assert code == 2 and "checksum mismatch" in err and not (d / "mx").exists(), err

    cases = [(lambda r: r["sums"]["runs"][0]["metric"].__setitem__(-1, -20.0), "inconsistent", parts[1]),
             (lambda r: r["sums"].__setitem__("ann", 3.0), "inconsistent", parts[1]),
             (lambda r: r["sums"]["runs"][0]["spikes"][0].__setitem__(0, -5e6), "inconsistent", parts[1]),
             (lambda r: r.__setitem__("shard", [1, 2]), "is not the data", parts[0]),  # shard 0 twice, relabelled
             (lambda r: r.__setitem__("shard", [0]), "expected [I, N]", parts[1])]
    for i, (edit, match, other) in enumerate(cases):
        code, _, err = run_cli("merge", forged(edit, f"f{i}.json"), other, *MODEL, "-r", d / f"m{i}")
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    rep = d / "rep"  # merge may not replace the artifact the partials name
    rep.mkdir()
    (rep / "report.json").symlink_to(asn_artifact)
    code, _, err = run_cli("merge", *parts, *MODEL, "-r", rep)
    assert code == 2 and "would replace the input" in err and (rep / "report.json").is_symlink()


def test_the_operating_point_on_two_ranks_is_chosen_as_one_process_chooses_it(run_cli, tiny_files):
    # the ranks share the candidates; the bars need every candidate's curve, gathered on every rank
    f, d = tiny_files, tiny_files["dir"]
    args = ["calibrate", f["checkpoint"], *MODEL, "-d", f["data"], "--neuron", "asn", "--samples", 20, "--device", "cpu"]
    assert run_cli(*args, "-o", d / "one.json")[0] == 0
    done = _torchrun([*args, "-o", d / "two.json"], d)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((d / n).read_text()) for n in ("one.json", "two.json"))
    assert two["operating_point"] == one["operating_point"] and two["neuron"] == one["neuron"]
    assert two["layers"] == one["layers"]
