"""bench/bench_tuning.py's cnn protocol (the Delta-STN code's Fashion-MNIST CNN: four dropout rates, cutout length
and holes) end to end in its quick version: every method runs, the table, JSON and schedule figure are written.
Skipped where Fashion-MNIST's IDX files are not installed (as the protocol itself skips)."""
import json
import math

import pytest

import bench_scripts
import installed

from stn_ext.tuning.models import HyperDropout
from stn_ext.tuning.problems import fashion_cnn


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fashion_cnn_has_the_papers_four_dropout_places():
    m = fashion_cnn(6)
    assert [d.slot for d in m.modules() if isinstance(d, HyperDropout)] == ["in", "c1", "c2", "h1"]
    assert isinstance(m.layers[0], HyperDropout)  # the input's dropout comes before the first conv


def test_set_inits_merges_into_the_protocols_own():
    """--set inits=... on the cnn protocol starts the named hyperparameters there and keeps the protocol's other starts
    (it was dropped whole: the protocol's inits won)."""
    bench = bench_scripts.load("bench_tuning")
    bench.OVERRIDES.update(bench._parse_sets(["inits={'dropout': 0.5}", "hyper_lr=0.01"]))
    cfg = bench.config(method="stn", **bench.cnn_settings())
    assert cfg.inits == {**bench.CNN_INITS, "dropout": 0.5} and cfg.inits["dropout"] != bench.CNN_INITS.get("dropout")
    assert cfg.hyper_lr == 0.01
    assert bench.config(method="stn").inits == {"dropout": 0.5}  # nothing of the protocol's to merge with
    bench.OVERRIDES.clear()
    assert bench.config(method="stn", **bench.cnn_settings()).inits == bench.CNN_INITS


@pytest.mark.skipif(not installed.fashion_mnist(), reason="Fashion-MNIST's IDX files are not installed")
def test_bench_tuning_cnn_quick(tmp_path):
    bench = bench_scripts.load("bench_tuning")
    res = bench.main(["--quick", "--only", "cnn", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["cnn"]}
    assert set(rows) == {"fixed", "random", "tpe", "stn", "delta-stn"}
    names = ["dropout.in", "dropout.c1", "dropout.c2", "dropout.h1", "cutout_length", "cutout_holes"]
    for r in rows.values():
        assert list(r["hypers"]) == names
        assert all(math.isfinite(r[k]) for k in ("test_loss", "val_loss", "best_val_loss", "train_s_per_step"))
        assert r["hypers"]["cutout_length"] == round(r["hypers"]["cutout_length"])  # discrete
    for m in ("stn", "delta-stn"):  # the tuned ones took hyper steps and logged their schedules
        assert rows[m]["hyper_steps"] > 0 and rows[m]["trajectory"][-1][0] == res["cnn_protocol"]["steps"]
    assert len(rows["random"]["trial_hypers"]) == 4 and len(rows["tpe"]["trial_hypers"]) == 4
    md = (tmp_path / "tuning-quick.md").read_text()
    assert "Fashion-MNIST CNN" in md and "| delta-stn | 0 |" in md
    assert json.loads((tmp_path / "tuning-quick.json").read_text())["cnn_protocol"]["train_size"] == 512
    assert (tmp_path / "tuning-quick-cnn.png").stat().st_size > 0


def test_the_fashion_table_reports_best_validation_and_takes_a_subset_of_methods():
    """The fashion protocol's table carries the best validation loss (what issue 22 compares) beside the final one, and
    renders with the methods that ran (--fashion-methods delta-stn: no fixed row, so no time ratio)."""
    bench = bench_scripts.load("bench_tuning")
    row = lambda m, seed, best: {"method": m, "seed": seed, "test_loss": 0.4, "test_acc": 0.85, "best_val_loss": best,  # noqa: E731
                                 "val_loss": 0.37, "s_per_step": 0.01, "hypers": {"dropout.in": 0.05}}
    md = bench.fashion_table([row("fixed", 0, 0.35), row("delta-stn", 0, 0.3421), row("delta-stn", 1, 0.3401)], 4000)
    assert "| best val loss | final val loss |" in md
    assert "| delta-stn | 0.4000 | 0.4000, 0.4000 | 0.850 | 0.3411 | 0.3700 | 1.00x | 0.05 |" in md
    alone = bench.fashion_table([row("delta-stn", 0, 0.3421)], 4000)
    assert "| delta-stn | 0.4000 | 0.4000 | 0.850 | 0.3421 | 0.3700 | - | 0.05 |" in alone and "| fixed |" not in alone


def test_the_cnn_table_states_the_starts_and_ranges_its_runs_had():
    """--set inits=... (or ranges=...) on the cnn protocol shows in its table's text and its start line; they printed
    the protocol's own starts (cutout length 4, holes 1) whatever the runs had started from."""
    bench = bench_scripts.load("bench_tuning")
    names = ["dropout.in", "dropout.c1", "dropout.c2", "dropout.h1", "cutout_length", "cutout_holes"]
    row = {"method": "fixed", "seed": 0, "test_loss": 0.5, "test_acc": 0.84, "best_val_loss": 0.42, "val_loss": 0.46,
           "train_s_per_step": 0.05, "hypers": dict(zip(names, [0.05] * 4 + [8.0, 2.0])), "sigmas": None}
    bench.OVERRIDES.update(bench._parse_sets(["inits={'cutout_length': 8.0, 'cutout_holes': 2.0}",
                                              "ranges={'cutout_holes': (0.0, 3.0)}"]))
    try:
        md = bench.cnn_table([row], 2000, bench.CNN_SIZES)
    finally:
        bench.OVERRIDES.clear()
    assert ("in 0.05 [0, 0.9], c1 0.05 [0, 0.9], c2 0.05 [0, 0.9], h1 0.05 [0, 0.9], length 8 [2, 24], holes 2 [0, 3]"
            in md)
    assert "(start: in 0.05, c1 0.05, c2 0.05, h1 0.05, length 8, holes 2)" in md
    protocol = bench.cnn_table([row], 2000, bench.CNN_SIZES)
    assert "length 4 [2, 24], holes 1 [0, 5]" in protocol
    assert "(start: in 0.05, c1 0.05, c2 0.05, h1 0.05, length 4, holes 1)" in protocol
