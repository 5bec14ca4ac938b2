"""`train/run.py export`: copy a finished run's table and figures into docs/ (what the README quotes).

Image runs give <to>/<name>_results.md and <to>/figures/<name>_{samples,losses,...}.png; gmm runs
give <to>/<name>_results.md and <to>/figures/<name>_{samples,w2_vs_nfe}.png. A projection-only run
(--score-from) also gives <to>/<name>_projection/: T in the standard format (safetensors + config.json).
Every file is written whole or not at all; a --quick run (untrained networks) is exported only when
asked (--allow-quick).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from wgfcore.pretrained import CONFIG, WEIGHTS_SAFETENSORS, WEIGHTS_TORCH

from ..engine.checkpoint import write_atomic
from ..engine.config import Config, read_json
from ..engine.errors import UsageError
from ..engine.rundir import read_record
from .projection import EXPORT_DIR

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _put(dst: Path, data: bytes) -> None:
    write_atomic(dst, lambda f: f.write(data), "export file")


def _seconds(v) -> str:
    return f"{v:.0f} s" if isinstance(v, (int, float)) and not isinstance(v, bool) else "not recorded"


def export_job(args) -> int:
    run, to = Path(args.run), Path(args.to)
    if args.name is not None and not NAME.match(args.name):
        raise UsageError(f"--name {args.name!r}: expected a file prefix of letters, digits, '_', '.' and '-' "
                         "(no folders), e.g. digits")
    cfg = Config.from_dict(read_json(run / "config.json", "run config"), f"{run / 'config.json'}") \
        if (run / "config.json").is_file() else None
    gmm = cfg is not None and cfg.toy
    names = ("config.json", "results.md", "samples.png", "w2_vs_nfe.png") if gmm else \
        ("config.json", "results.md", "samples_overview.png", "losses.png")
    missing = [str(run / f) for f in names if not (run / f).is_file()]
    if missing:
        raise UsageError(f"--run {run} is not a finished run folder (missing {', '.join(missing)})")
    if cfg.quick and not args.allow_quick:
        raise UsageError(f"--run {run} is a --quick run (barely trained networks): its numbers would replace "
                         "measured ones; pass --allow-quick to export it anyway")
    if to.exists() and not to.is_dir():
        raise UsageError(f"--to {to} is a file, not a folder")
    try:
        (to / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"export: cannot create {to / 'figures'}: {e.strerror}") from None
    info = read_record(run / "run_info.json")
    name = args.name or cfg.dataset
    cmd = args.command or " ".join(["python", "train/run.py", *info.get("argv", [])[1:]])
    if gmm:
        figures = {"samples.png": "samples.png", "w2_vs_nfe.png": "w2_vs_nfe.png"}
        head = f"Command: `{cmd}`"
    else:
        try:
            metric_png = next(p for p in sorted(run.glob("*_vs_nfe.png")) if not p.name.startswith("fid_"))
        except StopIteration:
            raise UsageError(f"--run {run} has no *_vs_nfe.png figure (an unfinished evaluation?)") from None
        figures = {metric_png.name: metric_png.name.replace("digits_", ""), "samples_overview.png": "samples.png",
                   "losses.png": "losses.png"}
        timing = read_record(run / "timing.json")
        head = (f"# {name}: Table 1 layout, measured\n\n"
                f"Command: `{cmd}`  \n"
                f"Training: {cfg.iterations} iterations, batch {cfg.batch_size}, preset `{cfg.preset}`"
                f"{' with ' + json.dumps(cfg.net) if cfg.net else ''}, seed {cfg.seed}; "
                f"{_seconds(timing.get('train_seconds'))}. Evaluation: {_seconds(timing.get('eval_seconds'))}. "
                f"Device: {timing.get('device', info.get('device', '?'))}, {timing.get('threads', '?')} thread(s), "
                f"{timing.get('world_size', info.get('world_size', '?'))} process(es), torch {info.get('torch', '?')}.")
        if "digits_classifier_test_accuracy" in timing:
            head += (f" digits-FD features: a small CNN trained on 80% of the digits "
                     f"(held-out accuracy {timing['digits_classifier_test_accuracy']:.3f}).")
        if cfg.projection_only:
            src = cfg.score_from
            head += (f" Only T was trained (--score-from), on the frozen {src['kind']} score at `{src['path']}` "
                     f"(sha256 {src['sha256'][:12]}...); the preset above is T's.")
            projection = _projection_files(run)
    for src, dst in figures.items():
        _put(to / "figures" / f"{name}_{dst}", (run / src).read_bytes())
    _put(to / f"{name}_results.md", (head + "\n\n" + (run / "results.md").read_text()).encode())
    if not gmm and cfg.projection_only:
        for f in projection:
            _put(to / f"{name}_projection" / f.name, f.read_bytes())
    print(f"wrote {to / f'{name}_results.md'} and {to / 'figures'}/{name}_*.png"
          + (f"; T in {to / f'{name}_projection'}" if not gmm and cfg.projection_only else ""))
    return 0


def _projection_files(run: Path) -> list[Path]:
    """T of a projection-only run in the standard format (config.json + model.safetensors, or model.pt of
    tensors only): `wgfcore.pretrained.load_projection` reads the exported copy without this trainer."""
    src = run / EXPORT_DIR
    weights = [src / w for w in (WEIGHTS_SAFETENSORS, WEIGHTS_TORCH) if (src / w).is_file()]
    if not (src / CONFIG).is_file() or not weights:
        raise UsageError(f"--run {run} has no exported T in {src} (a projection-only run that did not finish?)")
    return [src / CONFIG, *weights]


__all__ = ["export_job"]
