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
    # paired verdicts over 3 sampling seeds, seed 0 being the table's own cells
    assert "paired over 3 sampling seeds" in md and "- N=20: vs EM at 2N steps (equal NFE)" in md
    seeds = json.loads((out / "paired_seeds_learned.json").read_text())
    assert set(seeds) == {"pp@20", "em@20", "em2n@20"} and all(len(v) == 3 for v in seeds.values())
    table = {r["row"]: float(r["value"]) for r in cells if r["score"] == "learned"}
    assert seeds["pp@20"][0] == pytest.approx(table["pp"], rel=1e-12) and seeds["pp@20"][1] != seeds["pp@20"][0]
    # export copies a gmm run's table and figures into docs (it used to fail on the gmm config)
    assert main(["export", "--run", str(out), "--to", str(tmp_path / "docs"), "--name", "gmm"]) == 0
    assert (tmp_path / "docs" / "gmm_results.md").read_text().endswith(md)
    assert (tmp_path / "docs" / "figures" / "gmm_w2_vs_nfe.png").is_file()


def test_toy_quick_prints_no_verdicts(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["--dataset", "gmm", "--quick", "--iters", "20", "--steps", "10", "--n-samples", "100",
                 "--out", str(out), "--no-progress"]) == 0
    md = (out / "results.md").read_text()
    assert "No verdicts" in md and "PP is" not in md and "within noise" not in md
    assert not (out / "paired_seeds_learned.json").exists()


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

