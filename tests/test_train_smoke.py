"""End to end: `python train/run.py` on the digits pipeline with a config smaller than --quick, then
--resume auto, then `run.py eval`, checking the run folder's contents."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "train" / "run.py")]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(args, tmp_path, timeout=300):
    r = subprocess.run(RUN + args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(json.dumps({"batch_size": 8, "log_every": 2, "ckpt_every": 2, "warmup": 2,
                             "net": {"model_channels": 16, "head_channels": 32},
                             "eval": {"steps": [3], "samples": 6, "batch": 6, "grid": 6, "classifier_epochs": 1}}))
    return p


def test_run_folder_resume_and_eval(tmp_path, tiny_config):
    common = ["--quick", "--config", str(tiny_config), "--runs-dir", str(tmp_path / "runs"), "--threads", "1",
              "--no-progress", "--seed", "7"]
    r = _run(common + ["--iterations", "4"], tmp_path)
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]
    assert len(runs) == 1 and runs[0].name.startswith("digits-quick-")
    run = runs[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["seed"] == 7 and cfg["iterations"] == 4 and cfg["net"]["model_channels"] == 16
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "run_info.json").is_file()
    with open(run / "losses.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4]
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    floor = [row for row in rows if row["sampler"] == "data"]  # n real digits vs all: the estimator's floor
    assert len(floor) == 1 and int(floor[0]["n_samples"]) == 6
    paired = [row for row in rows if row["sampler"] == "difference"]  # cells compared with a paired bootstrap
    assert {row["row"] for row in paired} == {"pp_minus_em", "pp_minus_em2n", "em2n_minus_em"}
    assert all(float(row["se"]) > 0 for row in paired)
    rows = [row for row in rows if row["sampler"] not in ("data", "difference")]
    cells = {(row["row"], int(row["N"])) for row in rows}
    assert cells == {(k, 3) for k in ("em", "pp", "em2n", "heun")}
    nfe = {row["row"]: int(row["nfe"]) for row in rows}
    assert nfe == {"em": 3, "pp": 6, "em2n": 6, "heun": 6}  # measured network calls per sample
    assert all(row["metric"] == "digits-FD" and int(row["n_samples"]) == 6 for row in rows)
    assert all(float(row["value"]) > 0 for row in rows)
    md = (run / "results.md").read_text()
    assert "| Predict-Project |" in md and "(NFE 6)" in md and "digits-FD" in md and "FID" not in md
    for k in ("em", "pp", "em2n", "heun"):
        assert (run / "samples" / f"{k}_N3.png").is_file()
    assert (run / "digits_fd_vs_nfe.png").is_file() and (run / "timing.json").is_file()
    assert "| Score-based (EM) |" in r.stdout  # the table is printed at the end
    assert "No verdicts" in md and "Predict-Project is" not in md and "within noise" not in md  # --quick: untrained

    # --resume auto finds this run and continues it to 6 steps
    _run(common + ["--resume", "auto", "--iterations", "6", "--no-eval"], tmp_path)
    assert len([p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]) == 1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    with open(run / "losses.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [2, 4, 6]

    # re-evaluate the finished run with other columns
    r = _run(["eval", "--run", str(run), "--steps", "2", "--rows", "em,pp", "--threads", "1", "--no-progress",
              "--cache-dir", str(tmp_path / "runs" / ".cache")], tmp_path)
    assert "checkpoint step 6" in r.stdout
    with open(run / "results.csv") as f:
        assert {(row["row"], int(row["N"])) for row in csv.DictReader(f)} == {("em", 2), ("pp", 2), ("pp_minus_em", 2),
                                                                              ("data6", 0)}


@pytest.mark.parametrize("interpreter", [False, True], ids=["cpp-steps", "triton-interpreter"])
def test_fused_path_runs(tmp_path, tiny_config, interpreter):
    """--fused on a CPU: the C++ sampler steps with torch's attention and GroupNorm; the Triton
    kernels (steps, attention, GroupNorm) only in their interpreter, asked for by name."""
    if interpreter:
        pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("checks what --fused means on a CPU; on a CUDA machine --fused is the compiled Triton path, "
                    "tested by the device check")
    from wgfcore.backends import resolve_backend

    try:
        resolve_backend("cpp", "cpu")
    except ImportError as e:
        if not interpreter:
            pytest.skip(f"--fused on a CPU needs the C++ step kernels: {e}")
    r = _run(["--quick", "--fused", *(["--triton-interpreter"] if interpreter else []), "--config", str(tiny_config),
              "--out", str(tmp_path / "f"), "--iterations", "1", "--eval-rows", "em,pp", "--eval-steps", "2",
              "--eval-samples", "4", "--eval-batch", "4", "--threads", "1", "--no-progress", "--cache-dir",
              str(tmp_path / "cache")], tmp_path, timeout=600)
    assert ("Triton kernels in the interpreter" in r.stderr) == interpreter
    info = json.loads((tmp_path / "f" / "run_info.json").read_text())
    assert info["fused"] and info["step_backend"] == ("triton" if interpreter else "cpp")
    with open(tmp_path / "f" / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["sampler"] not in ("data", "difference")]
    assert {(row["row"], int(row["nfe"])) for row in rows} == {("em", 2), ("pp", 4)}
    assert all(float(row["value"]) > 0 for row in rows)