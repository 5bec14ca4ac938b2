"""Dataset loaders on tiny files in each exact on-disk format, and the clear errors for bad data."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_support import cli
from train.data.datasets import CelebA, LSUNChurch, SVHN, load_digits_tensor, make_dataset
from train.engine.errors import DatasetError

ROOT = Path(__file__).resolve().parents[1]


def _framed(w, h, inner_w, inner_h):
    """RGB image w x h: white centred inner_w x inner_h box, black elsewhere."""
    a = np.zeros((h, w, 3), np.uint8)
    top, left = (h - inner_h) // 2, (w - inner_w) // 2
    a[top:top + inner_h, left:left + inner_w] = 255
    return Image.fromarray(a)


def _jpeg_bytes(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --- digits ------------------------------------------------------------------------------------------

def test_digits_shape_range_and_labels():
    x, y = load_digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert torch.equal(torch.unique(y), torch.arange(10))
    # bilinear upsampling keeps the mean of the 8x8 image up to border effects
    x8, _ = load_digits_tensor(8)
    assert torch.allclose(x.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.05)


# --- CelebA --------------------------------------------------------------------------------------------

def test_celeba_center_crop_140_resize_64(tmp_path):
    d = tmp_path / "img_align_celeba"
    d.mkdir()
    # white exactly inside the central 140x140 crop of a 178x218 image: the result must be all white
    _framed(178, 218, 140, 140).save(d / "000001.jpg", quality=100)
    rng = np.random.default_rng(0)
    for i in (2, 3):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(d / f"{i:06d}.jpg")
    ds = make_dataset("celeba", tmp_path, 64)
    assert isinstance(ds, CelebA) and len(ds) == 3
    x0 = ds[0]
    assert x0.shape == (3, 64, 64) and x0.dtype == torch.float32
    assert float(x0.min()) > 0.9  # nothing of the black frame leaked in (JPEG ringing < 5%)
    for i in range(3):
        x = ds[i]
        assert x.shape == (3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_celeba_errors(tmp_path):
    with pytest.raises(DatasetError, match="img_align_celeba"):
        make_dataset("celeba", tmp_path, 64)
    (tmp_path / "img_align_celeba").mkdir()
    with pytest.raises(DatasetError, match=r"no \*\.jpg"):
        make_dataset("celeba", tmp_path, 64)
    (tmp_path / "img_align_celeba" / "000001.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match="cannot read CelebA image"):
        make_dataset("celeba", tmp_path, 64)
    with pytest.raises(DatasetError, match="needs --data-root"):
        make_dataset("celeba", None, 64)
    with pytest.raises(DatasetError, match="does not exist"):
        make_dataset("celeba", tmp_path / "nope", 64)


# --- LSUN church (LMDB) ---------------------------------------------------------------------------------

def _lmdb(path, values):
    import lmdb

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, v in enumerate(values):
            txn.put(f"{i:040x}".encode(), v)
    env.close()


def test_lsun_lmdb_resize_shorter_side_and_center_crop(tmp_path):
    db = tmp_path / "church_outdoor_train_lmdb"
    # 256x128: shorter side 128 -> 64 (x0.5), width 128, central 64 columns = central 128 of the original
    wide = _framed(256, 128, 128, 128)
    tall = _framed(96, 160, 96, 96)  # 96x160 -> 64x106, central 64 rows = central 96 of the original
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8))
    _lmdb(db, [_jpeg_bytes(wide, "PNG"), _jpeg_bytes(tall, "WEBP"), _jpeg_bytes(noise, "JPEG")])
    ds = make_dataset("lsun_church", tmp_path, 64)
    assert isinstance(ds, LSUNChurch) and len(ds) == 3
    for i in range(3):
        x = ds[i]
        assert x.shape == (3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
    # interior all white; bicubic at the crop edge may blend one column/row of the frame
    assert float(ds[0][:, :, 2:-2].min()) > 0.95
    assert float(ds[1][:, 2:-2, :].min()) > 0.9
    # the dataset survives pickling (DataLoader workers) and reopens the environment lazily
    import pickle

    ds2 = pickle.loads(pickle.dumps(ds))
    assert torch.equal(ds2[2], ds[2])


def test_lsun_errors(tmp_path):
    with pytest.raises(DatasetError, match="church_outdoor_train_lmdb"):
        make_dataset("lsun_church", tmp_path, 64)
    db = tmp_path / "church_outdoor_train_lmdb"
    _lmdb(db, [b"\x00garbage bytes, not an image"])
    with pytest.raises(DatasetError, match="cannot decode LSUN entry"):
        make_dataset("lsun_church", tmp_path, 64)
    empty = tmp_path / "e"
    _lmdb(empty / "church_outdoor_train_lmdb", [])
    with pytest.raises(DatasetError, match="no entries"):
        make_dataset("lsun_church", empty, 64)


# --- SVHN ------------------------------------------------------------------------------------------------

def test_svhn_mat_layout(tmp_path):
    import scipy.io

    n = 5
    X = np.random.default_rng(2).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    X[..., 0] = 255
    X[:, :, 0, 1] = 0  # image 1: red channel black, others random
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": X, "y": np.arange(1, n + 1).reshape(n, 1)})
    ds = make_dataset("svhn", tmp_path, 64)
    assert isinstance(ds, SVHN) and len(ds) == n
    x0 = ds[0]
    assert x0.shape == (3, 64, 64) and torch.allclose(x0, torch.ones_like(x0))
    assert torch.allclose(ds[1][0], -torch.ones(64, 64))  # channel order (H, W, C, N) -> (C, H, W)
    x3 = ds[3]
    assert float(x3.min()) >= -1 and float(x3.max()) <= 1
    # resampling preserves the mean of each channel (antialiased bilinear, up to edge effects)
    src = torch.from_numpy(X[..., 3].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(x3.mean((1, 2)), src.mean((1, 2)), atol=0.03)


def test_svhn_errors(tmp_path):
    import scipy.io

    with pytest.raises(DatasetError, match="train_32x32.mat"):
        make_dataset("svhn", tmp_path, 64)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated junk")
    with pytest.raises(DatasetError, match="cannot read"):
        make_dataset("svhn", tmp_path, 64)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((28, 28, 5), np.uint8)})
    with pytest.raises(DatasetError, match=r"X of shape \(28, 28, 5\)"):
        make_dataset("svhn", tmp_path, 64)


# --- the CLI turns these into one message and exit code 2 ----------------------------------------------------

@pytest.mark.parametrize("dataset,expect", [("celeba", "img_align_celeba"), ("lsun_church", "church_outdoor_train_lmdb"),
                                            ("svhn", "train_32x32.mat")])
def test_cli_missing_dataset_exit_2(tmp_path, capsys, dataset, expect):
    from train.run import main

    code = main(["--dataset", dataset, "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs"),
                 "--no-eval", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written before the data is known to be there


def test_cli_script_corrupt_dataset_no_traceback(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    (tmp_path / "img_align_celeba" / "a.jpg").write_bytes(b"junk")
    r = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), "--dataset", "celeba", "--data-root",
                        str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--no-eval"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "cannot read CelebA image" in r.stderr and "Traceback" not in r.stderr


# --- issue 9: data read wrongly or reported late ----------------------------------------------------------

def test_svhn_float_x_is_scaled_not_truncated(tmp_path):
    """A re-saved SVHN whose X is float in [0, 1] used to become all-black images (astype(uint8))."""
    import scipy.io

    X = np.random.default_rng(3).integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    (tmp_path / "u").mkdir()
    (tmp_path / "f").mkdir()
    (tmp_path / "g").mkdir()
    scipy.io.savemat(tmp_path / "u" / "train_32x32.mat", {"X": X})
    scipy.io.savemat(tmp_path / "f" / "train_32x32.mat", {"X": X.astype(np.float32) / 255.0})
    scipy.io.savemat(tmp_path / "g" / "train_32x32.mat", {"X": X.astype(np.float64)})  # floats in [0, 255]
    ref = make_dataset("svhn", tmp_path / "u", 32)
    for d in ("f", "g"):
        ds = make_dataset("svhn", tmp_path / d, 32)
        assert all(torch.equal(ds[i], ref[i]) for i in range(4))
    scipy.io.savemat(tmp_path / "f" / "train_32x32.mat", {"X": X.astype(np.float32) - 300})
    with pytest.raises(DatasetError, match=r"values outside \[0, 255\]"):
        make_dataset("svhn", tmp_path / "f", 32)


def _celeba(root, n=8, bad=None, bad_bytes=b"not a jpeg"):
    d = root / "img_align_celeba"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        p = d / f"{i:06d}.jpg"
        if i == bad:
            p.write_bytes(bad_bytes)
        else:
            Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(p, quality=80)
    return d


def _tiny_cfg(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"resolution": 16, "net": {"model_channels": 16, "head_channels": 32}}')
    return str(p)


def test_celeba_empty_file_mid_folder_named_at_start(tmp_path, capsys):
    d = _celeba(tmp_path, bad=5, bad_bytes=b"")
    code, err = cli(["--quick", "--dataset", "celeba", "--data-root", tmp_path, "--out", tmp_path / "r",
                      "--no-eval"], capsys)
    assert code == 2 and f"CelebA image {d / '000005.jpg'} is empty" in err and len(err.strip().splitlines()) == 1


def test_celeba_corrupt_image_mid_folder_is_one_line(tmp_path, capsys):
    """A corrupt JPEG that is not the first file: --check-data names it before training; without it,
    training with DataLoader workers names it in one line (not a worker's traceback)."""
    d = _celeba(tmp_path, bad=5)
    base = ["--quick", "--dataset", "celeba", "--data-root", tmp_path, "--config", _tiny_cfg(tmp_path), "--no-eval",
            "--no-progress", "--batch-size", "8", "--iterations", "2", "--num-workers", "2", "--threads", "1"]
    code, err = cli(base + ["--out", tmp_path / "r1", "--check-data"], capsys)
    assert code == 2 and f"cannot read CelebA image {d / '000005.jpg'}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r1").exists()
    code, err = cli(base + ["--out", tmp_path / "r2"], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1 and f"cannot read CelebA image {d / '000005.jpg'}" in lines[0], err
    assert "Traceback" not in err and "worker" not in lines[0]


def test_lsun_trains_with_dataloader_workers(tmp_path, capsys):
    """`--quick --dataset lsun_church` with workers > 0 stopped with 'The environment ... is already open
    in this process': the LMDB opened in the main process was seen again in the forked worker."""
    rng = np.random.default_rng(4)
    _lmdb(tmp_path / "church_outdoor_train_lmdb",
          [_jpeg_bytes(Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)), "PNG") for _ in range(8)])
    code, err = cli(["--quick", "--dataset", "lsun_church", "--data-root", tmp_path, "--config",
                      _tiny_cfg(tmp_path), "--out", tmp_path / "r", "--no-eval", "--no-progress", "--batch-size", "4",
                      "--iterations", "2", "--log-every", "1", "--ckpt-every", "2", "--num-workers", "2",
                      "--threads", "1", "--check-data"], capsys)
    assert code == 0, err
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["num_workers"] == 2
