"""User errors found by issue 19 (items 5-7): each is one line with exit code 2, found before any training
(the run folder is not even created), or is now reported for what it is. Each failed on the code before
these fixes (23f1fb4): a traceback, a message after training, a wrong message, or silently ignored input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_support import TINY, cli, one_line_error
from train.run import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "A"
    assert main(["--quick", "--config", tiny, "--out", str(out), "--no-eval", "--no-progress", "--threads", "1",
                 "--iterations", "2"]) == 0
    return out


def last_line(code, err, *expect, absent=()):
    """Exit 2, and the error is the last line (after the lines a started job prints), no traceback."""
    assert code == 2 and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err, err
    for e in expect:
        assert e in err.strip().splitlines()[-1], err
    for a in absent:
        assert a not in err, err


def before_training(tiny, tmp_path, capsys, *argv, expect=(), absent=(), config=None):
    """The command fails in one line, exit 2, and no run folder was made (nothing trained)."""
    if config is not None:
        p = tmp_path / "c.json"
        p.write_text(json.dumps({**TINY, **config}))
        tiny = p
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "r", "--runs-dir", tmp_path / "runs",
                     "--no-progress", *argv], capsys)
    one_line_error(code, err, *expect, absent=absent)
    assert not (tmp_path / "r").exists()


# --- 5. one line, exit 2, before training -----------------------------------------------------------------

def test_cache_dir_that_is_a_file(tmp_path, tiny, capsys):
    (tmp_path / "afile").write_text("x")
    before_training(tiny, tmp_path, capsys, "--cache-dir", tmp_path / "afile", expect=["--cache-dir", "is a file"])
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        before_training(tiny, tmp_path, capsys, "--cache-dir", ro, expect=["cache folder", "permission denied"])


def test_inception_weights_that_are_empty_or_another_network(tmp_path, tiny, trained, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    before_training(tiny, tmp_path, capsys, "--inception-weights", tmp_path / "empty.pth",
                    config={"eval": {**TINY["eval"], "metric": "fid"}}, expect=["is an empty file"],
                    absent=["does not exist"])
    code, err = cli(["eval", "--fid", "--run", trained, "--inception-weights", trained / "checkpoints" / "last.pt"],
                    capsys)
    one_line_error(code, err, "is not pytorch-fid's Inception weights")
    # given to a run that does not use them: an error, not ignored
    before_training(tiny, tmp_path, capsys, "--inception-weights", tmp_path / "empty.pth",
                    expect=["--inception-weights is not used"])


@pytest.mark.parametrize("argv, expect", [
    (["--delta-tau", "inf"], "--delta-tau"),
    (["--delta-tau", "nan"], "--delta-tau"),  # (this one was already refused)
    (["--seed", "99999999999999999999999"], "--seed"),
    (["--threads", "100000"], "--threads"),
    (["--resume", ""], "--resume: expected a path, got an empty string"),
    (["--out", ""], "--out: expected a path, got an empty string"),
    (["--data-root", ""], "--data-root: expected a path, got an empty string"),
])
def test_bad_values_are_one_line(tmp_path, tiny, capsys, argv, expect):
    code, err = cli(["--quick", "--config", tiny, "--no-eval", "--runs-dir", tmp_path / "runs", *argv], capsys)
    one_line_error(code, err, expect)
    assert not (tmp_path / "runs").exists()


def test_gmm_with_too_few_samples(tmp_path, capsys):
    code, err = cli(["--dataset", "gmm", "--quick", "--eval-samples", "2", "--out", tmp_path / "g"], capsys)
    one_line_error(code, err, "eval.samples must be at least 4")
    assert not (tmp_path / "g").exists()


def test_resume_of_a_gmm_checkpoint_by_an_image_job(tmp_path, tiny, capsys):
    from train.engine.checkpoint import save_checkpoint, training_state
    from train.engine.config import build
    from train.engine.distributed import Dist
    from train.engine.networks import build_nets

    cfg = build("gmm", True, None, {}, None)
    eps, proj = build_nets(cfg)
    opt = torch.optim.Adam(list(eps.parameters()) + list(proj.parameters()))
    path = save_checkpoint(training_state(5, cfg, Dist(), eps, proj, eps, proj, opt, {}), tmp_path / "checkpoints", 5)
    code, err = cli(["--quick", "--config", tiny, "--resume", path, "--no-eval"], capsys)
    one_line_error(code, err, "gmm (toy) job", absent=["KeyError"])


def test_eval_of_non_finite_weights(tmp_path, trained, capsys):
    import shutil

    run = shutil.copytree(trained, tmp_path / "nan")
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    k = next(iter(state["ema_eps"]))
    state["ema_eps"][k] = torch.full_like(state["ema_eps"][k], float("nan"))
    torch.save(state, run / "checkpoints" / "last.pt")
    code, err = cli(["eval", "--run", run], capsys)
    one_line_error(code, err, "not finite")


def test_broken_link_in_celeba(tmp_path, tiny, capsys):
    from PIL import Image

    folder = tmp_path / "data" / "img_align_celeba"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((218, 178, 3), np.uint8)).save(folder / "000001.jpg")
    (folder / "000002.jpg").symlink_to(tmp_path / "gone.jpg")
    for extra in ([], ["--check-data"]):
        code, err = cli(["--dataset", "celeba", "--quick", "--data-root", tmp_path / "data", "--out", tmp_path / "r",
                         "--no-eval", *extra], capsys)
        one_line_error(code, err, "000002.jpg", "broken link")
        assert not (tmp_path / "r").exists()


def test_full_disk_during_a_checkpoint_says_so(tmp_path, tiny, trained, capsys, monkeypatch):
    import builtins
    import shutil

    from train.engine import checkpoint

    run = shutil.copytree(trained, tmp_path / "full")
    good = (run / "checkpoints" / "last.pt").read_bytes()

    def full_disk(path, mode="r", *a, **k):  # what the kernel answers on a full disk: ENOSPC on write
        return builtins.open("/dev/full", mode, *a, **k) if "w" in mode else builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)
    code, err = cli(["--quick", "--config", tiny, "--resume", run, "--iterations", "4", "--no-eval", "--no-progress",
                     "--threads", "1"], capsys)
    last_line(code, err, "the disk is full", absent=["inline_container"])
    assert (run / "checkpoints" / "last.pt").read_bytes() == good  # the last good checkpoint survives
    assert not list((run / "checkpoints").glob(".*.tmp-*"))


# --- 6. silent or misleading behaviour ------------------------------------------------------------------

def test_export_name_stays_inside_to(tmp_path, trained, capsys):
    code, err = cli(["export", "--run", trained, "--to", tmp_path / "docs", "--name", "../../escape", "--allow-quick"],
                    capsys)
    one_line_error(code, err, "--name")
    assert not list(tmp_path.rglob("*escape*"))


def test_export_to_a_full_disk_leaves_no_partial_file(tmp_path, tiny, capsys, monkeypatch):
    import builtins

    from train.engine import checkpoint

    run = tmp_path / "ex"
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--iterations", "2", "--no-progress", "--threads", "1",
                     "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err

    def full_disk(path, mode="r", *a, **k):
        return builtins.open("/dev/full", mode, *a, **k) if "w" in mode else builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(checkpoint, "open", full_disk, raising=False)
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs", "--allow-quick"], capsys)
    one_line_error(code, err, "the disk is full")
    assert [p for p in (tmp_path / "docs").rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    # and a --quick run goes into docs/ only when asked
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs"], capsys)
    one_line_error(code, err, "--quick run", "--allow-quick")
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs", "--allow-quick"], capsys)
    assert code == 0 and (tmp_path / "docs" / "digits_results.md").stat().st_size > 0, err


@pytest.mark.parametrize("X, expect", [
    (np.ones((32, 32, 3, 2), dtype=bool), "logical"),
    (np.full((32, 32, 3, 2), np.nan, dtype=np.float32), "NaN"),
])
def test_svhn_bool_or_nan_pixels_are_refused(tmp_path, X, expect):
    import scipy.io

    from train.data.datasets import make_dataset
    from train.engine.errors import DatasetError

    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": X, "y": np.ones((2, 1))})
    with pytest.raises(DatasetError, match=expect):
        make_dataset("svhn", tmp_path, 32)


def test_eval_flags_that_need_fid(trained, tmp_path, capsys):
    for flag, value in (("--ref-stats", tmp_path / "ref.npz"), ("--ref-samples", "10")):
        code, err = cli(["eval", "--run", trained, flag, value], capsys)
        one_line_error(code, err, flag, "--fid")


# --- 7. found by walking the README ---------------------------------------------------------------------

def test_resume_auto_says_what_it_resumed(tmp_path, tiny, trained, capsys):
    import shutil

    run = shutil.copytree(trained, tmp_path / "B")
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--resume", "auto", "--iterations", "4", "--no-eval",
                     "--no-progress", "--threads", "1"], capsys)
    assert code == 0, err
    assert f"resuming {run / 'checkpoints' / 'last.pt'} at step 2 of 4" in err
    info = json.loads((run / "run_info.json").read_text())
    assert info["resumes"][0]["at_step"] == 2 and info["resumes"][0]["from"].endswith("last.pt")


def test_eval_help_names_the_runs_own_steps(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: the run's own eval.steps" in out and "default 1000,100,40,20" not in out


def test_chen_bootstrap_shows_progress(capsys):
    from train.experiments.chen_trajectories import fd_with_noise

    f = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fd_with_noise({"a": f, "b": f + 0.1}, (np.zeros(3), np.eye(3)), 5, 0, paired_to="a", progress=True)
    assert "digits-FD bootstrap" in capsys.readouterr().err


def test_torchrun_user_error_is_printed_once(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    bad = tmp_path / "bad.json"
    bad.write_text('{"iteratons": 5}')
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train" / "run.py"), "--quick",
                        "--config", str(bad), "--device", "cpu", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert ours == [f"error: --config {bad}: unknown key 'iteratons' (known: " + ours[0].split("(known: ")[1]], ours
    assert not (tmp_path / "r").exists()
    # torchrun adds its own failure report and exit code 1; our launcher keeps the one line and exit 2
    r = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), "--nproc-per-node", "2", "--quick",
                        "--config", str(bad), "--device", "cpu", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.strip() == ours[0], (r.returncode, r.stdout, r.stderr)


# --- issue 16: what --fused means on a CPU ---------------------------------------------------------------

def test_triton_interpreter_needs_fused(tmp_path, tiny, capsys):
    before_training(tiny, tmp_path, capsys, "--triton-interpreter", expect=["--triton-interpreter: only with --fused"])


def test_fused_without_a_compiler_is_one_line_before_training(tmp_path, tiny):
    """--fused on a CPU needs the C++ step kernels: no compiler is exit 2, one line, no run folder."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), "--quick", "--fused", "--device", "cpu",
                        "--config", tiny, "--out", str(tmp_path / "r"), "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300)
    one_line_error(r.returncode, r.stderr, "--fused: backend='cpp' cannot run on cpu: no C++ compiler", "no-such-c++")
    assert not (tmp_path / "r").exists()
