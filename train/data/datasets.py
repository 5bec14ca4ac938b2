"""Image datasets for the trainer: the built-in digits set and the paper's CelebA, LSUN church, SVHN.

Every dataset yields float32 tensors (C, H, W) in [-1, 1]. A missing or unreadable dataset raises
`DatasetError` with a message that says what was expected where (train/run.py turns it into exit 2).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..engine.errors import DatasetError, one_line as _one_line

#: datasets and their native layout, used in error messages and --help
LAYOUTS = {
    "celeba": "img_align_celeba/*.jpg (the aligned CelebA JPEGs, 178x218)",
    "lsun_church": "church_outdoor_train_lmdb/ (the LSUN church_outdoor LMDB: data.mdb, lock.mdb)",
    "svhn": "train_32x32.mat (SVHN format 2, X of shape (32, 32, 3, N) uint8, y of shape (N, 1))",
}
DIGITS_INFO = ("scikit-learn's bundled load_digits: 1797 real 8x8 handwritten digits (UCI optdigits test set), "
               "pixel values 0..16, bilinearly upsampled to 16x16 and scaled to [-1, 1]")


def worker_error_message(msg: str) -> str:
    """The original one-line message of a DatasetError re-raised by a DataLoader (which prefixes it
    with "Caught DatasetError in DataLoader worker process k" and the worker's traceback)."""
    if "Original Traceback" not in msg:
        return msg
    last = [line for line in msg.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if "Error: " in last else last


def check_data(dataset, num_workers: int = 0, progress: bool = False) -> int:
    """Decode every item of `dataset` once (the --check-data pre-flight); DatasetError names the first
    file that fails. Returns the number of items checked."""
    from tqdm.auto import tqdm

    if getattr(dataset, "data", None) is not None:
        return len(dataset)
    if num_workers > 0 and hasattr(dataset, "release"):
        dataset.release()
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=num_workers)
    n = 0
    try:
        for x in tqdm(loader, desc="check data", disable=not progress):
            n += x.shape[0]
    except DatasetError as e:
        raise DatasetError(worker_error_message(str(e))) from None
    return n


def _expected(name: str, root) -> str:
    return (f"expected --data-root to be the folder holding {LAYOUTS[name]}; "
            f"got --data-root {str(root)!r}")


def _to_unit_range(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _resize_shorter_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased), then centre-crop size x size."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) < size:
        raise ValueError(f"image of size {w}x{h} is smaller than the {size}x{size} centre crop")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


# --- digits (built in) -----------------------------------------------------------------------------

def load_digits_tensor(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits set as (images (1797, 1, R, R) in [-1, 1], labels (1797,) int64). See DIGITS_INFO."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), torch.from_numpy(d.target.astype(np.int64))


class TensorImages(torch.utils.data.Dataset):
    """An in-memory image set; the trainer indexes `.data` directly (no DataLoader)."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None):
        self.data, self.labels = data, labels

    def __len__(self):
        return self.data.shape[0]

    def __getitem__(self, i):
        return self.data[i]


# --- CelebA ------------------------------------------------------------------------------------------

class CelebA(torch.utils.data.Dataset):
    """CelebA aligned JPEGs: centre-crop 140x140, resize to `resolution` (bicubic, antialiased)."""

    crop = 140

    def __init__(self, root, resolution: int = 64):
        root = Path(root)
        folder = root / "img_align_celeba"
        if not folder.is_dir() and root.name == "img_align_celeba" and root.is_dir():
            folder = root  # the user pointed at the image folder itself
        if not folder.is_dir():
            raise DatasetError(f"CelebA not found: no folder {folder}; " + _expected("celeba", root))
        self.files = sorted(folder.glob("*.jpg"))
        if not self.files:
            raise DatasetError(f"CelebA folder {folder} holds no *.jpg files; " + _expected("celeba", root))
        self.root, self.resolution = root, resolution
        # Cheap checks at start-up (one stat per file): an empty or truncated-to-nothing file is named
        # now, not by a DataLoader worker hours into training. `check()` decodes every image.
        for f in self.files:
            try:
                size = f.stat().st_size
            except OSError as e:  # e.g. a symbolic link to a file that is gone
                raise DatasetError(f"CelebA image {f} cannot be read ({e.strerror}"
                                   f"{', a broken link' if f.is_symlink() else ''}); restore or delete it") from None
            if size == 0:
                raise DatasetError(f"CelebA image {f} is empty; re-extract the dataset (or delete the file)")
        self[0]  # fail now, not hours into training, if the files cannot be decoded

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im = _center_crop(im.convert("RGB"), self.crop)
                im = im.resize((self.resolution, self.resolution), Image.BICUBIC)
        except Exception as e:
            raise DatasetError(f"cannot read CelebA image {path}: {_one_line(e)}") from None
        return _to_unit_range(im)


# --- LSUN church_outdoor (LMDB) -------------------------------------------------------------------------

_ENVS: dict = {}


def _lmdb_env(path: Path):
    """This process's read-only environment for `path`, opened on first use. LMDB refuses to open an
    environment twice in one process, and a forked DataLoader worker counts the handle it inherited
    as open: so the main process releases its handle (`LSUNChurch.release`) before workers start,
    and each worker opens its own, keyed by its pid."""
    import os

    import lmdb

    key = (os.getpid(), str(path))
    if key not in _ENVS:
        _ENVS[key] = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False,
                               max_readers=64)
    return _ENVS[key]


def _release_env(path: Path) -> None:
    import os

    env = _ENVS.pop((os.getpid(), str(path)), None)
    if env is not None:
        env.close()


class LSUNChurch(torch.utils.data.Dataset):
    """LSUN church_outdoor from its LMDB (values are encoded JPEG/WebP/PNG bytes): resize the shorter
    side to `resolution`, centre-crop. The key list is read once, at construction."""

    def __init__(self, root, resolution: int = 64):
        import lmdb

        root = Path(root)
        path = root / "church_outdoor_train_lmdb"
        if not path.is_dir() and root.name == "church_outdoor_train_lmdb" and root.is_dir():
            path = root
        if not (path / "data.mdb").is_file():
            raise DatasetError(f"LSUN church LMDB not found: no file {path / 'data.mdb'}; "
                               + _expected("lsun_church", root))
        self.root, self.path, self.resolution = root, path, resolution
        try:
            with _lmdb_env(path).begin(write=False) as txn:
                self.keys = [k for k, _ in txn.cursor()] if txn.stat()["entries"] else []
        except lmdb.Error as e:
            raise DatasetError(f"cannot open LMDB {path}: {e}; " + _expected("lsun_church", root)) from None
        if not self.keys:
            raise DatasetError(f"LMDB {path} holds no entries; " + _expected("lsun_church", root))
        self[0]
        self.release()

    def release(self) -> None:
        """Close this process's handle (before DataLoader workers fork; they open their own)."""
        _release_env(self.path)

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        try:
            with _lmdb_env(self.path).begin(write=False) as txn:
                buf = txn.get(key)
            with Image.open(io.BytesIO(buf)) as im:
                im = _resize_shorter_center_crop(im.convert("RGB"), self.resolution)
        except Exception as e:
            raise DatasetError(f"cannot decode LSUN entry {key!r} in {self.path}: {_one_line(e)}") from None
        return _to_unit_range(im)


# --- SVHN ------------------------------------------------------------------------------------------------

def _svhn_uint8(X: np.ndarray, path) -> np.ndarray:
    """SVHN pixels as uint8 0..255. The official file is uint8; a re-saved copy may hold other integers
    in [0, 255], or floats in [0, 1] (scaled back by 255, not truncated to black) or in [0, 255];
    anything else (booleans, NaN or infinite values, values out of range) is refused."""
    if X.dtype == np.uint8:
        return X
    if X.size == 0:
        raise DatasetError(f"{path} holds no images")
    if not (np.issubdtype(X.dtype, np.integer) or np.issubdtype(X.dtype, np.floating)):
        raise DatasetError(f"{path}: X has dtype {X.dtype}, not pixel values; " + _expected("svhn", Path(path).parent))
    if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
        raise DatasetError(f"{path}: X ({X.dtype}) holds {int((~np.isfinite(X)).sum())} NaN or infinite values; "
                           + _expected("svhn", Path(path).parent))
    lo, hi = float(X.min()), float(X.max())
    if lo < 0 or hi > 255:
        raise DatasetError(f"{path}: X ({X.dtype}) has values outside [0, 255] (min {lo:g}, max {hi:g}); "
                           + _expected("svhn", Path(path).parent))
    if np.issubdtype(X.dtype, np.floating) and hi <= 1.0:
        X = X * 255.0
    return np.rint(X).astype(np.uint8)


class SVHN(torch.utils.data.Dataset):
    """SVHN format 2 (`train_32x32.mat`), upsampled 32 -> `resolution` (bilinear, antialiased).

    The uint8 array stays in memory as (N, 3, 32, 32) (~225 MB for the 73,257 training images);
    resizing happens per item."""

    def __init__(self, root, resolution: int = 64):
        import scipy.io

        root = Path(root)
        path = root / "train_32x32.mat"
        if not path.is_file() and root.is_file() and root.name.endswith(".mat"):
            path, root = root, root.parent
        if not path.is_file():
            raise DatasetError(f"SVHN not found: no file {path}; " + _expected("svhn", root))
        try:
            m = scipy.io.loadmat(str(path), variable_names=["X"])
            kind = {name: cls for name, _, cls in scipy.io.whosmat(str(path))}.get("X")
        except Exception as e:
            raise DatasetError(f"cannot read {path} as a MATLAB file: {e}; " + _expected("svhn", root)) from None
        X = m.get("X")
        if kind == "logical":  # loadmat reads a logical array as uint8 0/1: black images, if taken as pixels
            raise DatasetError(f"{path}: X is a logical (true/false) array, not pixel values; "
                               + _expected("svhn", root))
        if X is None or X.ndim != 4 or X.shape[:3] != (32, 32, 3):
            got = "no variable X" if X is None else f"X of shape {X.shape}"
            raise DatasetError(f"{path} holds {got}; " + _expected("svhn", root))
        self.x = torch.from_numpy(np.ascontiguousarray(_svhn_uint8(X, path).transpose(3, 2, 0, 1)))
        self.root, self.resolution = root, resolution

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        x = self.x[i].float().div_(255.0)[None]
        if self.resolution != 32:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x[0].clamp(0, 1) * 2 - 1)


# --- factory ----------------------------------------------------------------------------------------------

def make_dataset(name: str, data_root=None, resolution: int = 64):
    """Build the training set `name` (digits, celeba, lsun_church, svhn)."""
    if name == "digits":
        x, y = load_digits_tensor(resolution)
        return TensorImages(x, y)
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; choose digits, celeba, lsun_church, svhn (or gmm)")
    if data_root is None:
        raise DatasetError(f"--dataset {name} needs --data-root; " + _expected(name, None))
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DatasetError(f"--data-root {str(root)!r} does not exist; " + _expected(name, root))
    cls = {"celeba": CelebA, "lsun_church": LSUNChurch, "svhn": SVHN}[name]
    return cls(root, resolution)


__all__ = ["DatasetError", "make_dataset", "load_digits_tensor", "TensorImages", "CelebA", "LSUNChurch", "SVHN",
           "LAYOUTS", "DIGITS_INFO", "check_data", "worker_error_message"]
