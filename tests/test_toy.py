"""Smoke test of the 2-D toy job (ALGORITHMS §6 data, §2 samplers): it runs and writes what it promises."""
import csv

from train.toy import main


def test_toy_job_writes_tables_and_plots(tmp_path):
    out = main(["--dataset", "gmm", "--iters", "30", "--steps", "20", "--n-samples", "200", "--out", str(tmp_path)])
    assert out == tmp_path
    for name in ("config.json", "results.md", "results.csv", "samples.png", "samples_analytic.png",
                 "w2_vs_nfe.png", "train_log.csv", "model.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    # 5 sampler rows x 1 N x {learned, analytic}; NFE accounted per sampler
    assert len(rows) == 10
    nfe = {(r["score"], r["sampler"]): int(r["NFE"]) for r in rows}
    assert nfe[("learned", "Score-based (EM)")] == 20
    assert nfe[("learned", "Predict-Project (learned T)")] == 40
    assert nfe[("learned", "EM at equal NFE (2N steps)")] == 40
    assert nfe[("analytic", "Heun PF-ODE (equal NFE)")] == 40
    assert all(float(r["W2"]) >= 0 for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert "NFE 40" in md and "floor" in md
