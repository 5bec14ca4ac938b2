"""`train/run.py export`: copy a finished run's table and figures into docs/ (what the README quotes).

Image runs give <to>/<name>_results.md and <to>/figures/<name>_{samples,losses,...}.png; gmm runs
give <to>/<name>_results.md and <to>/figures/<name>_{samples,w2_vs_nfe}.png. A projection-only run
(--score-from) also gives <to>/<name>_projection/: T in the standard format (safetensors + config.json).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from wgfcore.pretrained import CONFIG, WEIGHTS_SAFETENSORS, WEIGHTS_TORCH

from ..engine.config import Config, read_json
from ..engine.errors import UsageError
from .projection import EXPORT_DIR


def _copy(src: Path, dst: Path) -> None:
    try:
        shutil.copyfile(src, dst)
    except OSError as e:
        raise UsageError(f"export: cannot write {dst}: {e.strerror}") from None


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise UsageError(f"export: cannot write {path}: {e.strerror}") from None


def export_job(args) -> int:
    run, to = Path(args.run), Path(args.to)
    cfg = Config.from_dict(read_json(run / "config.json", "run config"), f"{run / 'config.json'}") \
        if (run / "config.json").is_file() else None
    gmm = cfg is not None and cfg.toy
    names = ("config.json", "results.md", "samples.png", "w2_vs_nfe.png") if gmm else \
        ("config.json", "results.md", "timing.json", "samples_overview.png", "losses.png")
    missing = [str(run / f) for f in names if not (run / f).is_file()]
    if missing:
        raise UsageError(f"--run {run} is not a finished run folder (missing {', '.join(missing)})")
    if to.exists() and not to.is_dir():
        raise UsageError(f"--to {to} is a file, not a folder")
    try:
        (to / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"export: cannot create {to / 'figures'}: {e.strerror}") from None
    info = read_json(run / "run_info.json", "run info") if (run / "run_info.json").is_file() else {}
    name = args.name or cfg.dataset
    cmd = args.command or " ".join(["python", "train/run.py", *info.get("argv", [])[1:]])
    if gmm:
        _copy(run / "samples.png", to / "figures" / f"{name}_samples.png")
        _copy(run / "w2_vs_nfe.png", to / "figures" / f"{name}_w2_vs_nfe.png")
        _write(to / f"{name}_results.md", f"Command: `{cmd}`\n\n" + (run / "results.md").read_text())
        print(f"wrote {to / f'{name}_results.md'} and {to / 'figures'}/{name}_*.png")
        return 0
    timing = read_json(run / "timing.json", "run timing")
    try:
        metric_png = next(run.glob("*_vs_nfe.png"))
    except StopIteration:
        raise UsageError(f"--run {run} has no *_vs_nfe.png figure (an unfinished evaluation?)") from None
    _copy(metric_png, to / "figures" / f"{name}_{metric_png.name.replace('digits_', '')}")
    _copy(run / "samples_overview.png", to / "figures" / f"{name}_samples.png")
    _copy(run / "losses.png", to / "figures" / f"{name}_losses.png")
    try:
        head = (f"# {name}: Table 1 layout, measured\n\n"
                f"Command: `{cmd}`  \n"
                f"Training: {cfg.iterations} iterations, batch {cfg.batch_size}, preset `{cfg.preset}`"
                f"{' with ' + json.dumps(cfg.net) if cfg.net else ''}, seed {cfg.seed}; "
                f"{timing['train_seconds']:.0f} s. Evaluation: {timing['eval_seconds']:.0f} s. "
                f"Device: {timing['device']}, {timing.get('threads', '?')} thread(s), {timing['world_size']} "
                f"process(es), torch {info.get('torch', '?')}.")
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"--run {run}: config.json or timing.json lacks {e} (not an image run of train/run.py?)") \
            from None
    if "digits_classifier_test_accuracy" in timing:
        head += (f" digits-FD features: a small CNN trained on 80% of the digits "
                 f"(held-out accuracy {timing['digits_classifier_test_accuracy']:.3f}).")
    if cfg.projection_only:
        src = cfg.score_from
        head += (f" Only T was trained (--score-from), on the frozen {src['kind']} score at `{src['path']}` "
                 f"(sha256 {src['sha256'][:12]}...); the preset above is T's.")
        _copy_projection(run, to / f"{name}_projection")
    _write(to / f"{name}_results.md", head + "\n\n" + (run / "results.md").read_text())
    print(f"wrote {to / f'{name}_results.md'} and {to / 'figures'}/{name}_*.png"
          + (f"; T in {to / f'{name}_projection'}" if cfg.projection_only else ""))
    return 0


def _copy_projection(run: Path, dst: Path) -> None:
    """T of a projection-only run in the standard format (config.json + model.safetensors, or model.pt of
    tensors only): `wgfcore.pretrained.load_projection(dst)` reads it without this trainer."""
    src = run / EXPORT_DIR
    files = [src / CONFIG, *(src / w for w in (WEIGHTS_SAFETENSORS, WEIGHTS_TORCH) if (src / w).is_file())]
    if not all(f.is_file() for f in files) or len(files) < 2:
        raise UsageError(f"--run {run} has no exported T in {src} (a projection-only run that did not finish?)")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"export: cannot create {dst}: {e.strerror}") from None
    for f in files:
        _copy(f, dst / f.name)


__all__ = ["export_job"]
