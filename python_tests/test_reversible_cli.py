"""The ``python -m stn_ext reversible`` command: --help, and a tiny run that writes its outputs."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_options():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "stn_ext", "reversible", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    for flag in ("--steps", "--meta-iters", "--out", "--quiet", "--per-layer"):
        assert flag in out


def test_tiny_run_writes_schedules_and_improves(tmp_path):
    pytest.importorskip("sklearn")
    from stn_ext.cli_reversible import main

    out = tmp_path / "run"
    rc = main(["--steps", "15", "--meta-iters", "4", "--hidden", "16", "--batch", "50", "--train-size", "500",
               "--meta-lr", "0.1", "--quiet", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "schedules.csv")))
    assert len(rows) == 4 * 15 and set(rows[0]) == {"meta_iter", "step", "lr", "momentum"}
    summary = json.load(open(out / "summary.json"))
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert (out / "schedules.png").stat().st_size > 1000
    hist = list(csv.DictReader(open(out / "meta_history.csv")))
    assert len(hist) == 4
