"""The run folder keeps user data and never traps a user (issue 19, items 1-4 and 6): --overwrite deletes
only what our runs wrote, and only in a folder our marker (or our checkpoint) proves is a run; a run
killed before or during its first checkpoint starts afresh; a run killed during its evaluation is
finished by --resume auto; a failed start leaves nothing that blocks the folder.

Each test here failed on the code before these fixes (7bc5662..23f1fb4). Tiny runs throughout (the
quick digits config narrowed further, --no-eval unless the evaluation is the point)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.engine.runfiles import MARKER
from cli_support import TINY, cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]


def train(tiny, out, capsys, *extra, iterations=2, expect=0):
    code, err = cli(["--quick", "--config", tiny, "--out", out, "--no-eval", "--no-progress", "--threads", "1",
                     "--iterations", iterations, *extra], capsys)
    assert code == expect, err
    return err


def step_of(run):
    return torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)["step"]


def snapshot(root: Path) -> dict:
    """Every entry under root (links not followed): kind, mode, and content or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            if p.is_symlink():
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p.relative_to(root))] = ("dir", oct(st.st_mode))
            else:
                out[str(p.relative_to(root))] = ("file", oct(st.st_mode), p.read_bytes())
    return out


# --- 1. --overwrite deletes only what our runs write ---------------------------------------------------

def test_files_named_like_a_run_prove_nothing(tmp_path, tiny, capsys):
    # the reproductions: a user's config.json, or an empty checkpoints/, beside their own files
    u = tmp_path / "u"
    (u / "sub").mkdir(parents=True)
    (u / "config.json").write_text("{}")
    (u / "important.txt").write_text("precious")
    (tmp_path / "t" / "checkpoints").mkdir(parents=True)
    (tmp_path / "t" / "thesis.tex").write_text("chapter 1")
    for folder in (u, tmp_path / "t"):
        before = snapshot(folder)
        for extra in ([], ["--overwrite"], ["--resume", "auto"]):
            code, err = cli(["--quick", "--config", tiny, "--out", folder, "--no-eval", "--iterations", "2", *extra],
                            capsys)
            one_line_error(code, err, "holds no run")
            assert snapshot(folder) == before, extra  # not even a lock file left behind


def test_overwrite_keeps_every_kind_of_user_file(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    train(tiny, run, capsys, iterations=4)
    (run / "results.md").write_text("old table")  # ours: replaced
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (run / "notes.txt").write_text("mine")
    (run / ".hidden").write_text("mine too")
    (run / "sub").mkdir()
    (run / "sub" / "config.json").write_text("{}")  # named like ours, but in a folder we never make
    (run / "readonly.txt").write_text("ro")
    os.chmod(run / "readonly.txt", 0o444)
    (run / "link_in").symlink_to(run / "notes.txt")
    (run / "link_out").symlink_to(outside / "precious.txt")
    (run / "link_dir").symlink_to(outside)
    (run / "checkpoints" / "my_notes.txt").write_text("inside a run subfolder")
    (run / "samples").mkdir()
    (run / "samples" / "holiday.jpg").write_text("photo")
    user = {k: v for k, v in snapshot(run).items() if k.split("/")[0] in
            ("notes.txt", ".hidden", "sub", "readonly.txt", "link_in", "link_out", "link_dir")
            or k in ("checkpoints/my_notes.txt", "samples/holiday.jpg")}
    outside_before = snapshot(outside)
    train(tiny, run, capsys, "--overwrite", iterations=2)
    after = snapshot(run)
    assert {k: after.get(k) for k in user} == user  # every user entry, unchanged
    assert snapshot(outside) == outside_before
    assert step_of(run) == 2 and not (run / "results.md").exists()  # the old run's files are gone
    assert not (run / "checkpoints" / "ckpt_00000004.pt").exists()


@pytest.mark.parametrize("name", ["results.md", "config.json", "checkpoints/last.pt", "checkpoints"])
def test_a_symlink_where_a_run_file_goes_stops_overwrite(tmp_path, tiny, capsys, name):
    run, outside = tmp_path / "run", tmp_path / "outside"
    train(tiny, run, capsys)
    outside.mkdir()
    (outside / "thesis.md").write_text("keep me")
    target = run / name
    if target.is_dir():
        (outside / "ckpts").mkdir()
        os.rename(target, outside / "ckpts" / "moved")
        target.symlink_to(outside / "ckpts")
    else:
        target.unlink(missing_ok=True)
        target.symlink_to(outside / "thesis.md")
    before, out_before = snapshot(run), snapshot(outside)
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--no-eval", "--overwrite"], capsys)
    one_line_error(code, err, "symbolic link", "nothing was removed")
    assert snapshot(run) == before and snapshot(outside) == out_before


def test_a_run_of_the_code_before_the_marker_is_still_a_run(tmp_path, tiny, capsys):
    run = tmp_path / "old"
    train(tiny, run, capsys)
    (run / MARKER).unlink()  # as main's code wrote it: its checkpoint is the proof
    (run / "mine.txt").write_text("x")
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--no-eval"], capsys)
    one_line_error(code, err, "already holds a run")
    train(tiny, run, capsys, "--overwrite", iterations=4)
    assert step_of(run) == 4 and (run / "mine.txt").read_text() == "x" and (run / MARKER).is_file()


# --- 2. killed before or during the first checkpoint ----------------------------------------------------

def test_killed_before_the_first_checkpoint_starts_afresh(tmp_path, tiny, capsys):
    run = tmp_path / "k1"
    train(tiny, run, capsys)
    # what a kill during the first checkpoint's write leaves: the marker, the files written at start,
    # a log of the steps made, and the temporary of the checkpoint write; no checkpoint
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    (run / "checkpoints" / ".last.pt.tmp-12345").write_bytes(b"PK\x03\x04 partial")
    (run / "keep.txt").write_text("mine")
    for argv in (["--resume", "auto"], []):  # a preemptible loop's retry, and the same command again
        err = train(tiny, run, capsys, *argv, iterations=2)
        assert "never wrote its first checkpoint" in err and "starting it afresh" in err
        assert step_of(run) == 2 and (run / "keep.txt").read_text() == "mine"
        assert not list((run / "checkpoints").glob(".*.tmp-*"))
        for p in (run / "checkpoints").iterdir():
            p.unlink()


def test_sigkill_in_the_first_seconds_then_resume_auto(tmp_path, tiny):
    out = tmp_path / "k2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train" / "run.py"), "--quick", "--config", tiny, "--out", str(out),
           "--no-eval", "--no-progress", "--iterations", "120", "--ckpt-every", "100", "--log-every", "2"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while not (out / "losses.csv").is_file() or len((out / "losses.csv").read_text().splitlines()) < 2:
        assert first.poll() is None and time.time() < deadline, "the job never started training"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert not (out / "checkpoints" / "last.pt").exists()
    again = subprocess.run([*cmd[:-6], "--iterations", "4", "--ckpt-every", "2", "--log-every", "2", "--resume",
                            "auto"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting it afresh" in again.stderr and step_of(out) == 4


# --- 3. killed during the evaluation --------------------------------------------------------------------

def test_resume_auto_finishes_an_interrupted_evaluation_and_export_works(tmp_path, tiny, capsys):
    run = tmp_path / "ev"
    train(tiny, run, capsys, iterations=2)  # --no-eval stands in for a kill during the evaluation
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "em_N3.png").write_bytes(b"half-written")
    for legacy in (False, True):
        if legacy:  # main's code wrote no timing.json until the evaluation had finished
            (run / "timing.json").unlink()
            (run / "results.md").unlink()
        code, err = cli(["--quick", "--config", tiny, "--out", run, "--resume", "auto", "--no-progress",
                         "--threads", "1", "--cache-dir", tmp_path / "cache"], capsys)
        assert code == 0, err
        assert "finishing its evaluation" in err and (run / "results.md").is_file()
        timing = json.loads((run / "timing.json").read_text())
        assert timing["eval_seconds"] >= 0 and ("train_seconds" in timing)
        assert step_of(run) == 2
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--resume", "auto", "--no-progress"], capsys)
    one_line_error(code, err, "its training is complete", "re-evaluate it with `train/run.py eval`")
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs", "--allow-quick"], capsys)
    assert code == 0, err


def test_export_works_after_eval(tmp_path, tiny, capsys):
    run = tmp_path / "ev2"
    train(tiny, run, capsys, iterations=2)
    (run / "timing.json").unlink()  # a run of main's code stopped during its evaluation
    code, err = cli(["eval", "--run", run, "--no-progress", "--threads", "1"], capsys)
    assert code == 0, err
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs", "--allow-quick"], capsys)
    assert code == 0, err
    head = (tmp_path / "docs" / "digits_results.md").read_text().splitlines()
    assert "Evaluation:" in "\n".join(head[:4]) and "not recorded" not in head[3].split("Evaluation:")[1][:20]


# --- 4. a failed start never blocks the folder -----------------------------------------------------------

@pytest.mark.parametrize("bad, expect", [
    (["--preset", "bogus"], "preset 'bogus'"),
    ({"net": {"bogus_argument": 1}}, "bogus_argument"),
    ({"resolution": 7}, "7x7"),
    ({"channels": 3}, "channels 3 does not fit dataset 'digits'"),
    ({"resolution": 4096}, "resolution"),
    ({"adam_betas": [0.9]}, "adam_betas must be a list of 2 items"),
])
def test_a_failed_start_claims_nothing(tmp_path, tiny, capsys, bad, expect):
    for existing in (False, True):
        out = tmp_path / f"f{int(existing)}"
        if existing:
            out.mkdir()
        argv = ["--quick", "--config", tiny, "--out", out, "--no-eval", "--no-progress", "--iterations", "2"]
        if isinstance(bad, dict):
            cfg = tmp_path / "bad.json"
            cfg.write_text(json.dumps({**TINY, **bad}))
            argv[2] = cfg
        else:
            argv += bad
        code, err = cli(argv, capsys)
        one_line_error(code, err, expect)
        assert out.exists() == existing and (not existing or not any(out.iterdir()))
        train(tiny, out, capsys)  # the fixed command, without --overwrite


def test_a_user_error_after_the_claim_releases_the_folder(tmp_path, tiny, capsys, monkeypatch):
    from train.engine.errors import UsageError
    from train.jobs import image

    def refuse(*a, **k):
        raise UsageError("--fused: a head width the Triton attention does not support")

    monkeypatch.setattr(image, "train", refuse)
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "new", "--no-eval"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --fused") and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    train(tiny, tmp_path / "new", capsys)


# --- 6. leftovers and advice ----------------------------------------------------------------------------

def test_stale_checkpoint_temporaries_are_removed_on_resume(tmp_path, tiny, capsys):
    run = tmp_path / "tmp"
    train(tiny, run, capsys)
    stale = run / "checkpoints" / ".last.pt.tmp-99999"
    stale.write_bytes(b"partial")
    train(tiny, run, capsys, "--resume", "auto", iterations=4)
    assert not stale.exists() and step_of(run) == 4


def test_gmm_folder_advice_does_not_offer_resume(tmp_path, capsys):
    run = tmp_path / "g"
    (run / "checkpoints").mkdir(parents=True)
    (run / MARKER).write_text(json.dumps({"marker": "wgfcore train/run.py run folder", "job": "gmm"}))
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    code, err = cli(["--dataset", "gmm", "--quick", "--out", run, "--no-progress"], capsys)
    one_line_error(code, err, "already holds a run", "--overwrite")
    assert "--resume" not in err
