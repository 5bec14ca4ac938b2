"""The CLI as an adversarial user meets it (issue 9): run folders are never silently overwritten or
shared, divergence stops the run and keeps the last good checkpoint, resume refuses what it cannot
honour, configs are validated, and user errors are one line with exit code 2 before any training.

Tiny data and networks throughout (a 16-channel U-Net, batch 8, a few steps); most tests call
`train.run.main` in-process, the lock test runs a real second process.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_support import TINY, cli, one_line_error
from train.run import main

ROOT = Path(__file__).resolve().parents[1]


def _train(tiny, out, capsys, *extra, iterations=4):
    code, err = cli(["--quick", "--config", tiny, "--out", out, "--no-eval", "--no-progress", "--threads", "1",
                     "--iterations", iterations, *extra], capsys)
    assert code == 0, err
    return err


def _step(run):
    return torch.load(Path(run) / "checkpoints" / "last.pt", weights_only=True)["step"]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4), copied by tests that change it."""
    out = tmp_path_factory.mktemp("runs") / "A"
    assert main(["--quick", "--config", tiny, "--out", str(out), "--no-eval", "--no-progress", "--threads", "1",
                 "--iterations", "4"]) == 0
    return out


def _copy(run, dst):
    import shutil

    shutil.copytree(run, dst)
    return dst


# --- 1. run folders -------------------------------------------------------------------------------------

def test_existing_run_is_not_overwritten_without_flag(trained, tmp_path, tiny, capsys):
    run = _copy(trained, tmp_path / "A")
    (run / "results.md").write_text("old table")
    before = (run / "losses.csv").read_text()
    code, err = cli(["--quick", "--config", tiny, "--out", run, "--no-eval", "--iterations", "2"], capsys)
    one_line_error(code, err, "already holds a run", "--resume", "--overwrite")
    assert _step(run) == 4 and (run / "losses.csv").read_text() == before
    # --overwrite replaces the run, and nothing of the old one is left beside the new files
    _train(tiny, run, capsys, "--overwrite", iterations=2)
    assert _step(run) == 2 and not (run / "results.md").exists()
    assert json.loads((run / "config.json").read_text())["iterations"] == 2


def test_non_run_folder_is_refused_even_with_overwrite(tmp_path, tiny, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for extra in ([], ["--overwrite"]):
        code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "mine", "--no-eval", *extra], capsys)
        one_line_error(code, err, "holds no run")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_resume_auto_with_damaged_checkpoint_does_not_start_over(trained, tmp_path, tiny, capsys):
    run = _copy(trained, tmp_path / "A")
    for f in (run / "checkpoints").iterdir():
        f.write_bytes(f.read_bytes()[:100])  # truncated
    before = (run / "losses.csv").read_text()
    code, err = cli(["--quick", "--config", tiny, "--resume", "auto", "--out", run, "--no-eval"], capsys)
    one_line_error(code, err, "no readable checkpoint")
    assert (run / "losses.csv").read_text() == before


def test_gmm_job_into_a_digits_run_is_refused(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "A")
    cfg = (run / "config.json").read_text()
    code, err = cli(["--dataset", "gmm", "--quick", "--out", run, "--no-progress"], capsys)
    one_line_error(code, err, "already holds a run")
    assert (run / "config.json").read_text() == cfg


def test_unwritable_out_is_one_line(tmp_path, tiny, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "afile" / "run", "--no-eval"], capsys)
    one_line_error(code, err, "cannot create run folder")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, err = cli(["--quick", "--config", tiny, "--out", ro / "run", "--no-eval"], capsys)
        one_line_error(code, err, "cannot create run folder")


# --- 2. one job per run folder ---------------------------------------------------------------------------

def test_second_job_on_a_running_folder_fails_at_once(tmp_path, tiny, capsys):
    out = tmp_path / "busy"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "train" / "run.py"), "--quick", "--config", tiny, "--out",
                              str(out), "--no-eval", "--no-progress", "--iterations", "100000", "--seed", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "last.pt").is_file():  # the first job holds the lock and is training
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "the first job never started training"
            time.sleep(0.2)
        for argv in (["--seed", "2"], ["--overwrite"], ["--resume", out]):
            code, err = cli(["--quick", "--config", tiny, "--out", out, "--no-eval", "--no-progress", *argv], capsys)
            one_line_error(code, err, "is in use by another job", f"pid {first.pid}")
        assert first.poll() is None  # the first job was not disturbed
    finally:
        first.kill()
        first.wait(timeout=30)
    rows = (out / "losses.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and all(r.count(",") == rows[0].count(",") for r in rows)


# --- 3. divergence ---------------------------------------------------------------------------------------

def test_divergence_stops_keeps_last_good_checkpoint_and_exits_3(tmp_path, tiny, capsys):
    out = tmp_path / "nan"
    # lr 1e6: the loss is ~1e16 at steps 1-2 (weights still finite, checkpoint at 2), NaN from step 3
    code, err = cli(["--quick", "--config", tiny, "--out", out, "--no-progress", "--iterations", "20",
                     "--lr", "1e6", "--log-every", "2", "--ckpt-every", "2"], capsys)
    assert code == 3, err
    assert "training diverged" in err and "non-finite at step 3" in err and "last.pt (step 2)" in err
    assert "Traceback" not in err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for k in ("eps", "ema_eps") for v in state[k].values())
    assert not (out / "results.md").exists()  # no evaluation of a diverged run


@pytest.mark.parametrize("flag,value", [("--ema-decay", "2"), ("--ema-decay", "-0.1"), ("--lr", "-1"),
                                        ("--lr", "nan"), ("--eval-batch", "0"), ("--threads", "-2"),
                                        ("--device", "bogus"), ("--delta-tau", "-1"), ("--delta-tau", "1.5"),
                                        ("--iterations", "0"), ("--log-every", "x"), ("--eval-steps", "20,abc"),
                                        ("--seed", "-3"), ("--batch-size", "0")])
def test_bad_flag_values_are_one_line_before_anything(tmp_path, tiny, capsys, flag, value):
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "r", flag, value], capsys)
    one_line_error(code, err, flag)
    assert not (tmp_path / "r").exists()


# --- 4. resume -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,expect", [
    (["--dataset", "svhn", "--data-root", "."], "fixes dataset"),
    (["--lr", "0.5"], "fixes lr (checkpoint 0.001, asked 0.5)"),
    (["--seed", "3"], "fixes seed"),
    (["--iterations", "3"], "is at step 4, and --iterations 3 is not beyond it"),
    (["--out", "elsewhere"], "--out elsewhere differs"),
    (["--overwrite"], "choose one"),
])
def test_resume_conflicts_are_errors(trained, tmp_path, tiny, capsys, argv, expect):
    run = _copy(trained, tmp_path / "A")
    before = (run / "config.json").read_text()
    code, err = cli(["--config", tiny, "--resume", run, "--no-eval", *argv], capsys)
    one_line_error(code, err, expect)
    assert (run / "config.json").read_text() == before and _step(run) == 4


def test_resume_states_its_allowed_overrides(trained, tmp_path, tiny, capsys):
    run = _copy(trained, tmp_path / "A")
    err = _train(tiny, run, capsys, "--resume", run, iterations=6)
    assert "with iterations 4 -> 6" in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["iterations"] == 6 and cfg["resumes"] == [{"at_step": 4, "changed": {"iterations": [4, 6]}}]
    assert _step(run) == 6
    info = json.loads(next(run.glob("run_info_resume_*.json")).read_text())
    assert info["changed_on_resume"] == {"iterations": [4, 6]}


def test_resume_of_a_file_that_is_not_a_training_checkpoint(tmp_path, capsys):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    code, err = cli(["--resume", tmp_path / "model.pt", "--no-eval"], capsys)
    one_line_error(code, err, "is not a training checkpoint")


# --- 5. config files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,expect", [
    (b'{"iteratons": 5}', "unknown key 'iteratons'"),
    (b'{"iterations": "5"}', "iterations must be an integer"),
    (b'{"iterations": true}', "iterations must be an integer"),
    (b'{"eval": {"steps": [20, "x"]}}', "eval.steps must be"),
    (b'{"eval": {"bogus": 1}}', "unknown key 'eval.bogus'"),
    (b'{"ema_decay": 1.0}', "ema_decay must be"),
    (b'{"ckpt_every": 3}', "ckpt_every (3) must be a multiple of log_every"),
    (b'[1, 2]', "must hold a JSON object"),
    (b'null', "must hold a JSON object"),
    (b'\xff\xfe{"a": 1}', "is not UTF-8"),
    (b'{"lr": 0.1,}', "is not valid JSON"),
])
def test_config_is_validated_against_the_schema(tmp_path, capsys, content, expect):
    p = tmp_path / "c.json"
    p.write_bytes(content)
    code, err = cli(["--quick", "--config", p, "--out", tmp_path / "r", "--no-eval"], capsys)
    one_line_error(code, err, expect)
    assert not (tmp_path / "r").exists()


def test_seed_in_config_is_kept(tmp_path, tiny, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(dict(TINY, seed=5)))
    _train(str(p), tmp_path / "r", capsys, iterations=2)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["seed"] == 5


# --- 6. more user errors, all before training -----------------------------------------------------------

def test_dataset_smaller_than_a_batch(tmp_path, tiny, capsys):
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "r", "--batch-size", "4000", "--no-eval"], capsys)
    one_line_error(code, err, "fewer than one batch of 4000")
    assert not (tmp_path / "r").exists()


def test_eval_and_export_user_errors(trained, tmp_path, capsys):
    code, err = cli(["eval", "--run", trained, "--rows", "xx", "--no-progress"], capsys)
    one_line_error(code, err, "eval.rows")
    code, err = cli(["eval", "--run", trained, "--rows", "em", "--steps", "abc"], capsys)
    one_line_error(code, err, "--steps")
    (tmp_path / "afile").write_text("x")
    code, err = cli(["export", "--run", trained, "--to", tmp_path / "afile", "--allow-quick"], capsys)
    one_line_error(code, err, "not a finished run folder")  # a run trained with --no-eval has no table
    fake = _copy(trained, tmp_path / "done")
    for f in ("results.md", "samples_overview.png", "digits_fd_vs_nfe.png"):
        (fake / f).write_text("x")
    code, err = cli(["export", "--run", fake, "--to", tmp_path / "afile", "--allow-quick"], capsys)
    one_line_error(code, err, "is a file, not a folder")
    # a timing.json without its keys (a run whose evaluation was redone by `eval`): exported, times not recorded
    (fake / "timing.json").write_text("{}")
    code, err = cli(["export", "--run", fake, "--to", tmp_path / "docs", "--allow-quick"], capsys)
    assert code == 0, err
    assert "Evaluation: not recorded" in (tmp_path / "docs" / "digits_results.md").read_text()


def test_compile_flag_recorded_and_checked(tmp_path, tiny, capsys):
    """--compile wraps the networks (here with the cheap 'eager' backend: dynamo tracing without code
    generation) and is recorded in the config; checkpoint keys do not depend on it."""
    _train(tiny, tmp_path / "c", capsys, "--compile", "eager", iterations=1)
    state = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["compile"] == "eager"
    assert not any("_orig_mod" in k for k in state["eps"])
    code, err = cli(["--quick", "--config", tiny, "--out", tmp_path / "d", "--compile", "nosuchbackend"], capsys)
    one_line_error(code, err, "--compile nosuchbackend: unknown backend")
    assert not (tmp_path / "d").exists()


def test_guard_turns_a_deep_system_exit_into_one_line(capsys):
    """`images.train` used to raise SystemExit(message), which the CLI's guard did not catch."""
    import sys as _sys

    from train.run import guarded

    def job(args):
        _sys.exit("resume it with the same number of processes\n(got 2)")

    code, err = guarded(job, None), capsys.readouterr().err
    one_line_error(code, err, "resume it with the same number of processes (got 2)")
    with pytest.raises(SystemExit):  # a plain exit status passes through untouched
        guarded(lambda args: _sys.exit(0), None)
