"""The meta-optimisation loop (stn_ext.reversible.meta) and the paper's experiments as problems and CLI."""
import csv
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from stn_ext.reversible import FixedPointOverflowError
from stn_ext.reversible.meta import ChaosRule, meta_optimize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_schedules():
    pytest.importorskip("sklearn")
    from stn_ext.reversible.examples import make_problem

    return make_problem("schedules", "digits", steps=6, batch=40, train_size=200, val_size=100, hidden=(8,))


def adam(problem):
    return torch.optim.Adam(problem.hypers.values(), lr=0.05)


def same_rows(a, b):
    drop = ("seconds",)
    return [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


# --- resume ----------------------------------------------------------------------------------------------


def test_resume_reproduces_an_uninterrupted_run_bit_for_bit(tmp_path):
    whole = tiny_schedules()
    full = meta_optimize(whole.objective, whole.hypers, adam(whole), 4, out=str(tmp_path / "whole"), progress=False)
    part = tiny_schedules()  # a fresh process would build everything again: so does this
    meta_optimize(part.objective, part.hypers, adam(part), 2, out=str(tmp_path / "cut"), progress=False)
    again = tiny_schedules()
    opt = adam(again)
    calls = []
    resumed = meta_optimize(lambda h, s: calls.append(s) or again.objective(h, s), again.hypers, opt, 4,
                            out=str(tmp_path / "cut"), resume=True, progress=False)
    assert calls == [2, 3]  # only the meta-iterations not yet done, with their own fresh seeds
    assert same_rows(resumed.history, full.history)
    for k in whole.hypers:
        assert torch.equal(again.hypers[k], whole.hypers[k])
    assert (tmp_path / "cut" / "meta_history.csv").exists()
    summary = json.load(open(tmp_path / "cut" / "summary.json"))
    assert summary["complete"] and summary["meta_iters_done"] == 4


def test_ctrl_c_mid_iteration_keeps_the_finished_ones_and_resume_continues(tmp_path):
    whole = tiny_schedules()
    full = meta_optimize(whole.objective, whole.hypers, adam(whole), 3, progress=False)
    cut = tiny_schedules()

    def interrupted(h, s):
        if s == 2:
            raise KeyboardInterrupt
        return cut.objective(h, s)

    with pytest.raises(KeyboardInterrupt):
        meta_optimize(interrupted, cut.hypers, adam(cut), 3, out=str(tmp_path / "run"), progress=False)
    assert len(list(csv.DictReader(open(tmp_path / "run" / "meta_history.csv")))) == 2
    again = tiny_schedules()
    resumed = meta_optimize(again.objective, again.hypers, adam(again), 3, out=str(tmp_path / "run"), resume=True,
                            progress=False)
    assert same_rows(resumed.history, full.history)
    assert all(torch.equal(again.hypers[k], whole.hypers[k]) for k in whole.hypers)


def test_resume_refuses_other_settings_and_a_missing_run(tmp_path):
    p = tiny_schedules()
    meta_optimize(p.objective, p.hypers, adam(p), 1, out=str(tmp_path / "run"), progress=False, config={"a": 1})
    q = tiny_schedules()
    with pytest.raises(ValueError, match="cannot resume.*config"):
        meta_optimize(q.objective, q.hypers, adam(q), 2, out=str(tmp_path / "run"), resume=True, config={"a": 2})
    with pytest.raises(ValueError, match="cannot resume.*seed"):
        meta_optimize(q.objective, q.hypers, adam(q), 2, out=str(tmp_path / "run"), resume=True, seed=5,
                      config={"a": 1})
    with pytest.raises(ValueError, match="no .*state.pt"):
        meta_optimize(q.objective, q.hypers, adam(q), 2, out=str(tmp_path / "typo"), resume=True)


def test_the_optimiser_must_hold_exactly_the_hyperparameters():
    h = {"a": torch.zeros(3, requires_grad=True), "b": torch.zeros(2, requires_grad=True)}
    with pytest.raises(ValueError, match="exactly the tensors"):
        meta_optimize(lambda h, s: h["a"].sum(), h, torch.optim.SGD([h["a"]], lr=0.1), 1, progress=False)


# --- the chaos stop ----------------------------------------------------------------------------------------


def test_chaos_rule_on_made_up_sequences():
    rule = ChaosRule(window=8, factor=10)
    growing = [0.1 * 1.5**k for k in range(12)]  # x 17 across 8 meta-iterations
    assert all(rule.check(growing[:k]) is None for k in range(1, 8))
    assert "chaotic" in rule.check(growing[:8])
    rng = random.Random(0)
    flat = [0.1 * 10 ** rng.uniform(-0.3, 0.3) for _ in range(500)]  # noise of a fresh seed, no trend
    assert all(rule.check(flat[:k]) is None for k in range(1, 501))
    slow = [0.1 * 1.2**k for k in range(30)]  # x 3.6 across the window: not chaos
    assert all(rule.check(slow[:k]) is None for k in range(1, 31))
    assert "nan" in rule.check([1.0, float("nan")])
    assert ChaosRule(window=0).check(growing) is None


def test_meta_loop_stops_on_a_growing_meta_gradient_without_stepping_on_it(tmp_path, capsys):
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    seen = []

    def objective(h, seed):  # gradient 2^seed: the norm doubles every meta-iteration
        seen.append(h["x"].detach().clone())
        return (h["x"] * 2.0**seed).sum()

    res = meta_optimize(objective, {"x": x}, torch.optim.SGD([x], lr=1e-3), 20, out=str(tmp_path / "run"))
    assert res.stopped.startswith("stopped at meta-iteration 7:") and "chaotic" in res.stopped
    assert len(res.history) == 8 and "note" in res.history[-1]
    assert torch.equal(x.detach(), seen[-1])  # no step with the chaotic gradient
    assert "chaotic" in capsys.readouterr().err
    assert json.load(open(tmp_path / "run" / "summary.json"))["stopped"] == res.stopped
    again = meta_optimize(objective, {"x": x}, torch.optim.SGD([x], lr=1e-3), 30, out=str(tmp_path / "run"),
                          resume=True, progress=False)
    assert again.stopped == res.stopped and len(seen) == 8  # a stopped run stays stopped

    y = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    flat = meta_optimize(lambda h, s: (h["x"] * (1 + 0.5 * (s % 2))).sum(), {"x": y}, torch.optim.SGD([y], lr=1e-3),
                         20, progress=False)
    assert flat.stopped is None and len(flat.history) == 20


def test_meta_loop_stops_when_training_diverges():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def objective(h, seed):
        if seed == 2:
            raise FixedPointOverflowError("weight 0.weight left the fixed-point range")
        return (h["x"] ** 2).sum() + 1

    res = meta_optimize(objective, {"x": x}, torch.optim.Adam([x], lr=0.1), 5, progress=False)
    assert "training diverged" in res.stopped and len(res.history) == 3 and math.isnan(res.history[-1]["objective"])


# --- the problems, few-step, through the CLI ---------------------------------------------------------------

TINY = ["--data", "digits", "--meta-iters", "2", "--steps", "5", "--train-size", "200", "--val-size", "100",
        "--batch", "40", "--hidden", "8", "--quiet"]


@pytest.mark.parametrize("problem", ["schedules", "l2", "distill"])
def test_problem_runs_through_the_cli(problem, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from stn_ext.reversible.cli import main

    out = tmp_path / problem
    assert main(["--problem", problem] + TINY + ["--out", str(out)]) == 0
    result = json.load(open(out / "result.json"))
    assert result["meta_iters_done"] == 2 and result["stopped"] is None
    for split in ("val", "test"):
        assert 0 < result["final"][f"{split}_loss"] < 10 and 0 <= result["final"][f"{split}_acc"] <= 1
    assert result["hyperparameters"] == {"schedules": 5 * 4 * 2 + 4, "l2": 640, "distill": 640}[problem]
    rows = list(csv.DictReader(open(out / "meta_history.csv")))
    assert len(rows) == 2 and {"objective", "grad_norm", "test_loss", "test_acc"} <= set(rows[0])
    assert float(rows[0]["grad_norm"]) > 0
    assert (out / f"{problem}.png").stat().st_size > 10000


def test_distill_improves_on_blank_images(tmp_path):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    out = tmp_path / "d"
    assert main(["--problem", "distill", "--data", "digits", "--meta-iters", "4", "--val-size", "200", "--quiet",
                 "--no-plot", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "meta_history.csv")))
    assert float(rows[-1]["objective"]) < float(rows[0]["objective"]) == pytest.approx(math.log(10))


def test_cli_resume_gives_the_uninterrupted_history(tmp_path):
    pytest.importorskip("sklearn")
    from stn_ext.reversible.cli import main

    base = ["--problem", "l2"] + TINY[:2] + TINY[4:] + ["--no-plot"]
    assert main(base + ["--meta-iters", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main(base + ["--meta-iters", "1", "--out", str(tmp_path / "cut")]) == 0
    assert main(base + ["--meta-iters", "3", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    strip = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(p))]  # noqa: E731
    assert strip(tmp_path / "cut" / "meta_history.csv") == strip(tmp_path / "whole" / "meta_history.csv")
    assert main(base + ["--meta-iters", "4", "--lr", "0.1", "--out", str(tmp_path / "cut"), "--resume"]) == 2


def test_cli_dispatch_and_help(capsys):
    from stn_ext.reversible import cli
    from stn_ext.reversible.cli_problems import wants_problems

    assert wants_problems(["--problem", "l2"]) and wants_problems(["--problem=distill"])
    assert wants_problems(["--data", "digits"]) and not wants_problems(["--problem", "digits-mlp", "--steps", "3"])
    assert not wants_problems(["--steps", "3"])
    assert "--problem" in cli.build_parser().format_help()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--problem", "l2", "--data", "mnist"])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith("error:")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "stn_ext", "reversible", "--problem", "schedules", "--help"],
                         capture_output=True, text=True, env=env, check=True).stdout
    for flag in ("--data", "--meta-iters", "--resume", "--seed", "--out", "--chaos-window", "--same-seed", "distill"):
        assert flag in out
