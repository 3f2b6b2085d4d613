"""bench/bench_lm.py (issue 23) in its quick version: every method runs on a tiny LSTM over Jane Austen, the
table, JSON and the figure of the seven schedules are written. Skipped where the corpus is not installed."""
import json
import math

import pytest

import bench_scripts
import installed


@pytest.mark.skipif(not installed.austen(), reason="Jane Austen's novels are not installed (scripts/setup_env.sh)")
def test_bench_lm_quick(tmp_path):
    bench = bench_scripts.load("bench_lm")
    res = bench.main(["--quick", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(bench.METHODS)
    names = ["dropout.in", "dropout.h1", "dropout.out", "embed_dropout", "dropconnect", "ar", "tar"]
    for r in rows.values():
        assert list(r["hypers"]) == names and math.isfinite(r["test_ppl"]) and r["test_ppl"] > 1
    assert rows["fixed (awd)"]["hypers"]["dropconnect"] == pytest.approx(0.5, rel=1e-5)
    for m in ("stn", "delta-stn"):
        assert rows[m]["trajectory"][-1][0] == 16
    md = (tmp_path / "lm-quick.md").read_text()
    assert "| fixed (awd) |" in md and "| delta-stn |" in md
    assert json.loads((tmp_path / "lm-quick.json").read_text())["settings"]["steps"] == 16
    assert (tmp_path / "lm-quick.png").stat().st_size > 0
    for m in ("fixed", "stn"):  # each evaluation kept: the best one's perplexities are in the table
        assert rows[m]["evals"] and rows[m]["evals"][-1][0] == 16
    # --resume keeps the runs the JSON holds and runs none again
    again = bench.main(["--quick", "--out", str(tmp_path), "--resume"])
    assert [r["elapsed_s"] for r in again["rows"]] == [r["elapsed_s"] for r in res["rows"]]
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(["--quick", "--out", str(tmp_path), "--resume", "--batch-size", "10"])
