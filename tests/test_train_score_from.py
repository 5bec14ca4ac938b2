"""`train/run.py train --score-from PATH` (issue 15): T trained alone on a frozen score someone already has,
a diffusers UNet2DModel folder or a wgfcore run. The score's files stay bitwise unchanged, the run holds T
(checkpoint and export format), eval and resume work as for every job, and bad sources are one line, exit 2,
before any training (and before the run folder is claimed)."""
import hashlib
import json
import shutil

import pytest
import torch

from cli_support import cli, one_line_error
from wgfcore.pretrained import load_predict_project, load_projection
from wgfcore.sample import sample

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra: pip install 'wgfcore[test]'")

#: a small T and budget (the --quick digits config underneath: 16x16, 1 channel)
TINY = {"batch_size": 8, "log_every": 2, "ckpt_every": 2, "warmup": 2,
        "net": {"model_channels": 16, "head_channels": 32},
        "eval": {"steps": [3], "samples": 6, "batch": 6, "grid": 6, "bootstrap": 0}}


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def save_unet(folder, scheduler=True, **kw):
    args = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=8)
    args.update(kw)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**args)
    with torch.no_grad():  # a non-trivial epsilon (diffusers zero-initialises nothing that matters here)
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    unet.save_pretrained(folder)
    if scheduler:
        diffusers.DDPMScheduler().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_from")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    return {"root": root, "cfg": str(cfg), "unet": save_unet(root / "unet"), "cache": root / "cache"}


def train(env, out, capsys, *extra, iterations=4, evaluate=False):
    code, err = cli(["--quick", "--config", env["cfg"], "--out", out, "--no-progress", "--threads", "1",
                     "--iterations", iterations, *extra,
                     *(["--cache-dir", env["cache"]] if evaluate else ["--no-eval"])], capsys)
    assert code == 0, err
    return err


@pytest.mark.slow  # eval --quick: the whole small table, and the digits classifier
def test_diffusers_score_end_to_end(env, tmp_path, capsys):
    before = digest(env["unet"])
    run = tmp_path / "run"
    err = train(env, run, capsys, "--score-from", env["unet"], evaluate=True)  # with a 6-sample table
    assert "training T only" in err
    assert digest(env["unet"]) == before  # the frozen score: never written, no lock file in its folder
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and "ema_proj" in state and "ema_eps" not in state and "eps" not in state
    rec = json.loads((run / "config.json").read_text())["score_from"]
    assert rec["kind"] == "diffusers" and rec["path"] == str(env["unet"].resolve()) and len(rec["sha256"]) == 64
    # T in the export format, bitwise the checkpoint's EMA
    net, meta = load_projection(run / "projection")
    assert meta["score_from"]["sha256"] == rec["sha256"] and (run / "projection" / "model.safetensors").is_file()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state["ema_proj"].items())
    # the one Python call samples with it
    pp = load_predict_project(run)
    x = sample(pp.score_fn, (3, *pp.sample_shape), 4, "predict_project", proj_fn=pp.proj_fn, seed=0)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    # eval --quick: EM from the frozen score, PP with T
    code, err = cli(["eval", "--run", run, "--quick", "--no-progress", "--cache-dir", env["cache"]], capsys)
    assert code == 0, err
    table = (run / "results.md").read_text()
    assert "Predict-Project" in table and "Score-based (EM)" in table
    assert digest(env["unet"]) == before
    code, err = cli(["export", "--run", run, "--to", tmp_path / "docs", "--name", "sf", "--allow-quick"], capsys)
    assert code == 0, err
    assert "frozen diffusers score" in (tmp_path / "docs" / "sf_results.md").read_text()
    assert load_projection(tmp_path / "docs" / "sf_projection")[1]["step"] == 4


def test_wgfcore_run_as_score_width_and_resume(env, tmp_path, capsys):
    joint = tmp_path / "joint"
    train(env, joint, capsys)
    before = digest(joint)
    full, part = tmp_path / "full", tmp_path / "part"
    train(env, full, capsys, "--score-from", joint, "--proj-width", "0.5", iterations=6)
    train(env, part, capsys, "--score-from", joint, "--proj-width", "0.5", iterations=4)
    assert digest(joint) == before
    err = train(env, part, capsys, "--resume", part, iterations=6)  # --score-from need not be repeated
    a, b = (torch.load(r / "checkpoints" / "last.pt", weights_only=True) for r in (full, part))
    assert a["step"] == b["step"] == 6
    for k in ("proj", "ema_proj"):  # resumed exactly
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k])
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["proj_net"] == {"model_channels": 8, "head_channels": 16} and cfg["score_from"]["kind"] == "wgfcore"
    assert load_projection(full / "projection")[0].model_channels == 8
    # resume refuses another score, and a joint run refuses --score-from
    code, err = cli(["--quick", "--config", env["cfg"], "--resume", part, "--iterations", 8, "--no-eval",
                     "--score-from", env["unet"]], capsys)
    one_line_error(code, err, "differs")
    code, err = cli(["--quick", "--config", env["cfg"], "--resume", joint, "--iterations", 8, "--no-eval",
                     "--score-from", env["unet"]], capsys)
    one_line_error(code, err, "jointly trained")
    assert digest(joint) == before


def _changed(src, dst, **config):
    shutil.copytree(src, dst)
    for name, change in config.items():
        p = dst / f"{name}.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    return dst


def test_bad_sources_fail_in_one_line_before_training(env, tmp_path, capsys):
    u = env["unet"]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_sched = save_unet(tmp_path / "nosched", scheduler=False)
    rgb = save_unet(tmp_path / "rgb", in_channels=3, out_channels=3)
    joint = tmp_path / "joint"
    train(env, joint, capsys)
    unfinished = shutil.copytree(joint, tmp_path / "unfinished")
    state = torch.load(unfinished / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["iterations"] = 8
    torch.save(state, unfinished / "checkpoints" / "last.pt")
    cases = [
        (empty, "is neither a wgfcore run folder"),
        (tmp_path / "nowhere", "does not exist"),
        (_changed(u, tmp_path / "cond", config={"_class_name": "UNet2DConditionModel"}), "unconditional UNet2DModel"),
        (_changed(u, tmp_path / "ve", scheduler_config={"_class_name": "ScoreSdeVeScheduler"}), "no DDPM beta table"),
        (_changed(u, tmp_path / "beta", scheduler_config={"beta_schedule": "exp"}), "not a DDPM beta table"),
        (_changed(u, tmp_path / "pred", scheduler_config={"prediction_type": "flow"}), "prediction_type 'flow'"),
        (no_sched, "no scheduler_config.json"),
        (_changed(u, tmp_path / "size", config={"sample_size": 32}), "1-channel images of 32x32"),
        (rgb, "takes 3-channel images"),
        (unfinished, "no finished checkpoint"),
    ]
    for i, (src, msg) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, err = cli(["--quick", "--config", env["cfg"], "--out", out, "--no-eval", "--score-from", src], capsys)
        one_line_error(code, err, msg)
        assert not out.exists() or not any(out.iterdir()), f"{src}: the run folder was claimed"
    code, err = cli(["--dataset", "gmm", "--quick", "--score-from", u], capsys)
    one_line_error(code, err, "--score-from")
    code, err = cli(["--quick", "--config", env["cfg"], "--out", tmp_path / "w", "--proj-width", "0.3", "--no-eval",
                     "--score-from", u], capsys)
    one_line_error(code, err, "--proj-width 0.3")


def test_eval_refuses_a_changed_score(env, tmp_path, capsys):
    score = save_unet(tmp_path / "score")
    run = tmp_path / "run"
    train(env, run, capsys, "--score-from", score, iterations=2)
    m = diffusers.UNet2DModel.from_pretrained(str(score))
    with torch.no_grad():
        next(iter(m.parameters())).mul_(1.5)
    m.save_pretrained(score)
    code, err = cli(["eval", "--run", run, "--quick", "--cache-dir", env["cache"]], capsys)
    one_line_error(code, err, "has changed since T was trained")
    code, err = cli(["--quick", "--config", env["cfg"], "--resume", run, "--iterations", 4, "--no-eval"], capsys)
    one_line_error(code, err, "has changed since T was trained")


def test_demonstration_studies_run(env, tmp_path, capsys):
    """The two studies behind docs/score_from.md, at toy size: a diffusers UNet2DModel trained on the digits
    and loaded back through --score-from, and the paired comparison of a separate T with a joint one."""
    model = tmp_path / "dd"
    code, err = cli(["diffusers-digits", "--out", model, "--iterations", 2, "--no-progress"], capsys)
    assert code == 0, err
    assert diffusers.UNet2DModel.from_pretrained(str(model)).config.sample_size == 16
    assert json.loads((model / "scheduler_config.json").read_text())["_class_name"] == "DDPMScheduler"
    train(env, tmp_path / "on_dd", capsys, "--score-from", model, iterations=2)
    joint, sep = tmp_path / "joint", tmp_path / "sep"
    train(env, joint, capsys, iterations=2)
    train(env, sep, capsys, "--score-from", joint, iterations=2)
    doc = tmp_path / "cmp.md"
    code, err = cli(["compare-projections", "--pair", f"{joint}:{sep}", "--steps", 3, "--samples", 6, "--batch", 6,
                     "--bootstrap", 5, "--doc", doc, "--cache-dir", env["cache"], "--no-progress"], capsys)
    assert code == 0, err
    text = doc.read_text()
    assert text.count("| sep (0) | 3 |") == 3 and "training-seed variance is not measured" in text
    code, err = cli(["compare-projections", "--pair", f"{sep}:{joint}", "--cache-dir", env["cache"]], capsys)
    one_line_error(code, err, "must be a --score-from run")


def test_overwrite_removes_only_what_the_runs_wrote(env, tmp_path, capsys):
    joint, run = tmp_path / "joint", tmp_path / "run"
    train(env, joint, capsys, iterations=2)
    train(env, run, capsys, "--score-from", joint, iterations=2)
    (run / "projection" / "notes.txt").write_text("mine")
    train(env, run, capsys, "--score-from", joint, "--overwrite", iterations=2)
    assert (run / "projection" / "notes.txt").read_text() == "mine"
    assert load_projection(run / "projection")[1]["step"] == 2
    # the diffusers study: a folder it did not write is refused; its own earlier output only with --overwrite
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    code, err = cli(["diffusers-digits", "--out", tmp_path / "busy", "--iterations", 1], capsys)
    one_line_error(code, err, "is not empty")
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "x"
    dd = tmp_path / "dd"
    assert cli(["diffusers-digits", "--out", dd, "--iterations", 1, "--no-progress"], capsys)[0] == 0
    one_line_error(*cli(["diffusers-digits", "--out", dd, "--iterations", 1], capsys), "--overwrite")
    assert cli(["diffusers-digits", "--out", dd, "--iterations", 1, "--overwrite", "--no-progress"], capsys)[0] == 0
