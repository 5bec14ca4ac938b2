"""Issue 20's pre-registered sweep (`train/run.py pp-sweep`, docs/pp_sweep.md): the grid, the equal-cost
comparators, the decision rule, the timing sessions, and a small end-to-end run whose subset re-derives
its cells (ALGORITHMS §2-3, §7)."""
import json
import math
import shutil

import pytest
import torch

from train.experiments import pp_sweep_cost as Cost
from train.experiments import pp_sweep_doc as D
from train.experiments import pp_sweep_report as R

from cli_support import cli, one_line_error

TIMING = {"sessions": [{"per_step_seconds": {"em": [1.0]}, "batch": 200}],
          "ratio_to_em": {"em": {"median": 1.0}, "pp:1": {"median": 1.74}, "pp:0.5": {"median": 1.28},
                          "pp:0.25": {"median": 1.15}, "tweedie": {"median": 1.9}, "tweedie_free": {"median": 1.0}}}


def test_the_grid_is_the_pre_registered_one():
    # from the paper's delta_p up to the first value whose largest per-step fraction exceeds 1
    assert R.GRID == {20: (1, 3, 10, 30), 40: (0.4, 1, 3, 10, 30, 100), 100: (0.1, 1, 10, 100)}
    assert R.TWEEDIE_STEPS == (20, 40)
    for N, dps in R.GRID.items():
        assert dps[0] == pytest.approx(R.paper_dp(N))
        maxes = [R.fraction_range(N, dp)[1] for dp in dps]
        assert maxes[-1] > 1 and all(m <= 1 for m in maxes[:-1])
    lo, hi, above = R.fraction_range(20, 30.0)  # the numbers for the earlier delta_p = 30 run
    assert (round(lo, 2), round(hi, 2), above) == (0.81, 1.84, 19)


def test_comparators_never_give_em_less_than_the_configuration():
    # equal FLOPs: ceil(N (1 + F_T / F_score)); a width-1 T costs exactly 2N
    assert Cost.comparators(20, "pp", "1", (100, 100), TIMING) == {"nfe": 40, "flops": 40, "wall": 35}
    assert Cost.comparators(20, "pp", "0.5", (34191360, 9108992), TIMING) == {"nfe": 40, "flops": 26, "wall": 26}
    assert Cost.comparators(100, "pp", "0.25", (34191360, 2557824), TIMING)["flops"] == 108
    assert Cost.comparators(40, "tweedie_free", "-", (1, 1), TIMING) == {"nfe": 40, "flops": 40, "wall": 40}
    assert Cost.comparators(40, "tweedie", "-", (1, 1), TIMING) == {"nfe": 80, "flops": 80, "wall": 76}


def test_verdicts_and_intervals():
    m, lo, hi = R.t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) sd / sqrt(3)
    assert R.verdict(-3.0, -0.1) == "pays" and R.verdict(0.1, 2.0) == "loses"
    assert R.verdict(-1.0, 1.0) == "within noise" and R.verdict(math.nan, math.nan) == "one seed"
    s = R.spread([1.0, 3.0], [1.0, 1.0])  # total sd 1.414, sampling 1: training sqrt(2 - 1) = 1
    assert s["sd_sampling"] == pytest.approx(1.0) and s["sd_training"] == pytest.approx(1.0)
    assert R.spread([1.0, 1.2], [1.0, 1.0])["sd_training"] == 0.0  # floored, not imaginary


def test_timing_sessions_add_only_what_is_missing(tmp_path):
    calls = []

    def measure(keys):
        calls.append(list(keys))
        return {"per_step_seconds": {k: [1.0] for k in keys}, "batch": 8, "steps": 2, "rounds": 1, "threads": 1,
                "load_1min": [1.0, 1.0], "ratio_to_em": {k: {"median": 1.0 + i, "min": 1.0, "max": 1.0}
                                                         for i, k in enumerate(keys)}}

    path = tmp_path / "timing.json"
    t = Cost.timing_for(path, ["em", "pp:1"], measure)
    assert calls == [["em", "pp:1"]] and t["ratio_to_em"]["pp:1"] == {"median": 2.0, "min": 1.0, "max": 1.0,
                                                                       "session": 0}
    t = Cost.timing_for(path, ["em", "pp:1", "tweedie_free"], measure)  # a new session against its own EM
    assert calls[-1] == ["em", "tweedie_free"] and t["ratio_to_em"]["tweedie_free"]["session"] == 1
    assert t["ratio_to_em"]["pp:1"]["session"] == 0 and len(json.loads(path.read_text())["sessions"]) == 2
    Cost.timing_for(path, ["em", "pp:1"], measure)
    assert len(calls) == 2


def test_config_rows_pair_within_seeds():
    vals = {(0, "a", "pp"): 5.0, (0, "a", "em"): 7.0, (1, "b", "pp"): 6.0, (1, "b", "em"): 7.0}
    configs = [{"seed": s, "width": "1", "proj": "pp", "N": 20, "dp": 3.0, "n": 10, "K": {}, "cell": (s, t, "pp"),
                "comp": {m: (s, t, "em") for m in ("same_n", "nfe", "flops", "wall")}} for s, t in ((0, "a"), (1, "b"))]
    (row,) = R.config_rows(configs, lambda key, n: vals.get(key), 10)
    assert row["value"] == 5.5 and row["nfe"]["per_seed"] == [-2.0, -1.0] and row["nfe"]["diff"] == -1.5
    del vals[(1, "b", "pp")]
    assert R.config_rows(configs, lambda key, n: vals.get(key), 10)[0]["missing"]


def _fake_run(path, seed, proj_net=None):
    """A digits run folder with untrained networks (the sweep reads only its config and EMA weights); an
    8-channel U-Net, so that the test's few hundred network calls take seconds."""
    from train.engine.checkpoint import save_checkpoint
    from train.engine.config import build
    from train.engine.networks import build_nets

    over = {"net": {"model_channels": 8, "head_channels": 16}}
    cfg = build("digits", True, None, dict(over, proj_net=proj_net) if proj_net else over, seed)
    torch.manual_seed(seed)
    eps, proj = build_nets(cfg)
    state = {"step": 0, "config": cfg.data, "world_size": 1, "eps": eps.state_dict(), "proj": proj.state_dict(),
             "ema_eps": eps.state_dict(), "ema_proj": proj.state_dict(), "optimizer": {}, "rng": [{}]}
    save_checkpoint(state, path / "checkpoints", 0)
    return path


@pytest.mark.slow
def test_small_sweep_end_to_end_and_a_subset_rederives_it(tmp_path, capsys):
    from train.run import main

    runs = [str(_fake_run(tmp_path / "r0", 0)), str(_fake_run(tmp_path / "r0h", 0, {"model_channels": 4,
                                                                                       "head_channels": 8}))]
    common = ["pp-sweep", "--small", "--jobs", "1", "--steps", "20", "--delta-p", "1"]
    assert main(common + ["--runs", *runs, "--out", str(tmp_path / "out"), "--proj", "pp,tweedie"]) == 0
    doc = (tmp_path / "out" / "pp_sweep.md").read_text()
    assert "| learned, width 1 | 20 | 1 | 0.027–0.06 |" in doc and "| learned, width 0.5 | 20 | 1 |" in doc
    assert "| Tweedie T (ours, +1 score call) | 20 | 1 |" in doc and "Table 1 over 1 training seeds" in doc
    # each seed's paired bootstrap sd (sampling noise) of the same-N and equal-FLOPs differences, cached
    assert "### Where the sweep's noise comes from" in doc and "| learned, width 1 | 20 | 1 | nan / " in doc
    assert sum(k.startswith("pair|") for k in json.loads((tmp_path / "out" / "bootstrap.json").read_text())) >= 4
    assert (tmp_path / "out" / "pp_sweep.png").stat().st_size > 10_000
    full = json.loads((tmp_path / "out" / "summary.json").read_text())["rows"]
    # the score net does not depend on T's width: both runs of seed 0 share their EM cells
    assert len(list((tmp_path / "out" / "cells").iterdir())) == 1
    # a subset, drawn afresh into another folder with the same timing, gives the same numbers
    assert main(common + ["--runs", runs[0], "--out", str(tmp_path / "sub"), "--proj", "pp",
                          "--timing", str(tmp_path / "out" / "timing.json")]) == 0
    sub = json.loads((tmp_path / "sub" / "summary.json").read_text())["rows"]
    (ref,) = [r for r in full if r["proj"] == "pp" and r["width"] == "1"]
    assert len(sub) == 1 and sub[0]["value"] == ref["value"]
    for m in ("nfe", "flops", "wall"):
        assert sub[0][m]["per_seed"] == ref[m]["per_seed"]
    # every drawn cell's value by seed, in a file beside the page: the subset's cells are the full run's rows
    full_cells = (tmp_path / "out" / "pp_sweep_cells.md").read_text().splitlines()
    sub_rows = [ln for ln in (tmp_path / "sub" / "pp_sweep_cells.md").read_text().splitlines() if ln.startswith("| pp")]
    assert sub_rows and all(ln in full_cells for ln in sub_rows)
    one_line_error(*cli(common + ["--runs", *runs, "--out", tmp_path / "bad", "--proj", "nope"], capsys), "--proj")
    one_line_error(*cli(["pp-sweep", "--runs", tmp_path, "--out", tmp_path / "bad"], capsys), "not a run folder")


def test_the_generated_section_is_replaced_and_the_rest_kept(tmp_path):
    doc = tmp_path / "page.md"
    D.rewrite_doc(doc, "## Results\n\nfirst\n", "# Title")
    assert doc.read_text() == "# Title\n\n## Results\n\nfirst\n"
    doc.write_text("# Plan\n\nthe grid\n\n## Results\n\nold numbers\n\n" + D.HAND_MARK + "\n## Reading\n\nby hand\n")
    D.rewrite_doc(doc, "## Results\n\nnew numbers\n", "# Title")
    text = doc.read_text()
    assert text.startswith("# Plan\n\nthe grid\n\n## Results\n\nnew numbers\n") and "old numbers" not in text
    assert text.endswith(D.HAND_MARK + "\n## Reading\n\nby hand\n")
    lines = D.cells_lines({(0, "em_20", 200): 1.0, (1, "em_20", 200): 2.5, (1, "pp_w1_20_dp1", 200): 3.0}, ".2f")
    assert lines[2:] == ["| em_20 | 0 | 200 | 1.00 |", "| em_20 | 1 | 200 | 2.50 |", "| pp_w1_20_dp1 | 1 | 200 | 3.00 |"]


@pytest.mark.slow
def test_small_toy_sweep_end_to_end(tmp_path, capsys):
    # the toy command: trains the joint and the analytic-score runs of one (seed, width), draws, reports
    from train.run import main

    args = ["pp-sweep-toy", "--small", "--jobs", "1", "--seeds", "0", "--widths", "32", "--steps", "20",
            "--delta-p", "1", "--out", str(tmp_path / "toy")]
    assert main(args + ["--proj", "pp,tweedie"]) == 0
    doc = (tmp_path / "toy" / "pp_sweep_toy.md").read_text()
    assert "### Learned score" in doc and "### Analytic score" in doc and "| learned, width 0.25 | 20 | 1 |" in doc
    cells = (tmp_path / "toy" / "pp_sweep_toy_cells.md").read_text()
    assert "| h32/pp_w0.25_20_dp1 | 0 | 200 |" in cells and "| analytic/em_20 | 0 | 200 |" in cells
    assert sorted(p.name for p in (tmp_path / "toy" / "runs" / "s0-h32").iterdir()) == ["analytic", "joint"]
    # drawn afresh in another folder from the same runs and timing: the same cells, value for value
    shutil.copytree(tmp_path / "toy" / "runs", tmp_path / "again" / "runs")
    assert main(args[:-1] + [str(tmp_path / "again"), "--proj", "pp", "--timing",
                             str(tmp_path / "toy" / "timing.json")]) == 0
    again = [ln for ln in (tmp_path / "again" / "pp_sweep_toy_cells.md").read_text().splitlines()
             if ln.startswith(("| h32/", "| analytic/"))]
    assert len(again) >= 6 and all(ln in cells.splitlines() for ln in again)
    one_line_error(*cli(args + ["--proj", "nope"], capsys), "--proj")


def test_gmm_proj_net_sets_the_width_of_t_only():
    from train.engine.config import build
    from train.engine.errors import UsageError
    from train.engine.networks import build_nets

    eps, proj = build_nets(build("gmm", True, None, {"proj_net": {"hidden": 32}}, 0))
    eps0, _ = build_nets(build("gmm", True, None, {}, 0))
    assert [p.shape for p in eps.parameters()] == [p.shape for p in eps0.parameters()]
    assert max(p.shape[0] for p in proj.parameters()) == 32
    for bad in ({"model_channels": 8}, {"hidden": 0}, {"hidden": True}):
        with pytest.raises(UsageError, match="proj_net takes only"):
            build("gmm", True, None, {"proj_net": bad}, 0)
