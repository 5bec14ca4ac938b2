"""Reproduce the experiments of Ghimire et al.: train, evaluate, write a run folder.

    python train/run.py                      # main job: digits (built in), tiny U-Nets, CPU, digits-FD table
    python train/run.py --quick              # the same pipeline with a tiny budget (smoke test)
    python train/run.py --dataset gmm        # the 2-D toy job: W2 of every sampler (train/jobs/toy.py)
    python train/run.py --dataset celeba --data-root /data       # paper run (Appendix B config, GPU)
    python train/run.py --nproc-per-node 8 --dataset lsun_church --data-root /data   # DDP (or torchrun)
    python train/run.py eval --fid --run runs/celeba-...         # pytorch-fid FID, 50K samples per cell
    python train/run.py export --run runs/digits-... --to docs   # README table and figures
    python train/run.py chen | chen-optimal | kwon ...           # the studies in train/experiments/

This file only parses arguments and dispatches; `guarded` turns every user error into one line and
exit code 2 (a diverged training run: exit 3). See `python train/run.py --help`, `eval --help`,
`export --help`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# On a shared CPU, OpenMP threads that spin while waiting for a descheduled sibling can make a step
# 10-60x slower; passive waiting costs little when the machine is idle. Must precede importing torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.engine import distributed as D  # noqa: E402
from train.engine.cli import (Parser, at_least, decay, device, guarded, ints, names, nonneg_int,  # noqa: E402
                              path_str, pos_float, pos_int, seed, threads)
from train.engine.config import DATASETS  # noqa: E402
from train.engine.errors import UsageError  # noqa: E402
from train.experiments import EXPERIMENTS  # noqa: E402
from train.jobs.export import export_job  # noqa: E402
from train.jobs.image import train_job  # noqa: E402
from train.jobs.reevaluate import eval_job  # noqa: E402
from train.jobs.toy import toy_job  # noqa: E402

SUBCOMMANDS = ("train", "eval", "export", *EXPERIMENTS)
#: flags of the image jobs that mean nothing to the gmm job (and the reverse): given, they are errors
IMAGE_ONLY = ("data_root", "preset", "fused", "triton_interpreter", "num_workers", "sample_every", "eval_rows",
              "eval_batch", "inception_weights", "check_data", "no_eval", "cache_dir", "score_from", "proj_width")
GMM_ONLY = ("hidden",)


# --- argument types of the train subcommand -------------------------------------------------------------

def delta_tau(s: str):
    """'0.05' (one step size in (0, 0.999)) or '20,40,100' (step counts N >= 2 drawn per sample)."""
    if "," in s:
        v = ints(s)
    else:
        try:
            f = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a step size or step counts, got {s!r}") from None
        if not math.isfinite(f):
            raise argparse.ArgumentTypeError(f"expected a step size in (0, 0.999) or step counts N >= 2, got {s!r}")
        v = [int(f)] if f >= 2 and f == int(f) else f
    if isinstance(v, float) and not 0 < v < 0.999 or isinstance(v, list) and min(v) < 2:
        raise argparse.ArgumentTypeError(f"expected a step size in (0, 0.999) or step counts N >= 2, got {s!r}")
    return v


def compile_backend(s: str) -> str | bool:
    return False if s in ("off", "none", "false") else s


# --- parsers --------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device, help="cpu, cuda, cuda:1 or auto (default; gmm: cpu)")
    p.add_argument("--nproc-per-node", type=pos_int, default=1, metavar="K",
                   help="run in K processes (DDP: one per GPU, or gloo on CPU), as torchrun --nproc_per_node=K "
                        "would, but a user error stays one line with exit code 2")
    p.add_argument("--threads", type=threads, help="torch CPU threads (default: the config's cpu_threads on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, type=compile_backend, metavar="BACKEND",
                   help="wrap the networks in torch.compile for training and evaluation (backend: inductor, or "
                        "e.g. eager/aot_eager); off by default, recorded in the run's config. With --fused the "
                        "Triton kernels stay inside the compiled graph as torch.library custom ops (no graph break)")


def train_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = ("Train the score and projection networks jointly and evaluate them in the layout of "
                     "Ghimire et al. Table 1 (`--dataset gmm`: the 2-D toy with W2). Other subcommands: `eval` "
                     "(re-evaluate a run; --fid for pytorch-fid FID) and `export` (copy a run's table and "
                     "figures into docs/). A run folder that holds a run is only continued (--resume) or "
                     "replaced (--overwrite). Exit codes: 0 done, 2 user error, 3 training diverged.")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="digits (default): built in (scikit-learn's 1797 8x8 digits upsampled to 16x16); celeba, "
                        "lsun_church, svhn: need --data-root; gmm: the 2-D toy job (train/jobs/toy.py)")
    p.add_argument("--data-root", type=path_str, help="folder holding img_align_celeba/, church_outdoor_train_lmdb/ or "
                                       "train_32x32.mat")
    p.add_argument("--config", type=path_str,
                   help="JSON file whose keys override the dataset's config (train/configs/)")
    p.add_argument("--quick", action="store_true",
                   help="tiny budget: the whole pipeline as a smoke test (its numbers mean nothing)")
    p.add_argument("--out", type=path_str, help="run folder (default: <runs-dir>/<dataset>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    p.add_argument("--runs-dir", type=path_str, default="runs", help="parent of new run folders (default: ./runs)")
    p.add_argument("--resume", type=path_str,
                   help="a checkpoint file, a run folder, or 'auto' (newest run of this dataset, "
                                    "or --out's)")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed of weights, data order, noise, evaluation (default: the config's, else 0)")
    p.add_argument("--fused", action="store_true",
                   help="fused kernels: on CUDA the Triton sampler steps, attention and GroupNorm; on a CPU the "
                        "C++ sampler steps (built at first use) with torch's attention and GroupNorm")
    p.add_argument("--triton-interpreter", action="store_true",
                   help="with --fused on a CPU: the Triton kernels in Triton's interpreter instead (a correctness "
                        "check, tens of times slower)")
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--check-data", action="store_true",
                   help="decode every training image before training (a corrupt file is named in one line)")
    p.add_argument("--cache-dir", type=path_str, default=None, help="cache of the digits classifier and FID reference "
                                                     "statistics (default: <runs-dir>/.cache)")
    p.add_argument("--inception-weights", type=path_str, help="path of pt_inception-2015-12-05-6726825d.pth (FID)")
    p.add_argument("--score-from", metavar="PATH", type=path_str,
                   help="train only the projection network T on a frozen score model: a wgfcore run folder (its "
                        "EMA score) or a diffusers UNet2DModel folder (save_pretrained, with scheduler_config.json "
                        "beside it or in scheduler/). Its images must match the dataset's config")
    _common(p)
    g = p.add_argument_group("overrides of the config")
    g.add_argument("--iterations", "--iters", type=pos_int)
    g.add_argument("--batch-size", "--batch", type=pos_int, help="global batch (split across processes)")
    g.add_argument("--lr", type=pos_float)
    g.add_argument("--ema-decay", type=decay)
    g.add_argument("--delta-tau", type=delta_tau, help="training step of the projection loss: 0.05, or N list")
    g.add_argument("--preset", help="U-Net preset (tiny, adm64), without the config's 'net' overrides")
    g.add_argument("--proj-width", type=pos_float, metavar="F",
                   help="T's width as a multiple of the config's U-Net (model_channels and head_channels x F, "
                        "e.g. 0.5); sets proj_net")
    g.add_argument("--hidden", type=pos_int, help="gmm: MLP width (3 hidden layers)")
    g.add_argument("--num-workers", type=nonneg_int)
    g.add_argument("--log-every", type=pos_int)
    g.add_argument("--ckpt-every", type=pos_int)
    g.add_argument("--sample-every", type=nonneg_int)
    g.add_argument("--eval-samples", "--n-samples", type=at_least(2),
                   help="samples per table cell")
    g.add_argument("--eval-batch", type=pos_int)
    g.add_argument("--eval-steps", "--steps", type=ints, help="columns N, e.g. 1000,100,40,20")
    g.add_argument("--eval-rows", type=names, help="rows: em,pp,em2n,heun")
    g.add_argument("--eval-seeds", type=pos_int, help="independent seeds per cell (paired verdicts)")
    g.add_argument("--delta-p", type=pos_float, help="Predict-Project's delta_p for every N (default: the paper's)")
    return p


def eval_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = ("Evaluate a trained run. With --fid: pytorch-fid FID (Inception pool3, 2048 features) of "
                     "EM and Predict-Project at N = 1000/100/40/20 on 50K samples per cell against the training "
                     "set's statistics. Without: redo the run's own table (digits-FD for digits).")
    p.add_argument("--run", type=path_str, required=True, help="the run folder (holds config.json and checkpoints/)")
    p.add_argument("--fid", action="store_true", help="Inception FID (needs the pytorch-fid weights file)")
    p.add_argument("--inception-weights", type=path_str, help="path of pt_inception-2015-12-05-6726825d.pth "
                                               "(default: the torch hub cache)")
    p.add_argument("--samples", type=at_least(2),
                   help="samples per cell (FID default 50000)")
    p.add_argument("--batch", type=pos_int, help="sampling batch size")
    p.add_argument("--steps", type=ints, help="columns N (default: the run's own eval.steps)")
    p.add_argument("--rows", type=names, help="rows (FID default em,pp; also em2n, heun)")
    p.add_argument("--ref-stats", type=path_str,
                   help="with --fid: pytorch-fid .npz (mu, sigma) of the dataset, instead of computing them")
    p.add_argument("--ref-samples", type=pos_int, default=None, help="training images for the reference (50000)")
    p.add_argument("--data-root", type=path_str, help="dataset location, if it moved since training")
    p.add_argument("--fused", action="store_true",
                   help="fused kernels: Triton on CUDA, the C++ sampler steps on a CPU (see train --help)")
    p.add_argument("--triton-interpreter", action="store_true",
                   help="with --fused on a CPU: the Triton kernels in Triton's interpreter (a correctness check)")
    p.add_argument("--cache-dir", type=path_str, default=None, help="default: <run>/../.cache")
    p.add_argument("--quick", action="store_true",
                   help="the --quick config's small table (e.g. N = 40, 20 with 64 samples): a pipeline check, "
                        "reported without verdicts")
    _common(p)
    return p


def export_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.description = "Copy a finished run's results table and figures into docs/."
    p.add_argument("--run", type=path_str, required=True)
    p.add_argument("--to", type=path_str, default="docs")
    p.add_argument("--name", help="file prefix (default: the run's dataset)")
    p.add_argument("--allow-quick", action="store_true", help="export a --quick run too (untrained numbers)")
    p.add_argument("--command", help="the command that produced the run, quoted in the table's header")
    return p


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="train/run.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command_name", parser_class=Parser)
    train_parser(sub.add_parser("train", help="train and evaluate a run (the default subcommand)"))
    eval_parser(sub.add_parser("eval", help="re-evaluate a finished image run"))
    export_parser(sub.add_parser("export", help="copy a run's table and figures into docs/"))
    for name, exp in EXPERIMENTS.items():
        exp.add_arguments(sub.add_parser(name, help=exp.__doc__.splitlines()[0]))
    return p


# --- dispatch ------------------------------------------------------------------------------------------

def _train(args) -> int:
    if (args.dataset or "digits") == "gmm":
        given = [f"--{k.replace('_', '-')}" for k in IMAGE_ONLY if getattr(args, k) not in (None, False)]
        if given:
            raise UsageError(f"{', '.join(given)}: not used by --dataset gmm (the 2-D toy job)")
        return guarded(toy_job, args, "cpu" if args.device == "auto" else args.device)
    given = [f"--{k.replace('_', '-')}" for k in GMM_ONLY if getattr(args, k) is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only used by --dataset gmm")
    return guarded(train_job, args, args.device)


def _launch(args) -> int:
    if "LOCAL_RANK" in os.environ:
        raise UsageError("--nproc-per-node starts its own processes; under torchrun, drop it")
    if args.command_name == "train" and args.dataset == "gmm":
        raise UsageError("--nproc-per-node: the gmm job runs in one process")
    return D.launch(args.nproc_per_node, __file__, _without_nproc(args.argv))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["train", *argv]  # train is the default subcommand
    args = parser().parse_args(argv)
    args.argv = argv  # the command as given (the experiments quote it in their reports)
    if getattr(args, "nproc_per_node", 1) > 1:
        return guarded(_launch, args)
    if args.command_name == "train":
        return guarded(_train, args)
    if args.command_name == "eval":
        return guarded(eval_job, args, args.device)
    if args.command_name == "export":
        return guarded(export_job, args)
    return guarded(EXPERIMENTS[args.command_name].run, args)


if __name__ == "__main__":
    sys.exit(main())
