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
