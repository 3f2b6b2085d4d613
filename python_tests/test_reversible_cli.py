"""The ``python -m stn_ext reversible`` command: --help, and a tiny run that writes its outputs."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from stn_ext.reversible import FixedPointOverflowError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_options():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "stn_ext", "reversible", "--help"], capture_output=True, text=True,
                         env=env, check=True).stdout
    for flag in ("--steps", "--meta-iters", "--out", "--quiet", "--per-layer", "--resume"):
        assert flag in out


def test_tiny_run_writes_schedules_and_improves(tmp_path):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

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


# --- argument checks ---------------------------------------------------------------------------------

BAD_ARGS = [
    (["--lr", "-0.3"], "--lr"), (["--lr", "inf"], "--lr"), (["--l2", "0"], "--l2"), (["--l2", "-1"], "--l2"),
    (["--init-scale", "0"], "--init-scale"), (["--batch", "0"], "--batch"), (["--hidden", "0"], "--hidden"),
    (["--steps", "0"], "--steps"), (["--meta-iters", "0"], "--meta-iters"), (["--meta-lr", "0"], "--meta-lr"),
    (["--meta-lr", "nan"], "--meta-lr"), (["--meta-momentum", "1"], "--meta-momentum"),
    (["--meta-momentum", "-0.1"], "--meta-momentum"), (["--momentum", "0"], "--momentum"),
    (["--momentum", "1"], "--momentum"), (["--radix-bits", "63"], "--radix-bits"),
    (["--radix-bits", "0"], "--radix-bits"), (["--train-size", "0"], "--train-size"),
    (["--train-size", "1797"], "--train-size"), (["--batch", "600", "--train-size", "500"], "--batch"),
    (["--seed", "-1"], "--seed"), (["--steps", "1e3"], "--steps"),
]


@pytest.mark.parametrize("args,option", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_argument_is_an_argparse_error(args, option, tmp_path, capsys):
    from stn_ext.reversible.cli import main

    try:  # argparse's own checks exit; the checks between options return
        rc = main(args + ["--quiet", "--no-plot", "--out", str(tmp_path / "run")])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and option in err and "usage:" not in err
    assert not (tmp_path / "run").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    from stn_ext.reversible.cli import main

    (tmp_path / "file").write_text("")
    for out in ("", str(tmp_path / "file")):
        assert main(["--quiet", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "--out" in err and "usage:" not in err and len(err.splitlines()) == 1


def test_bad_argument_on_the_command_line_has_no_traceback():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "stn_ext", "reversible", "--lr", "-0.3"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2
    assert "error: argument --lr: must be > 0, got -0.3" in r.stderr and "Traceback" not in r.stderr


# --- runs: small settings, hypergradient wrapped to count calls and inject failures ---------------------

SMALL = ["--steps", "10", "--hidden", "8", "--batch", "50", "--train-size", "300", "--meta-lr", "0.1",
         "--quiet", "--no-plot"]


def spy_hypergradient(monkeypatch, fail=lambda call: None):
    """Replace the CLI's hypergradient by one that records each call's inputs and raises fail(call) if it is
    an exception. Returns the list of recorded calls."""
    from stn_ext.reversible import cli as cli_reversible
    from stn_ext.reversible import hypergradient

    calls = []

    def spy(params, train_loss, val_loss, lrs, moms, hypers, **kw):
        calls.append({"params": [p.clone() for p in params], "lrs": lrs.clone(), "moms": moms.clone(),
                      "hypers": {k: v.clone() for k, v in hypers.items()}})
        err = fail(len(calls))
        if err is not None:
            raise err
        return hypergradient(params, train_loss, val_loss, lrs, moms, hypers=hypers, **kw)

    monkeypatch.setattr(cli_reversible, "hypergradient", spy)
    return calls


def main_interrupted(argv):
    """main(argv) where the spy raises KeyboardInterrupt; one escaping main would end the pytest session."""
    from stn_ext.reversible.cli import main

    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")


def same_point(a, b):
    return (torch.equal(a["lrs"], b["lrs"]) and torch.equal(a["moms"], b["moms"])
            and all(torch.equal(a["hypers"][k], b["hypers"][k]) for k in a["hypers"])
            and all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])))


def test_l2_zero_with_no_l2_trains_without_penalty(tmp_path):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    out = tmp_path / "run"
    assert main(SMALL + ["--meta-iters", "1", "--l2", "0", "--no-l2", "--out", str(out)]) == 0
    assert [float(r["l2"]) for r in csv.DictReader(open(out / "meta_history.csv"))] == [0.0]


def test_divergence_retakes_the_step_from_the_last_good_point_without_reevaluating_it(tmp_path, monkeypatch):
    """Training diverges at the 2nd point: the 3rd evaluation is at the last good point minus half the first
    meta step (what a run with half the meta lr evaluates 2nd), not the last good point again."""
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    calls = spy_hypergradient(monkeypatch, lambda call: FixedPointOverflowError("injected") if call == 2 else None)
    assert main(SMALL + ["--meta-iters", "3", "--out", str(tmp_path / "a")]) == 0
    assert len(calls) == 3 and not same_point(calls[2], calls[0])
    hist = list(csv.DictReader(open(tmp_path / "a" / "meta_history.csv")))
    assert len(hist) == 3 and "diverged, meta lr halved" in hist[1]["note"]
    assert json.load(open(tmp_path / "a" / "summary.json"))["meta_lr"] == 0.05

    half = spy_hypergradient(monkeypatch)
    main([a if a != "0.1" else "0.05" for a in SMALL] + ["--meta-iters", "2", "--out", str(tmp_path / "b")])
    assert same_point(calls[2], half[1])


def test_divergence_at_the_start_stops_at_once(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    calls = spy_hypergradient(monkeypatch, lambda call: FixedPointOverflowError("injected"))
    assert main(SMALL + ["--meta-iters", "5", "--out", str(tmp_path / "run")]) == 1
    assert len(calls) == 1  # every later evaluation would repeat the first exactly
    assert "diverged at the starting hyperparameters" in capsys.readouterr().err


def test_ctrl_c_keeps_the_finished_meta_iterations_and_exits_130(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    spy_hypergradient(monkeypatch, lambda call: KeyboardInterrupt() if call == 3 else None)
    out = tmp_path / "run"
    assert main_interrupted(SMALL + ["--meta-iters", "5", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"the first 2 meta-iterations are saved in {out}" in err and "--resume" in err
    assert len(list(csv.DictReader(open(out / "meta_history.csv")))) == 2
    assert len(list(csv.DictReader(open(out / "schedules.csv")))) == 2 * 10
    summary = json.load(open(out / "summary.json"))
    assert summary["meta_iters"] == 2 and summary["complete"] is False
    assert sorted(os.listdir(out)) == ["meta_history.csv", "schedules.csv", "state.pt", "summary.json"]  # no temp files


def test_resume_after_ctrl_c_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    assert main(SMALL + ["--meta-iters", "4", "--out", str(tmp_path / "whole")]) == 0
    spy_hypergradient(monkeypatch, lambda call: KeyboardInterrupt() if call == 3 else None)
    assert main_interrupted(SMALL + ["--meta-iters", "4", "--out", str(tmp_path / "cut")]) == 130
    calls = spy_hypergradient(monkeypatch)
    assert main(SMALL + ["--meta-iters", "4", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert len(calls) == 2  # only the meta-iterations not yet done
    for name in ("meta_history.csv", "schedules.csv"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert json.load(open(tmp_path / "cut" / "summary.json"))["complete"] is True


def test_resume_without_a_saved_run_is_an_error(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    assert main(SMALL + ["--meta-iters", "2", "--out", str(tmp_path / "typo"), "--resume"]) == 2
    assert "no " in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_resume_with_different_settings_is_refused(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    out = str(tmp_path / "run")
    assert main(SMALL + ["--meta-iters", "1", "--out", out]) == 0
    assert main(SMALL + ["--meta-iters", "2", "--lr", "0.1", "--out", out, "--resume"]) == 2
    assert "error: cannot resume" in capsys.readouterr().err
