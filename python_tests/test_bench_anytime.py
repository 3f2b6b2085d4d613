"""bench/bench_anytime.py (issue 25) end to end in its quick version on the fashion protocol: every method runs,
the searches as Optuna studies over two worker processes, best-so-far curves that only fall, the table, JSON and
figure written, and --resume keeping what the JSON holds. Skipped where Fashion-MNIST's IDX files are not
installed (as the bench itself skips)."""
import json

import pytest

import bench_scripts
import installed


def _bench():
    return bench_scripts.load("bench_anytime")


def test_incumbent_and_catch_up_on_a_made_up_run():
    bench = _bench()
    events = [(1.0, 10, 0.9, 0.95), (2.0, 20, 1.1, 1.0), (3.0, 30, 0.7, 0.8), (4.0, 40, 0.8, 0.7)]
    assert bench.incumbent(events) == [(1.0, 10, 0.9, 0.95), (3.0, 30, 0.7, 0.8)]
    assert bench.best_at(events, 0, 2.5) == 0.9 and bench.best_at(events, 1, 5) == float("inf")
    assert bench.catch_up(events, 0.75) == (3.0, 30) and bench.catch_up(events, 0.5) is None
    # two trials in parallel: 10 steps each by t = 1, the second one half way to its 20 at t = 1.5
    curves = [([0.0, 1.0, 2.0], [0, 10, 20]), ([0.5, 1.0, 2.0], [0, 10, 20])]
    assert bench._steps_by(curves, 1.5) == pytest.approx(30.0)
    assert bench._steps_by(curves, 9.0) == 40 and bench._steps_by(curves, 0.0) == 0


@pytest.mark.skipif(not installed.fashion_mnist(), reason="Fashion-MNIST's IDX files are not installed")
def test_bench_anytime_quick(tmp_path):
    bench = _bench()
    res = bench.main(["--quick", "--only", "fashion", "--out", str(tmp_path), "--work", str(tmp_path / "work")])
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == set(bench.METHODS)
    for m, r in runs.items():
        times = [e[0] for e in r["events"]]
        assert times == sorted(times) and times[0] >= 0 and r["elapsed_s"] >= times[-1] - 1e-6, m
        best = [i[2] for i in bench.incumbent(r["events"])]
        assert best == sorted(best, reverse=True) and len(set(best)) == len(best), m
    for m in bench.TUNED:
        assert runs[m]["events"][-1][1] == 40
    for m in ("random", "tpe"):  # four full trials each, all complete
        assert runs[m]["states"]["COMPLETE"] == 4 and runs[m]["events"][-1][1] == 160
        assert len(runs[m]["trials"]) == 4 and all(t["steps"] == 40 for t in runs[m]["trials"])
    pruned = runs["tpe+median"]
    assert sum(pruned["states"].values()) == 4
    assert pruned["events"][-1][1] == sum(t["steps"] for t in pruned["trials"])
    md = (tmp_path / "anytime-quick.md").read_text()
    assert "| tpe+median |" in md and "seed 0, stn best val" in md
    assert (tmp_path / "anytime-quick-fashion.png").stat().st_size > 0
    # resumed: the JSON's runs are kept, none runs again
    again = bench.main(["--quick", "--only", "fashion", "--out", str(tmp_path), "--resume"])
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(res["runs"], sort_keys=True)
