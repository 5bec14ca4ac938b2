"""Reproduce the image experiments of Ghimire et al. (Table 1): train, evaluate, write a run folder.

    python train/run.py                      # main job: digits (built in), tiny U-Nets, CPU, digits-FD table
    python train/run.py --quick              # the same pipeline in under two minutes (smoke test)
    python train/run.py --dataset celeba --data-root /data       # paper run (Appendix B config, GPU)
    torchrun --nproc_per_node=8 train/run.py --dataset lsun_church --data-root /data
    python train/run.py eval --fid --run runs/celeba-...         # pytorch-fid FID, 50K samples per cell
    python train/run.py export --run runs/digits-... --to docs   # README table and figures
    python train/run.py --dataset gmm ...    # the 2-D toy job (train/toy.py)

See `python train/run.py --help` and `python train/run.py eval --help`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled sibling can make a step
# 10-60x slower; passive waiting costs little when the machine is idle. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = Path(__file__).resolve().parent / "configs"
PAPER_DATASETS = ("celeba", "lsun_church", "svhn")
#: --quick on a paper dataset: the same data and metric, a tiny network and budget (a pipeline check)
QUICK_PAPER = {"preset": "tiny", "iterations": 20, "batch_size": 8, "warmup": 5, "ema_decay": 0.9, "log_every": 5,
               "ckpt_every": 10, "sample_every": 0, "snapshot_every": 0, "num_workers": 2,
               "eval": {"steps": [20], "samples": 16, "batch": 16, "ref_samples": 64}}
#: what may change when a run is resumed (the rest is fixed by the checkpoint's config)
RESUMABLE = {"iterations", "eval", "log_every", "sample_every", "ckpt_every", "snapshot_every", "num_workers",
             "data_root"}


class UsageError(Exception):
    """A problem with the user's input or files: printed as one message, exit code 2."""


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# --- configuration --------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _delta_tau(s: str):
    """'0.05' (one step size) or '20,40,100' (step counts N drawn per sample)."""
    if "," in s:
        return _ints(s)
    v = float(s)
    return [int(v)] if v >= 2 else v


def build_config(args) -> dict:
    """Config file for the dataset (or --quick), then --config, then explicit command-line options."""
    name = "quick" if args.quick and args.dataset == "digits" else args.dataset
    path = CONFIGS / f"{name}.json"
    cfg = json.loads(path.read_text())
    if args.quick and args.dataset != "digits":
        cfg = _merge(cfg, QUICK_PAPER)
    if args.config:
        try:
            cfg = _merge(cfg, json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read --config {args.config}: {e}") from None
    cfg = _merge(cfg, _overrides(args))
    if args.preset:  # a preset chosen on the command line comes without the config's narrowing
        cfg["net"] = {}
    return cfg


def _overrides(args) -> dict:
    o, e = {}, {}
    for key, attr in [("iterations", "iterations"), ("batch_size", "batch_size"), ("lr", "lr"),
                      ("ema_decay", "ema_decay"), ("delta_tau", "delta_tau"), ("num_workers", "num_workers"),
                      ("log_every", "log_every"), ("ckpt_every", "ckpt_every"), ("sample_every", "sample_every"),
                      ("preset", "preset"), ("data_root", "data_root")]:
        v = getattr(args, attr, None)
        if v is not None:
            o[key] = str(Path(v).expanduser().resolve()) if key == "data_root" else v
    for key, attr in [("samples", "eval_samples"), ("steps", "eval_steps"), ("rows", "eval_rows"),
                      ("batch", "eval_batch")]:
        v = getattr(args, attr, None)
        if v is not None:
            e[key] = v
    if e:
        o["eval"] = e
    return o


def _check_config(cfg: dict) -> None:
    from train.images import ROWS

    for k in ("iterations", "batch_size", "log_every", "ckpt_every"):
        if not isinstance(cfg.get(k), int) or cfg[k] < 1:
            raise UsageError(f"config {k} must be a positive integer, got {cfg.get(k)!r}")
    if cfg["ckpt_every"] % cfg["log_every"]:
        raise UsageError(f"ckpt_every ({cfg['ckpt_every']}) must be a multiple of log_every ({cfg['log_every']}) "
                         "so a resumed run logs the same rows")
    bad = [r for r in cfg["eval"]["rows"] if r not in ROWS]
    if bad:
        raise UsageError(f"unknown evaluation rows {bad}; choose from {sorted(ROWS)}")
    if any(n < 1 for n in cfg["eval"]["steps"]) or cfg["eval"]["samples"] < 2:
        raise UsageError("evaluation needs step counts >= 1 and at least 2 samples")


def _sample_counts(ecfg: dict) -> list[int]:
    from train.images import cells

    return sorted({c["n"] for c in cells(ecfg)})


def _set_threads(args, cfg: dict, d) -> None:
    """--threads, else the config's cpu_threads on CPU (the digits job: 1), else torch's default."""
    import torch

    n = args.threads or (cfg.get("cpu_threads") if d.device.type == "cpu" else None)
    if n:
        torch.set_num_threads(int(n))


# --- metrics --------------------------------------------------------------------------------------

def digits_metric(cfg: dict, cache_dir: Path, d, progress: bool, n_floor=()):
    """(features, reference stats, extra table rows, classifier accuracy) for digits-FD: the cached
    classifier's features, the statistics of all 1797 digits, and the floor of the estimator
    (n real digits, for each n in n_floor, vs all). Rank 0 trains and caches the classifier; the other ranks then load it."""
    import torch

    from train import distributed as D
    from train.datasets import load_digits_tensor
    from train.digits_classifier import DigitsFeatures, get_classifier
    from train.fid import Stats, frechet_distance

    if cfg["channels"] != 1 or cfg["resolution"] != 16:
        raise UsageError("digits-FD is defined for 1x16x16 digits")
    kw = dict(resolution=cfg["resolution"], epochs=int(cfg["eval"].get("classifier_epochs", 12)))
    if d.main:
        net, acc = get_classifier(cache_dir, progress=progress, **kw)
    D.barrier(d)
    if not d.main:
        net, acc = get_classifier(cache_dir, **kw)
    feats = DigitsFeatures(net, d.device)
    x, _ = load_digits_tensor(cfg["resolution"])
    f = feats(x)
    ref = Stats(feats.dims).add(f).mu_sigma()
    extra = []
    for n in sorted(set(n_floor or [])):
        if n >= x.shape[0]:
            continue
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(cfg["seed"]) + 99))[:n]
        extra.append({"row": f"data{n}", "label": f"Real digits, {n} of the 1797 (floor at n={n})",
                      "sampler": "data", "N": 0, "steps": 0, "nfe": 0, "delta_p": None, "metric": feats.name,
                      "value": frechet_distance(*Stats(feats.dims).add(f[idx]).mu_sigma(), *ref), "n_samples": n,
                      "seconds": 0.0})
    return feats, ref, extra, acc


def fid_reference(cfg: dict, feats, d, cache_dir: Path, ref_samples: int, progress: bool):
    """Inception statistics of (up to) `ref_samples` training images, processed exactly as for training
    (a fixed random subset when the set is larger), cached under cache_dir; split across ranks."""
    import hashlib

    import torch
    from tqdm.auto import tqdm

    from train import distributed as D
    from train.datasets import make_dataset
    from train.fid import Stats, load_stats, save_stats

    key = hashlib.sha1(json.dumps([cfg["dataset"], cfg.get("data_root"), cfg["resolution"], ref_samples]).encode())
    path = Path(cache_dir) / f"fid_ref_{cfg['dataset']}_{cfg['resolution']}_{ref_samples}_{key.hexdigest()[:8]}.npz"
    if path.is_file():
        return load_stats(path)
    ds = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])
    n = min(ref_samples, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    mine = [idx[i] for i in D.shard(n, d)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), batch_size=200,
                                         num_workers=cfg.get("num_workers", 0))
    st = Stats(feats.dims)
    for x in tqdm(loader, desc="FID reference statistics", disable=not (progress and d.main)):
        st.add(feats(x))
    st = Stats.unpack(D.all_reduce_sum(d, st.packed().to(d.device)).cpu(), feats.dims)
    mu, sigma = st.mu_sigma()
    if d.main:
        save_stats(path, mu, sigma, n=n)
    return mu, sigma


# --- the training job -----------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/run.py",
        description="Train the score and projection networks jointly and evaluate them in the layout of "
                    "Ghimire et al. Table 1. Subcommands: `eval` (re-evaluate a run; --fid for pytorch-fid "
                    "FID) and `export` (copy a run's table and figures into docs/); see their --help.")
    p.add_argument("--dataset", default="digits", choices=["digits", *PAPER_DATASETS, "gmm"],
                   help="digits: built in (scikit-learn's 1797 8x8 digits upsampled to 16x16); celeba, "
                        "lsun_church, svhn: need --data-root; gmm: the 2-D toy job (train/toy.py)")
    p.add_argument("--data-root", help="folder holding img_align_celeba/, church_outdoor_train_lmdb/ or "
                                       "train_32x32.mat")
    p.add_argument("--config", help="JSON file whose keys override the dataset's config (train/configs/)")
    p.add_argument("--quick", action="store_true", help="tiny budget: whole run in under 2 minutes on a CPU")
    p.add_argument("--out", help="run folder (default: <runs-dir>/<dataset>-<timestamp>)")
    p.add_argument("--runs-dir", default="runs", help="parent of new run folders (default: ./runs)")
    p.add_argument("--resume", help="a checkpoint file, a run folder, or 'auto' (newest run of this dataset)")
    p.add_argument("--seed", type=int, default=None, help="seed of weights, data order, noise, evaluation (0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--fused", action="store_true",
                   help="Triton kernels: fused sampler steps and attention (the interpreter on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the config's cpu_threads on CPU, "
                                               "1 for digits; else torch's choice)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", default=None, help="cache of the digits classifier and FID reference "
                                                     "statistics (default: <runs-dir>/.cache)")
    p.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth (FID)")
    g = p.add_argument_group("overrides of the config")
    g.add_argument("--iterations", type=int)
    g.add_argument("--batch-size", type=int, help="global batch (split across processes)")
    g.add_argument("--lr", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--delta-tau", type=_delta_tau, help="training step of the projection loss: 0.05, or N list")
    g.add_argument("--preset", help="U-Net preset (tiny, adm64), without the config's 'net' overrides")
    g.add_argument("--num-workers", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--sample-every", type=int)
    g.add_argument("--eval-samples", type=int, help="samples per table cell")
    g.add_argument("--eval-batch", type=int)
    g.add_argument("--eval-steps", type=_ints, help="columns N, e.g. 1000,100,40,20")
    g.add_argument("--eval-rows", type=_names, help="rows: em,pp,em2n,heun")
    return p


def _resolve_resume(args, d, runs_dir: Path):
    """(checkpoint path or None, run folder or None) for --resume."""
    from train import checkpoint as ckpt

    if not args.resume:
        return None, None
    if args.resume == "auto":
        if args.out:
            folders = [Path(args.out)]
        else:
            prefix = args.dataset + ("-quick-" if args.quick else "-")
            folders = sorted((p for p in runs_dir.glob(prefix + "*") if p.is_dir()
                              and (args.quick or not p.name.startswith(args.dataset + "-quick-"))),
                             key=lambda p: p.stat().st_mtime, reverse=True)
        for f in folders:
            c = ckpt.find_resumable(f / "checkpoints")
            if c is not None:
                return c, f
        if d.main:
            print("--resume auto: no checkpoint found, starting a new run", file=sys.stderr)
        return None, None
    p = Path(args.resume)
    if p.is_file():
        return p, p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if p.is_dir():
        folder = p.parent if p.name == "checkpoints" else p
        c = ckpt.find_resumable(folder / "checkpoints")
        if c is None:
            raise UsageError(f"--resume {p}: no readable checkpoint in {folder / 'checkpoints'}")
        return c, folder
    raise UsageError(f"--resume {p}: no such file or folder")


def _guarded(job, args) -> int:
    """Run a job inside the process group; user-facing failures become one line and exit code 2."""
    from train import checkpoint as ckpt
    from train import distributed as D
    from train.datasets import DatasetError
    from train.fid import InceptionWeightsMissing

    d = D.init(args.device)
    try:
        return job(args, d)
    except (DatasetError, InceptionWeightsMissing, ckpt.CheckpointError, UsageError) as e:
        return _fail(str(e))
    finally:
        D.shutdown(d)


def train_main(argv: list[str]) -> int:
    return _guarded(_train_job, train_parser().parse_args(argv))


def _train_job(args, d) -> int:
    import torch

    from train import checkpoint as ckpt
    from train import distributed as D
    from train import images
    from train.datasets import DIGITS_INFO, make_dataset

    runs_dir = Path(args.runs_dir)
    found = None
    if d.main:
        try:
            found = ("ok", _resolve_resume(args, d, runs_dir))
        except (UsageError, ckpt.CheckpointError) as e:
            found = ("error", str(e))
    status, found = D.broadcast_object(d, found)  # every rank fails together, none waits forever
    if status == "error":
        raise UsageError(found)
    resume, run_dir = found
    if resume is not None:
        state_cfg = ckpt.load(resume)["config"]
        over = _overrides(args)
        ignored = sorted(k for k in over if k not in RESUMABLE)
        if ignored and d.main:
            print(f"note: resuming {resume}; its config fixes {', '.join(ignored)} (command-line values ignored)",
                  file=sys.stderr)
        cfg = _merge(state_cfg, {k: v for k, v in over.items() if k in RESUMABLE})
    else:
        cfg = build_config(args)
        cfg["seed"] = 0 if args.seed is None else args.seed
        cfg.pop("_doc", None)
    _check_config(cfg)
    _set_threads(args, cfg, d)
    if cfg["dataset"] != args.dataset and resume is None:
        raise UsageError(f"--config sets dataset {cfg['dataset']!r} but --dataset is {args.dataset!r}")
    if run_dir is None:
        name = f"{cfg['dataset']}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = Path(args.out) if args.out else runs_dir / name
        run_dir = Path(D.broadcast_object(d, str(run_dir)))
    cache_dir = Path(args.cache_dir) if args.cache_dir else runs_dir / ".cache"
    progress = not args.no_progress

    if args.fused and d.device.type != "cuda" and d.main:
        print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow; a correctness "
              "check, not a speed-up)", file=sys.stderr)
    dataset = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])  # fails early, exit 2
    eval_metric = cfg["eval"]["metric"]
    if eval_metric == "fid" and not args.no_eval:
        from train.fid import InceptionWeightsMissing, find_weights
        try:
            find_weights(args.inception_weights)  # before hours of training, not after
        except InceptionWeightsMissing as e:
            raise InceptionWeightsMissing(f"{e}\n  (or pass --no-eval to train now and run `train/run.py eval --fid` "
                                          "later)") from None

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        images.write_json(cfg, run_dir / "config.json")
        info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(d.device),
                "world_size": d.world, "torch": torch.__version__, "resumed_from": str(resume) if resume else None,
                "fused": args.fused, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
        if cfg["dataset"] == "digits":
            info["dataset"] = DIGITS_INFO
        images.write_json(info, run_dir / ("run_info.json" if resume is None else f"run_info_resume_{int(time.time())}.json"))
        print(f"run folder: {run_dir}", file=sys.stderr)
    D.barrier(d)

    t0 = time.time()
    eps_ema, proj_ema, _ = images.train(cfg, run_dir, d, resume=resume, fused=args.fused, dataset=dataset,
                                        progress=progress)
    t_train = time.time() - t0
    if args.fused:
        images.set_attention_backend([eps_ema, proj_ema], "triton")
    if args.no_eval:
        if d.main:
            print(f"trained in {t_train:.0f} s; evaluation skipped (--no-eval)", file=sys.stderr)
        return 0

    t1 = time.time()
    backend = "triton" if args.fused else "auto"
    if eval_metric == "digits-fd":
        feats, ref, extra, acc = digits_metric(cfg, cache_dir, d, progress and d.main,
                                               n_floor=_sample_counts(cfg["eval"]))
        metric_info = {"digits_classifier_test_accuracy": round(acc, 4)}
        if d.main:
            print(f"digits classifier (features of digits-FD): test accuracy {acc:.3f}", file=sys.stderr)
        images.evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend=backend, progress=progress,
                        extra_rows=extra)
    else:
        from train.fid import InceptionFeatures, build_inception
        feats = InceptionFeatures(build_inception(args.inception_weights, device=d.device), d.device)
        ref = fid_reference(cfg, feats, d, cache_dir, int(cfg["eval"].get("ref_samples", 50_000)), progress)
        images.evaluate(cfg, eps_ema, proj_ema, feats, ref, run_dir, d, backend=backend, progress=progress)
        metric_info = {}
    t_eval = time.time() - t1
    if d.main:
        timing = {"train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1), "device": str(d.device),
                  "world_size": d.world, "threads": torch.get_num_threads(), **metric_info}
        images.write_json(timing, run_dir / "timing.json")
        print((run_dir / "results.md").read_text())
        print(f"train {t_train:.0f} s, evaluation {t_eval:.0f} s; results in {run_dir}", file=sys.stderr)
    return 0


# --- the eval subcommand --------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/run.py eval",
        description="Evaluate a trained run. With --fid: pytorch-fid FID (Inception pool3, 2048 features) of "
                    "EM and Predict-Project at N = 1000/100/40/20 on 50K samples per cell against the training "
                    "set's statistics. Without: redo the run's own table (digits-FD for digits).")
    p.add_argument("--run", required=True, help="the run folder (holds config.json and checkpoints/)")
    p.add_argument("--fid", action="store_true", help="Inception FID (needs the pytorch-fid weights file)")
    p.add_argument("--inception-weights", help="path of pt_inception-2015-12-05-6726825d.pth "
                                               "(default: the torch hub cache)")
    p.add_argument("--samples", type=int, help="samples per cell (FID default 50000)")
    p.add_argument("--batch", type=int, help="sampling batch size")
    p.add_argument("--steps", type=_ints, help="columns N (default 1000,100,40,20)")
    p.add_argument("--rows", type=_names, help="rows (FID default em,pp; also em2n, heun)")
    p.add_argument("--ref-stats", help="pytorch-fid .npz (mu, sigma) of the dataset, instead of computing them")
    p.add_argument("--ref-samples", type=int, default=None, help="training images for the reference (50000)")
    p.add_argument("--data-root", help="dataset location, if it moved since training")
    p.add_argument("--device", default="auto")
    p.add_argument("--fused", action="store_true", help="Triton sampler steps and attention")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="default: <run>/../.cache")
    p.add_argument("--no-progress", action="store_true")
    return p


def eval_main(argv: list[str]) -> int:
    return _guarded(_eval_job, eval_parser().parse_args(argv))


def _eval_job(args, d) -> int:
    from train import images

    run = Path(args.run)
    if not (run / "checkpoints").is_dir():
        raise UsageError(f"--run {run}: expected a run folder with a checkpoints/ subfolder")
    progress = not args.no_progress
    if args.fid:
        from train.fid import InceptionFeatures, build_inception, load_stats
        model = build_inception(args.inception_weights, device=d.device)  # fails first if the weights are missing
    cfg, eps_net, proj_net, step = images.load_run(run)
    _set_threads(args, cfg, d)
    if args.data_root:
        cfg["data_root"] = str(Path(args.data_root).expanduser().resolve())
    ecfg = dict(cfg["eval"])
    if args.fid:
        # no bootstrap: each resample would need a 2048 x 2048 matrix square root
        ecfg.update(rows=["em", "pp"], samples=50_000, batch=ecfg.get("batch", 500), bootstrap=0)
    for key, v in [("samples", args.samples), ("batch", args.batch), ("steps", args.steps), ("rows", args.rows)]:
        if v is not None:
            ecfg[key] = v
    if args.steps is not None or args.rows is not None:
        ecfg["skip"] = []  # cells asked for by name are run, whatever the config skips for its budget
    if not images.cells(ecfg):
        raise UsageError("nothing to evaluate: every requested cell is skipped by the run's config; "
                         "name them with --steps/--rows")
    cfg["eval"] = ecfg
    _check_config(cfg)
    if args.fused:
        if d.device.type != "cuda" and d.main:
            print("warning: --fused on CPU runs the Triton kernels in the interpreter (slow)", file=sys.stderr)
        images.set_attention_backend([eps_net, proj_net], "triton")
    cache_dir = Path(args.cache_dir) if args.cache_dir else run.parent / ".cache"
    backend = "triton" if args.fused else "auto"
    if args.fid:
        feats = InceptionFeatures(model, d.device)
        if args.ref_stats:
            try:
                ref = load_stats(args.ref_stats)
            except (OSError, ValueError) as e:
                raise UsageError(f"--ref-stats {args.ref_stats}: {e}") from None
        else:
            n_ref = args.ref_samples or int(ecfg.get("ref_samples", 50_000))
            ref = fid_reference(cfg, feats, d, cache_dir, n_ref, progress)
        images.evaluate(cfg, eps_net, proj_net, feats, ref, run, d, ecfg=ecfg, backend=backend, progress=progress,
                        prefix="fid_")
        out = run / "fid_results.md"
    elif ecfg["metric"] == "digits-fd":
        feats, ref, extra, _ = digits_metric(cfg, cache_dir, d, progress and d.main, n_floor=_sample_counts(ecfg))
        images.evaluate(cfg, eps_net, proj_net, feats, ref, run, d, ecfg=ecfg, backend=backend, progress=progress,
                        extra_rows=extra)
        out = run / "results.md"
    else:
        raise UsageError(f"this run's metric is {ecfg['metric']!r}; evaluate it with --fid")
    if d.main:
        print(f"checkpoint step {step}")
        print(out.read_text())
    return 0


# --- the export subcommand ------------------------------------------------------------------------

def export_main(argv: list[str]) -> int:
    """Copy a run's table and figures into the docs: <to>/<name>_results.md, <to>/figures/<name>_*.png."""
    import shutil

    p = argparse.ArgumentParser(prog="train/run.py export",
                                description="Copy a finished run's results table and figures into docs/.")
    p.add_argument("--run", required=True)
    p.add_argument("--to", default="docs")
    p.add_argument("--name", help="file prefix (default: the run's dataset)")
    p.add_argument("--command", help="the command that produced the run, quoted in the table's header")
    args = p.parse_args(argv)
    run, to = Path(args.run), Path(args.to)
    need = [run / f for f in ("config.json", "results.md", "timing.json", "samples_overview.png", "losses.png")]
    missing = [str(f) for f in need if not f.is_file()]
    if missing:
        return _fail(f"--run {run} is not a finished run folder (missing {', '.join(missing)})")
    cfg = json.loads((run / "config.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    name = args.name or cfg["dataset"]
    (to / "figures").mkdir(parents=True, exist_ok=True)
    metric_png = next(run.glob("*_vs_nfe.png"))
    shutil.copyfile(metric_png, to / "figures" / f"{name}_{metric_png.name.replace('digits_', '')}")
    shutil.copyfile(run / "samples_overview.png", to / "figures" / f"{name}_samples.png")
    shutil.copyfile(run / "losses.png", to / "figures" / f"{name}_losses.png")
    cmd = args.command or " ".join(["python", "train/run.py", *info.get("argv", [])[1:]])
    head = (f"# {name}: Table 1 layout, measured\n\n"
            f"Command: `{cmd}`  \n"
            f"Training: {cfg['iterations']} iterations, batch {cfg['batch_size']}, preset `{cfg['preset']}`"
            f"{' with ' + json.dumps(cfg['net']) if cfg.get('net') else ''}, seed {cfg['seed']}; "
            f"{timing['train_seconds']:.0f} s. Evaluation: {timing['eval_seconds']:.0f} s. "
            f"Device: {timing['device']}, {timing.get('threads', '?')} thread(s), {timing['world_size']} process(es), "
            f"torch {info.get('torch', '?')}.")
    if "digits_classifier_test_accuracy" in timing:
        head += (f" digits-FD features: a small CNN trained on 80% of the digits "
                 f"(held-out accuracy {timing['digits_classifier_test_accuracy']:.3f}).")
    (to / f"{name}_results.md").write_text(head + "\n\n" + (run / "results.md").read_text())
    print(f"wrote {to / f'{name}_results.md'} and {to / 'figures'}/{name}_*.png")
    return 0


# --- entry point ----------------------------------------------------------------------------------

def _dataset_of(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--dataset" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--dataset="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    if _dataset_of(argv) == "gmm":
        try:
            from train import toy
        except ImportError as e:
            return _fail(f"--dataset gmm is the 2-D toy job in train/toy.py, which cannot be imported: {e}")
        return toy.main(argv)
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
