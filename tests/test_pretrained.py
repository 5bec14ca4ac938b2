"""Score sources for Predict-Project on a frozen score (wgfcore.pretrained): diffusers UNet2DModel folders
and wgfcore run folders, their refusals, the weights hash, the export format of T and the one Python call."""
import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from wgfcore import pretrained as P
from wgfcore.adapters import from_diffusers
from wgfcore.nets import UNet
from wgfcore.sde import eps_to_score
from wgfcore.scores import gaussian
from wgfcore.sde import VPSDE

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra: pip install 'wgfcore[test]'")

SDE = VPSDE()
#: a run config as train/run.py writes it (only the keys the score source reads)
CFG = {"dataset": "digits", "preset": "tiny", "net": {"model_channels": 8, "head_channels": 16},
       "proj_net": {"model_channels": 4, "head_channels": 8}, "resolution": 16, "channels": 1, "iterations": 10,
       "seed": 0}


def tiny_unet(**kw):
    args = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4)
    args.update(kw)
    return diffusers.UNet2DModel(**args)


def files_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dfolder(tmp_path_factory):
    """A UNet2DModel with save_pretrained and a DDPM scheduler config beside it."""
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    tiny_unet().save_pretrained(root / "model")
    diffusers.DDPMScheduler().save_pretrained(root / "model")
    return root / "model"


def variant(src, tmp_path, name="m", model=None, sched=None, scheduler_dir=False):
    """A copy of `src` with its model config (`model`: keys to set, None deletes) and scheduler config changed."""
    dst = tmp_path / name
    shutil.copytree(src, dst)
    for fname, change in (("config.json", model), ("scheduler_config.json", sched)):
        if change:
            cfg = json.loads((dst / fname).read_text())
            for k, v in change.items():
                cfg.pop(k) if v is None else cfg.__setitem__(k, v)
            (dst / fname).write_text(json.dumps(cfg))
    if scheduler_dir:
        (dst / "scheduler").mkdir()
        shutil.move(dst / "scheduler_config.json", dst / "scheduler" / "scheduler_config.json")
    return dst


def test_diffusers_folder_is_the_adapters_score_and_stays_unwritten(dfolder):
    before = files_digest(dfolder)
    src = P.load_score(dfolder)
    assert (src.kind, src.channels, src.resolution) == ("diffusers", 1, 16)
    assert not any(p.requires_grad for p in src.net.parameters()) and not src.net.training
    ref_unet = diffusers.UNet2DModel.from_pretrained(str(dfolder))
    ref = from_diffusers(ref_unet, diffusers.DDPMScheduler.from_pretrained(str(dfolder)))
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.002, 0.1, 0.6, 0.99])
    with torch.no_grad():
        assert torch.equal(src.score_fn(x, t), ref(x, t))
        # as a module it is an epsilon model at our VP time, like the trainer's score nets (to rounding)
        assert torch.allclose(eps_to_score(src)(x, t), ref(x, t), rtol=1e-5, atol=1e-6)
    # the hash is of the weights (and schedule), not of the file: a second load, another device copy, agree
    assert P.load_score(dfolder).sha256 == src.sha256 == P.state_sha256(
        ref_unet.state_dict(), {"prediction_type": "epsilon", "alphas_cumprod":
                                hashlib.sha256(src.score_fn.alphas_cumprod.numpy().tobytes()).hexdigest()})
    assert files_digest(dfolder) == before


def test_pipeline_layouts_and_changed_weights(dfolder, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(dfolder, pipe / "unet")
    (pipe / "scheduler").mkdir()
    shutil.move(pipe / "unet" / "scheduler_config.json", pipe / "scheduler" / "scheduler_config.json")
    (pipe / "model_index.json").write_text("{}")
    a, b = P.load_score(pipe), P.load_score(pipe / "unet")  # the pipeline root, and its unet/ beside scheduler/
    c = P.load_score(variant(dfolder, tmp_path, "sub", scheduler_dir=True))
    diffusers.UNet2DModel.from_pretrained(str(dfolder)).save_pretrained(tmp_path / "bin", safe_serialization=False)
    shutil.copy(dfolder / "scheduler_config.json", tmp_path / "bin")
    e = P.load_score(tmp_path / "bin")  # pickled .bin weights: the same weights, the same hash
    assert a.sha256 == b.sha256 == c.sha256 == e.sha256 == P.load_score(dfolder).sha256
    record = a.record()
    assert record["kind"] == "diffusers" and record["prediction_type"] == "epsilon"
    a.check_record(record)
    changed = tmp_path / "changed"
    m = diffusers.UNet2DModel.from_pretrained(str(dfolder))
    with torch.no_grad():
        next(iter(m.parameters())).add_(1e-6)
    m.save_pretrained(changed)
    shutil.copy(dfolder / "scheduler_config.json", changed)
    with pytest.raises(P.ScoreSourceError, match="has changed since"):
        P.load_score(changed).check_record(record)


class FakeModel(torch.nn.Module):
    """The exact eps, v or x0 of data N(0, v I) under a DDPM table, as diffusers' calling convention returns it."""

    def __init__(self, ab, var, kind):
        super().__init__()
        self.ab, self.var, self.kind = ab.double(), var, kind

    def forward(self, x, tau):
        ab = P.alpha_bar_at(self.ab, tau.double()).view(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = a * self.var * x.double() / (ab * self.var + 1 - ab)  # E[x0 | x]
        eps = (x.double() - a * x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.kind]
        return SimpleNamespace(sample=out.to(x.dtype))


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_v_and_x0_prediction_are_converted_exactly(kind):
    ab = diffusers.DDPMScheduler().alphas_cumprod.double()
    model = P._AsEpsilon(FakeModel(ab, 0.3, kind), ab, kind)
    score = from_diffusers(model, alphas_cumprod=ab)
    t = torch.tensor([0.003, 0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    x = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = gaussian(torch.zeros(18), 0.3 * torch.eye(18, dtype=torch.float64)).score(x.reshape(5, -1), t, SDE)
    # the model is exact at its own alpha_bar(tau); our t maps onto that level, so the score is the analytic one
    assert torch.allclose(score(x, t), exact.reshape(x.shape), rtol=1e-9, atol=1e-12)


def test_v_prediction_folder_loads(dfolder, tmp_path):
    src = P.load_score(variant(dfolder, tmp_path, sched={"prediction_type": "v_prediction"}))
    assert src.info["prediction_type"] == "v_prediction" and isinstance(src.net, P._AsEpsilon)
    assert src.sha256 != P.load_score(dfolder).sha256  # same weights, another score


BAD = [  # (what changes, message fragment)
    (dict(model={"_class_name": "UNet2DConditionModel"}), "takes an unconditional UNet2DModel"),
    (dict(model={"num_class_embeds": 10}), "class-conditional"),
    (dict(model={"time_embedding_type": "fourier"}), "fourier"),
    (dict(model={"out_channels": 2}), "out_channels"),
    (dict(model={"sample_size": [16, 8]}), "not square"),
    (dict(sched={"prediction_type": "flow"}), "prediction_type 'flow'"),
    (dict(sched={"beta_schedule": "exp"}), "not a DDPM beta table"),
    (dict(sched={"trained_betas": [0.1, 1.2, 0.3], "num_train_timesteps": 3}), "not a DDPM beta table"),
    (dict(sched={"rescale_betas_zero_snr": True}), "zero-terminal-SNR"),
    (dict(sched={"_class_name": "ScoreSdeVeScheduler"}), "no DDPM beta table"),
    (dict(sched={"_class_name": "UNet2DModel"}), "not a diffusers scheduler"),
    (dict(sched={"_class_name": "EulerDiscreteScheduler", "timestep_type": "continuous"}), "timestep_type"),
]


@pytest.mark.parametrize("change,msg", BAD, ids=[m for _, m in BAD])
def test_bad_diffusers_folders_are_refused_in_one_line(dfolder, tmp_path, change, msg):
    with pytest.raises(P.ScoreSourceError, match=msg) as e:
        P.load_score(variant(dfolder, tmp_path, **change))
    assert "\n" not in str(e.value)


def test_missing_pieces_and_neither_kind(dfolder, tmp_path):
    no_sched = variant(dfolder, tmp_path, "nosched")
    (no_sched / "scheduler_config.json").unlink()
    no_weights = variant(dfolder, tmp_path, "noweights")
    (no_weights / "diffusion_pytorch_model.safetensors").unlink()
    corrupt = variant(dfolder, tmp_path, "corrupt")
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "afile").write_text("x")
    for path, msg in [(no_sched, "no scheduler_config.json"), (no_weights, "has no weights"),
                      (corrupt, "cannot load the UNet2DModel"), (empty, "is neither"), (tmp_path / "afile", "is a file"),
                      (tmp_path / "nowhere", "does not exist")]:
        with pytest.raises(P.ScoreSourceError, match=msg) as e:
            P.load_score(path)
        assert "\n" not in str(e.value)


# --- wgfcore run folders --------------------------------------------------------------------------------------

def fake_run(folder, step=10, cfg=None, with_eps=True, seed=0):
    """A run folder in train/run.py's layout, holding a checkpoint at `step`."""
    cfg = dict(cfg or CFG)
    torch.manual_seed(seed)
    eps, proj = P.build_unet(cfg), P.build_unet(cfg, projection=True)
    for net in (eps, proj):  # the U-Net zero-initialises its output layers: give it a non-trivial output
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    state = {"step": step, "config": cfg, "ema_proj": proj.state_dict()}
    if with_eps:
        state["ema_eps"] = eps.state_dict()
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(state, folder / "checkpoints" / "last.pt")
    return folder, eps.eval(), proj.eval()


def test_wgfcore_run_gives_its_ema_score(tmp_path):
    run, eps, _ = fake_run(tmp_path / "run")
    before = files_digest(run)
    src = P.load_score(run)
    assert (src.kind, src.channels, src.resolution, src.info["step"]) == ("wgfcore", 1, 16, 10)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.8])
    with torch.no_grad():
        assert torch.equal(src.score_fn(x, t), -eps(x, t) / SDE.sigma(t).float().view(-1, 1, 1, 1))
        assert torch.equal(src(x, t), eps(x, t))
    assert src.sha256 == P.state_sha256(eps.state_dict())
    assert files_digest(run) == before
    with pytest.raises(P.ScoreSourceError, match="3-channel 16x16"):
        src.check_shape(3, 16)
    with pytest.raises(P.ScoreSourceError, match="1-channel 32x32"):
        src.check_shape(1, 32)


def test_wgfcore_runs_refused(tmp_path):
    cases = [(fake_run(tmp_path / "unfinished", step=5)[0], "no finished checkpoint: the newest, last.pt, is at step 5 of 10"),
             (fake_run(tmp_path / "gmm", cfg=dict(CFG, dataset="gmm"))[0], "gmm"),
             (fake_run(tmp_path / "projonly", cfg=dict(CFG, score_from={"path": "/x"}), with_eps=False)[0],
              "projection-only run.*came from /x")]
    nockpt = tmp_path / "nockpt"
    (nockpt / "checkpoints").mkdir(parents=True)
    (nockpt / "config.json").write_text("{}")
    cases.append((nockpt, "no readable checkpoint"))
    for path, msg in cases:
        with pytest.raises(P.ScoreSourceError, match=msg):
            P.load_score(path)
    # a finished snapshot beside an unfinished last.pt is used
    run = cases[0][0]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    torch.save(dict(state, step=10), run / "checkpoints" / "ckpt_00000010.pt")
    assert P.load_score(run).info["checkpoint"].endswith("ckpt_00000010.pt")


# --- T: export and the one call -------------------------------------------------------------------------------

@pytest.mark.parametrize("safetensors", [True, False])
def test_projection_export_roundtrip(tmp_path, monkeypatch, safetensors):
    if not safetensors:
        monkeypatch.setattr(P, "_safetensors", lambda: None)
    run, eps, proj = fake_run(tmp_path / "run")
    preset, kw = P.unet_spec(CFG, projection=True)
    path = P.save_projection(tmp_path / "T", proj, {"preset": preset, "unet": kw, "score_from": P.load_score(run).record()})
    assert path.name == ("model.safetensors" if safetensors else "model.pt")
    if not safetensors:  # tensors only: loadable without trusting pickled code
        assert set(torch.load(path, weights_only=True)) == set(proj.state_dict())
    net, meta = P.load_projection(tmp_path / "T")
    assert meta["format"] == P.FORMAT and meta["unet"]["model_channels"] == 4
    for k, v in proj.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.6])
    pp_run, pp_exp = P.load_predict_project(run), P.load_predict_project(tmp_path / "T")
    with torch.no_grad():
        for pp in (pp_run, pp_exp):
            assert pp.sample_shape == (1, 16, 16)
            assert torch.equal(pp.proj_fn(x, t), proj(x, t))
            assert torch.equal(pp.score_fn(x, t), -eps(x, t) / SDE.sigma(t).float().view(-1, 1, 1, 1))


def test_predict_project_refuses_a_changed_score(tmp_path, dfolder):
    score_dir = shutil.copytree(dfolder, tmp_path / "score")
    src = P.load_score(score_dir)
    cfg = dict(CFG, score_from=src.record())
    run, _, _ = fake_run(tmp_path / "run", cfg=cfg, with_eps=False)
    pp = P.load_predict_project(run)
    from wgfcore.sample import sample

    x = sample(pp.score_fn, (2, *pp.sample_shape), 3, "predict_project", proj_fn=pp.proj_fn, seed=0)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    m = diffusers.UNet2DModel.from_pretrained(str(score_dir))
    with torch.no_grad():
        next(iter(m.parameters())).mul_(2)
    m.save_pretrained(score_dir)
    with pytest.raises(P.ScoreSourceError, match="has changed since T was trained"):
        P.load_predict_project(run)
    P.load_predict_project(run, score_from=dfolder)  # the original, elsewhere: same hash, accepted


def test_unet_spec_is_the_run_configs_net():
    preset, kw = P.unet_spec(CFG)
    assert (preset, kw) == ("tiny", {"model_channels": 8, "head_channels": 16, "img_resolution": 16, "in_channels": 1})
    assert P.build_unet(CFG, projection=True).model_channels == 4
    assert isinstance(P.build_unet(CFG), UNet)
