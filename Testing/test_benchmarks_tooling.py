"""The benchmark runner's plumbing (not the speeds): records, ratios, the table, failures kept visible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _record  # noqa: E402
import run_all  # noqa: E402


def test_ratio_says_how_many_times_ours_is_better_in_either_direction():
    fast = _record.figure("t", 0.5, "s", device="cpu", peer="p", peer_value=2.0)
    assert fast["ratio"] == pytest.approx(4.0)
    thr = _record.figure("x", 100.0, "points/s", device="cpu", peer="p", peer_value=400.0, better="higher")
    assert thr["ratio"] == pytest.approx(0.25)
    assert _record.figure("y", 1.0, "s", device="cpu")["ratio"] is None
    with pytest.raises(ValueError, match="better"):
        _record.figure("z", 1.0, "s", device="cpu", better="faster")


@pytest.mark.slow
def test_a_benchmark_writes_its_figures_and_the_runner_tabulates_them(tmp_path):
    out = tmp_path / "mise.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_mise.py"), "--resolution0", "8", "--steps", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(out.read_text())
    assert rec["figure"].startswith("MISE 16³") and rec["peer"] == "dense grid + flying edges"
    assert rec["ours"] > 0 and rec["ratio"] == pytest.approx(rec["peer_value"] / rec["ours"])
    report = {"date": "d", "commit": "c", "profile": "cpu quick", "figures": [rec],
              "runs": [{"name": "mise", "command": "bench_mise.py", "seconds": 1.0, "rc": 0, "log": "mise.log"},
                       {"name": "drr", "command": "bench_drr.py", "seconds": 2.0, "rc": 1, "log": "drr.log",
                        "error": "exit 1: boom"}]}
    md = run_all.markdown(report)
    assert "| MISE 16³" in md and "dense grid + flying edges" in md
    assert "drr: FAILED (exit 1: boom)" in md  # a failed benchmark keeps its row


def test_every_profile_names_existing_scripts_that_accept_json():
    for device in ("cpu", "cuda"):
        for quick in (False, True):
            for name, args in run_all.profiles(device, quick).items():
                script = BENCH / args[0]
                assert script.is_file(), name
                assert "add_json_arg" in script.read_text(), f"{args[0]} takes no --json"


def test_the_runner_works_from_any_folder(tmp_path, monkeypatch, capsys):
    """From another folder: the benchmark runs from the repository root, finds its figures, and ``--out``
    is the caller's (every bench was 'FAILED (exit 0 …)' when the two were resolved against different folders)."""
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    monkeypatch.setattr(run_all, "profiles", lambda device, quick: {
        "mise": ["bench_mise.py", "--resolution0", "8", "--steps", "1"]})
    assert run_all.main(["--device", "cpu", "--only", "mise", "--out", "results"]) == 0
    report = json.loads((caller / "results" / "benchmarks.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["mise"] and "error" not in report["runs"][0]
    assert report["figures"] and report["figures"][0]["figure"].startswith("MISE 16³")
    md = (caller / "results" / "benchmarks.md").read_text()
    assert "FAILED" not in md and "`bench_mise.py --resolution0 8 --steps 1 --json mise.json`" in md
    assert str(tmp_path) not in md  # the table names no folder of this machine
    assert not (run_all.ROOT / "results").exists()
