"""bench/bench_digits_family.py (issue 22): the family is drawn before any run and the same on every call, each
instance's data is the protocol's with the first n training digits, and parts of the runs merge into one table."""
import json
import re

import pytest

import bench_scripts


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return bench_scripts.load("bench_digits_family")


def test_the_family_is_fixed_and_inside_its_ranges(bench):
    family = bench.draw_family(6, 26)
    assert family == bench.draw_family(6, 26) and family[:3] == bench.draw_family(3, 26)
    for inst in family:
        assert 150 <= inst["n_train"] <= 1000 and 32 <= inst["width"] <= 256 and 0.003 <= inst["lr"] <= 0.05
    assert len({inst["width"] for inst in family}) > 1 and len({inst["lr"] for inst in family}) > 1


def test_an_instance_trains_on_the_protocols_first_digits(bench):
    from stn_ext.tuning.problems import digits_protocol

    full = digits_protocol()
    data = bench.instance_data(full, 300)
    assert len(data.train) == 300 and bool((data.train.x == full.train.x[:300]).all())
    assert data.val is full.val and data.test is full.test


def test_parts_run_every_method_and_merge_into_one_table(bench, tmp_path):
    args = ["--family-size", "1", "--seeds", "1", "--steps", "20", "--out", str(tmp_path), "--tag", "f"]
    parts = [bench.main(args + ["--part", f"{k}/2"]) for k in (1, 2)]
    assert sorted(r["method"] for p in parts for r in p) == sorted(bench.METHODS)  # interleaved, none twice
    files = sorted(str(p) for p in tmp_path.glob("*-part*.json"))
    assert len(files) == 2
    rows = bench.main(args + ["--merge"] + files)
    table = (tmp_path / next(p.name for p in tmp_path.glob("*-f.md"))).read_text()
    assert "| i0 |" in table and len(rows) == len(bench.METHODS)
    assert re.search(r"\| stn against stn \(no hyper steps\) \| [01] of 1, [+-]\d\.\d{4} \|", table)
    assert json.loads(next(tmp_path.glob("*-f.json")).read_text())["family"] == bench.draw_family(1, 26)


def test_a_subset_of_methods_with_settings(bench, tmp_path):
    rows = bench.main(["--family-size", "1", "--seeds", "1", "--steps", "20", "--methods", "delta-stn", "--set",
                       "perturb=example", "--out", str(tmp_path), "--tag", "v"])
    assert [r["method"] for r in rows] == ["delta-stn"]
    assert json.loads(next(tmp_path.glob("*-v.json")).read_text())["set"] == {"perturb": "example"}
    table = next(tmp_path.glob("*-v.md")).read_text()
    assert "perturb='example'" in table and "| delta-stn best val | delta-stn test |" in table
    with pytest.raises(SystemExit, match="unknown methods"):
        bench.main(["--methods", "stn,bogus", "--out", ""])
