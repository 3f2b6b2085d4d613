"""bench/bench_tuning.py --only ridge-family (issue 22): the ridge family is fixed in advance (the same instances on
every call), every instance passes its checks (interior optimum, starts inside the range, a stable 100x-above
start), and the protocol end to end in a few seconds: the table, JSON and figure are written."""
import json
import math

import pytest

import bench_scripts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("bench_tuning")


def test_the_family_is_fixed_and_every_instance_passes_its_checks(bench):
    inst, rejected = bench.ridge_family(8)
    assert (inst, rejected) == bench.ridge_family(8)  # drawn from a fixed generator: the same on every call
    assert len(inst) == 8 and len({q["seed"] for q in inst}) == 8
    assert inst[:5] == bench.ridge_family(5)[0]  # a smaller family is the larger one's start
    lo, hi = (math.log(v) for v in bench.RIDGE_RANGE)
    for q in inst:
        assert 20 <= q["d"] <= 80 and q["d"] <= q["n_train"] <= 2 * q["d"]
        assert q["log_opt"] == pytest.approx(bench.family_problem(q).log_optimum(), abs=1e-8)
        assert lo + 1 <= q["log_opt"] - math.log(100) and q["log_opt"] + math.log(100) <= hi - 1
        limit = 2 * (1 + 0.9) / 0.01
        assert (q["data_curvature"] + 100 * q["wd_opt"]) / limit == pytest.approx(q["stability"])
        assert q["stability"] <= bench.FAMILY_STABILITY
    assert max(q["log_opt"] for q in inst) - min(q["log_opt"] for q in inst) > 1.0  # the optimum moves
    assert all(q["reason"] for q in rejected)


def test_ridge_family_quick(bench, tmp_path):
    res = bench.main(["--only", "ridge-family", "--family-size", "2", "--ridge-steps", "60", "--methods", "stn",
                      "--perturb", "batch", "--family-seed", "23", "--seeds", "1", "--out", str(tmp_path), "--tag", "rf"])
    fam = res["ridge_family"]
    assert res["seeds"] == 1 and len(fam["rows"]) == 2 * 2  # two instances, two sides, one seed
    assert {r["instance"] for r in fam["rows"]} == {"i0", "i1"}
    assert all(r["resolved"]["perturb"] == "batch" and math.isfinite(r["u_minus_opt"]) for r in fam["rows"])
    assert fam["provenance"]["commit"]
    name = f"tuning-{res['date']}-rf"
    md = (tmp_path / f"{name}.md").read_text()
    assert "Ridge family: 2 instances drawn from random.Random(23) " in md and "| i1 | stn | batch | 100x below |" in md and "Within tolerance:" in md
    assert json.loads((tmp_path / f"{name}.json").read_text())["ridge_family"]["instances"][0]["name"] == "i0"
    assert (tmp_path / f"{name}-ridge-family.png").stat().st_size > 0


def test_ridge_family_runs_the_instances_asked_for(bench, tmp_path):
    res = bench.main(["--only", "ridge-family", "--instances", "i2", "--ridge-steps", "20", "--methods", "stn",
                      "--perturb", "batch", "--seeds", "1", "--out", str(tmp_path), "--tag", "ri"])
    assert {r["instance"] for r in res["ridge_family"]["rows"]} == {"i2"}
    assert "Ridge family: instances i2 of 8 drawn" in (tmp_path / f"tuning-{res['date']}-ri.md").read_text()
    with pytest.raises(SystemExit):  # a name the family does not have
        bench.main(["--only", "ridge-family", "--instances", "i9", "--out", ""])


def test_ridge_runs_the_seeds_and_sides_asked_for(bench, tmp_path):
    """--first-seed and --sides (the roll-back check of issue 22: seeds 7-26, from above only)."""
    res = bench.main(["--only", "ridge", "--ridge-steps", "40", "--methods", "stn", "--perturb", "batch", "--sides",
                      "above", "--first-seed", "7", "--seeds", "2", "--out", str(tmp_path), "--tag", "rs"])
    assert [(r["seed"], r["side"]) for r in res["ridge"]] == [(7, "above"), (8, "above")]
    assert "(seeds 7-8)" in (tmp_path / f"tuning-{res['date']}-rs.md").read_text()
