"""FID path (pytorch-fid's Inception built offline, here with random weights) against pytorch-fid's own
functions, the missing-weights message, and the digits-FD classifier features."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.evaluation import fid



@pytest.fixture(scope="module")
def inception():
    return fid.build_inception(random_weights=True)


def test_features_match_pytorch_fid_on_png_files(tmp_path, inception):
    """Our tensor pipeline (quantise to 8 bits, /255, pytorch-fid's InceptionV3) gives the activations
    that pytorch-fid's get_activations computes from the same images saved as PNG files."""
    from pytorch_fid.fid_score import get_activations

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    x[1] = x[1].mean(0, keepdim=True)  # one grey image, stored as RGB
    files = []
    for i, img in enumerate(fid.to_uint8(x)):
        p = tmp_path / f"{i}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        files.append(p)
    ref = get_activations(files, inception, batch_size=3, dims=2048, device="cpu", num_workers=0)
    ours = fid.InceptionFeatures(inception, batch=3)(x).numpy()
    assert ours.shape == (3, 2048) and np.isfinite(ours).all()
    assert np.abs(ours).max() > 1e-3  # the random network is not dead, so the comparison means something
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # grayscale (B, 1, H, W) input is replicated to RGB exactly like the grey RGB image above
    grey = fid.InceptionFeatures(inception, batch=3)(x[1:2, :1]).numpy()
    np.testing.assert_allclose(grey[0], ref[1], rtol=1e-5, atol=1e-6)


def test_stats_match_numpy_and_frechet_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 2.0
    b = rng.normal(size=(200, 16)) * 1.5
    sa = fid.Stats(16).add(torch.from_numpy(a[:120])).add(torch.from_numpy(a[120:]))  # streamed in two parts
    mu, sigma = sa.mu_sigma()
    np.testing.assert_allclose(mu, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
    # packing (what DDP all-reduces) and unpacking loses nothing
    half1, half2 = fid.Stats(16).add(torch.from_numpy(a[:100])), fid.Stats(16).add(torch.from_numpy(a[100:]))
    merged = fid.Stats.unpack(half1.packed() + half2.packed(), 16)
    np.testing.assert_allclose(merged.mu_sigma()[1], sigma, rtol=1e-10, atol=1e-10)
    mb, sb = fid.Stats(16).add(torch.from_numpy(b)).mu_sigma()
    d = fid.frechet_distance(mu, sigma, mb, sb)
    assert d == pytest.approx(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                                         np.cov(b, rowvar=False)), rel=1e-8)
    assert d > 10 and fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_weights_file_loads_from_hub_cache(tmp_path, inception, monkeypatch):
    ckdir = tmp_path / "hub" / "checkpoints"
    ckdir.mkdir(parents=True)
    torch.save(fid._random_state_dict(), ckdir / fid.INCEPTION_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert fid.find_weights() == ckdir / fid.INCEPTION_FILE
    net = fid.build_inception()  # from the hub cache, offline
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(fid.InceptionFeatures(net)(x), fid.InceptionFeatures(inception)(x), rtol=0, atol=0)


def test_missing_weights_message(tmp_path, monkeypatch, capsys):
    from pytorch_fid.inception import FID_WEIGHTS_URL

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(fid.InceptionWeightsMissing) as e:
        fid.find_weights()
    msg = str(e.value)
    assert FID_WEIGHTS_URL in msg and str(tmp_path / "empty_hub" / "checkpoints" / fid.INCEPTION_FILE) in msg
    assert "--inception-weights" in msg
    with pytest.raises(fid.InceptionWeightsMissing, match="does not exist"):
        fid.find_weights(tmp_path / "nope.pth")
    # the CLI stops with the instructions and exit code 2, before looking at the run's checkpoints
    from train.run import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main(["eval", "--fid", "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert FID_WEIGHTS_URL in err and "Traceback" not in err


def test_digits_classifier_features_and_fd(tmp_path, monkeypatch):
    from train.evaluation import digits_classifier as dc
    from train.data.datasets import load_digits_tensor

    net, acc = dc.get_classifier(tmp_path, epochs=6)
    assert acc > 0.9  # 6 epochs on 1437 digits; the full recipe (12 epochs) does better
    # cached: the second call must not train again
    monkeypatch.setattr(dc, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    net2, acc2 = dc.get_classifier(tmp_path, epochs=6)
    assert acc2 == acc
    x, y = load_digits_tensor(16)
    feats = dc.DigitsFeatures(net2)
    f = feats(x)
    assert f.shape == (1797, dc.FEATURE_DIMS) and f.dtype == torch.float64
    torch.testing.assert_close(f, dc.DigitsFeatures(net)(x))
    ref = fid.Stats(feats.dims).add(f).mu_sigma()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(1797, generator=g)
    fd_real = fid.frechet_distance(*fid.Stats(feats.dims).add(f[perm[:400]]).mu_sigma(), *ref)
    fd_noise = fid.frechet_distance(*fid.Stats(feats.dims).add(feats(torch.rand(400, 1, 16, 16) * 2 - 1)).mu_sigma(), *ref)
    only_ones = fid.frechet_distance(*fid.Stats(feats.dims).add(f[y == 1]).mu_sigma(), *ref)
    assert fd_real < only_ones < fd_noise  # real < mode-collapsed (one class) < noise
    assert fd_noise > 10 * fd_real


def test_eval_fid_end_to_end_with_local_weights(tmp_path, capsys):
    """`run.py eval --fid` on a trained (1-step) digits run, weights from --inception-weights: reference
    statistics from the dataset (cached), EM and Predict-Project cells, fid_results.* written."""
    import csv
    import json

    from train.engine.config import Config
    from train.jobs import image_training as training_loop
    from train.run import main

    cfg = json.loads((Path(__file__).resolve().parents[1] / "train" / "configs" / "quick.json").read_text())
    cfg.update(seed=0, iterations=1, batch_size=8, log_every=1, ckpt_every=1)
    run = tmp_path / "runs" / "digits-x"
    training_loop.train(Config.from_dict(cfg), run, progress=False)
    weights = tmp_path / fid.INCEPTION_FILE
    torch.save(fid._random_state_dict(), weights)
    args = ["eval", "--fid", "--run", str(run), "--inception-weights", str(weights), "--samples", "3", "--batch", "3",
            "--steps", "2", "--ref-samples", "5", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    with open(run / "fid_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["row"], int(r["nfe"])) for r in rows} == {("em", 2), ("pp", 4)}
    assert all(r["metric"] == "FID" and int(r["n_samples"]) == 3 and np.isfinite(float(r["value"])) for r in rows)
    assert (run / "fid_results.md").is_file() and (run / "fid_vs_nfe.png").is_file()
    assert (run / "samples" / "fid_pp_N2.png").is_file() and (run / "fid_samples_overview.png").is_file()
    cached = list((tmp_path / "runs" / ".cache").glob("fid_ref_digits_16_5_*.npz"))
    assert len(cached) == 1
    mu, sigma = fid.load_stats(cached[0])
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert "| Predict-Project |" in capsys.readouterr().out
