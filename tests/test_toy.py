"""The 2-D toy job (ALGORITHMS §6 data, §2 samplers) through the common CLI: it runs on the shared
trainer, exits 0, takes the common flags, and writes what it promises."""
import csv
import json

import pytest
import torch

from train.run import main


def test_toy_job_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "gmm"
    code = main(["--dataset", "gmm", "--iters", "30", "--steps", "20", "--n-samples", "100", "--out", str(out),
                 "--no-progress", "--seed", "1", "--eval-seeds", "3"])
    assert code == 0  # it used to return a Path, which sys.exit turned into exit status 1
    for name in ("config.json", "results.md", "results.csv", "samples.png", "samples_analytic.png",
                 "w2_vs_nfe.png", "losses.csv", "losses.png", "checkpoints/last.pt", "analytic/checkpoints/last.pt"):
        assert (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "gmm" and cfg["iterations"] == 30 and cfg["seed"] == 1 and cfg["eval"]["samples"] == 100
    rows = list(csv.DictReader(open(out / "results.csv")))
    # 5 sampler rows x 1 N x {learned, analytic}, plus the estimator's floor; NFE counted per sampler
    cells = [r for r in rows if r["sampler"] != "data"]
    assert len(cells) == 10 and len(rows) == 11
    nfe = {(r["score"], r["row"]): int(r["nfe"]) for r in cells}
    assert nfe[("learned", "em")] == 20 and nfe[("learned", "pp")] == 40 and nfe[("learned", "em2n")] == 40
    assert nfe[("analytic", "heun")] == 40 and nfe[("analytic", "pp_tweedie")] == 40
    assert all(float(r["value"]) > 0 for r in rows)
    # the shared training loop logged the joint losses, and the learned run differs from the analytic one
    losses = list(csv.DictReader(open(out / "losses.csv")))
    assert [int(r["step"]) for r in losses] == [30] and float(losses[0]["dsm"]) > 0
    assert float(list(csv.DictReader(open(out / "analytic" / "losses.csv")))[0]["dsm"]) == 0.0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 30 and state["config"] == cfg
    md = (out / "results.md").read_text()
    assert "NFE 40" in md and "floor" in md


@pytest.mark.parametrize("argv,expect", [
    (["--steps", "abc"], "--eval-steps/--steps: expected comma-separated positive integers"),
    (["--fused"], "--fused: not used by --dataset gmm"),
    (["--resume", "auto"], "does not resume"),
    (["--lr", "-1"], "--lr: expected a positive finite number"),
])
def test_toy_user_errors_are_one_line(tmp_path, capsys, argv, expect):
    try:
        code = main(["--dataset", "gmm", "--out", str(tmp_path / "g"), "--no-progress", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()

