"""The metric's side of an evaluation: the feature network and the reference statistics a table's
Fréchet distances are measured against (ALGORITHMS §7): digits-FD on the cached digits classifier,
or pytorch-fid FID on the training set's Inception statistics (cached per dataset and size).
`features_and_reference` picks between them for every job.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.datasets import load_digits_tensor, make_dataset, worker_error_message
from ..engine import distributed as D
from ..engine.config import Config
from ..engine.errors import DatasetError, UsageError
from .digits_classifier import DigitsFeatures, get_classifier
from .fid import InceptionFeatures, Stats, frechet_distance, load_stats, save_stats
from .table import cells


def features_and_reference(cfg: Config, d, cache_dir: Path, progress: bool, inception=None, ref_stats=None):
    """(features, reference (mu, sigma), extra table rows, run info) of a run's evaluation: FID when
    the Inception model `inception` is given (the reference from the `ref_stats` .npz file, else from
    the training set), digits-FD otherwise (with the estimator's floor as extra rows)."""
    if inception is not None:
        feats = InceptionFeatures(inception, d.device)
        if ref_stats:
            try:
                return feats, load_stats(ref_stats), [], {}
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"--ref-stats {ref_stats}: {e}") from None
        return feats, fid_reference(cfg, feats, d, cache_dir, int(cfg.eval.ref_samples), progress), [], {}
    feats, ref, extra, acc = digits_metric(cfg, cache_dir, d, progress and d.main,
                                           n_floor=sorted({c["n"] for c in cells(cfg.eval)}))
    if d.main:
        print(f"digits classifier (features of digits-FD): test accuracy {acc:.3f}", file=sys.stderr)
    return feats, ref, extra, {"digits_classifier_test_accuracy": round(acc, 4)}


def digits_metric(cfg: Config, cache_dir: Path, d, progress: bool, n_floor=()):
    """(features, reference stats, extra table rows, classifier accuracy) for digits-FD: the cached
    classifier's features, the statistics of all 1797 digits, and the floor of the estimator
    (n real digits, for each n in n_floor, vs all). Rank 0 trains and caches the classifier; the other ranks
    then load it."""
    if cfg.channels != 1 or cfg.resolution != 16:
        raise UsageError("digits-FD is defined for 1x16x16 digits")
    kw = dict(resolution=cfg.resolution, epochs=int(cfg.eval.classifier_epochs))
    if d.main:
        net, acc = get_classifier(cache_dir, progress=progress, **kw)
    D.barrier(d)
    if not d.main:
        net, acc = get_classifier(cache_dir, **kw)
    feats = DigitsFeatures(net, d.device)
    x, _ = load_digits_tensor(cfg.resolution)
    f = feats(x)
    ref = Stats(feats.dims).add(f).mu_sigma()
    extra = []
    for n in sorted(set(n_floor or [])):
        if n >= x.shape[0]:
            continue
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(cfg.seed) + 99))[:n]
        extra.append({"row": f"data{n}", "label": f"Real digits, {n} of the 1797 (floor at n={n})",
                      "sampler": "data", "N": 0, "steps": 0, "nfe": 0, "delta_p": None, "metric": feats.name,
                      "value": frechet_distance(*Stats(feats.dims).add(f[idx]).mu_sigma(), *ref), "n_samples": n,
                      "seconds": 0.0})
    return feats, ref, extra, acc


def fid_reference(cfg: Config, feats, d, cache_dir: Path, ref_samples: int, progress: bool):
    """Inception statistics of (up to) `ref_samples` training images, processed exactly as for training
    (a fixed random subset when the set is larger), cached under cache_dir; split across ranks."""
    key = hashlib.sha1(json.dumps([cfg.dataset, cfg.data_root, cfg.resolution, ref_samples]).encode())
    path = Path(cache_dir) / f"fid_ref_{cfg.dataset}_{cfg.resolution}_{ref_samples}_{key.hexdigest()[:8]}.npz"
    if path.is_file():
        return load_stats(path)
    ds = make_dataset(cfg.dataset, cfg.data_root, cfg.resolution)
    if cfg.num_workers > 0 and hasattr(ds, "release"):
        ds.release()
    n = min(ref_samples, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    mine = [idx[i] for i in D.shard(n, d)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=200,
                                         num_workers=cfg.num_workers)
    st = Stats(feats.dims)
    try:
        for x in tqdm(loader, desc="FID reference statistics", disable=not (progress and d.main)):
            st.add(feats(x))
    except DatasetError as e:  # from a worker: its one-line message, not the worker's traceback
        raise DatasetError(worker_error_message(str(e))) from None
    st = Stats.unpack(D.all_reduce_sum(d, st.packed().to(d.device)).cpu(), feats.dims)
    mu, sigma = st.mu_sigma()
    if d.main:
        save_stats(path, mu, sigma, n=n)
    return mu, sigma


__all__ = ["features_and_reference", "digits_metric", "fid_reference"]
