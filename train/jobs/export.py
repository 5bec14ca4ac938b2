"""`train/run.py export`: copy a finished run's table and figures into docs/ (what the README quotes).

Image runs give <to>/<name>_results.md and <to>/figures/<name>_{samples,losses,...}.png; gmm runs
give <to>/<name>_results.md and <to>/figures/<name>_{samples,w2_vs_nfe}.png.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..engine.config import Config, read_json
from ..engine.errors import UsageError


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
    _write(to / f"{name}_results.md", head + "\n\n" + (run / "results.md").read_text())
    print(f"wrote {to / f'{name}_results.md'} and {to / 'figures'}/{name}_*.png")
    return 0


__all__ = ["export_job"]
