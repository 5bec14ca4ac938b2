"""The schema every run configuration must satisfy: each key known, each value of the right type and
range, the keys each kind of job needs. A config is plain JSON (it travels inside every checkpoint and
as the run's config.json); a bad one is a `UsageError` naming the key, raised before any data is read
or any network is built. `train.engine.config` turns a checked dict into the typed `Config`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..evaluation.table import ROWS
from .errors import UsageError

IMAGE_DATASETS = ("digits", "celeba", "lsun_church", "svhn")
PAPER_DATASETS = ("celeba", "lsun_church", "svhn")
DATASETS = (*IMAGE_DATASETS, "gmm")
METRICS = ("digits-fd", "fid", "w2")
MAX_SEED = 2 ** 32 - 1  # seeds are scaled and offset inside 64-bit generator seeds
MAX_RESOLUTION = 512  # the paper's runs are 64x64; beyond this a U-Net does not fit a GPU's memory
#: image channels each dataset has
CHANNELS = {"digits": 1, "celeba": 3, "lsun_church": 3, "svhn": 3}

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None):
    def check(v):
        if not _is_int(v):
            return "an integer"
        if lo is not None and v < lo or hi is not None and v > hi:
            return f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    return check


def _num(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    def check(v):
        what = "a finite number" + (f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                                    if lo is not None and hi is not None else
                                    f" {'>' if lo_open else '>='} {lo}" if lo is not None else "")
        if not _is_num(v):
            return what
        if lo is not None and (v <= lo if lo_open else v < lo):
            return what
        if hi is not None and (v >= hi if hi_open else v > hi):
            return what
    return check


def _bool(v):
    if not isinstance(v, bool):
        return "true or false"


def _str(choices=None):
    def check(v):
        if not isinstance(v, str) or (choices is not None and v not in choices):
            return "a string" if choices is None else f"one of {', '.join(choices)}"
    return check


def _list(item, nonempty=True, length=None):
    def check(v):
        if length is not None and (not isinstance(v, list) or len(v) != length):
            return f"a list of {length} items"
        if not isinstance(v, list) or (nonempty and not v):
            return "a non-empty list"
        for x in v:
            bad = item(x)
            if bad:
                return f"a list whose items are each {bad}"
    return check


def _delta_tau(v):
    """One step size in (0, 0.999), or a list of step counts N >= 2 drawn per sample (wgfcore.losses)."""
    if _is_num(v) and 0 < v < 1 - 1e-3:
        return None
    if isinstance(v, list) and v and all(_is_int(n) and n >= 2 for n in v):
        return None
    return "a step size in (0, 0.999) or a list of step counts N >= 2"


def _delta_p(v):
    """None (the paper's default per N), one value for every N, or {"N": value}."""
    if v is None or (_is_num(v) and v > 0):
        return None
    if isinstance(v, dict) and all(str(k).isdigit() and _is_num(x) and x > 0 for k, x in v.items()):
        return None
    return 'null, a positive number, or an object {"N": positive number}'


def _net(v):
    if not isinstance(v, dict):
        return "an object of U-Net keyword arguments"
    for k, x in v.items():
        if not isinstance(x, (int, float, str, bool, list)):
            return f"an object of U-Net keyword arguments (net.{k} is {type(x).__name__})"


def _samples_at(v):
    if not isinstance(v, dict) or not all(str(k).isdigit() and _is_int(x) and x >= 2 for k, x in v.items()):
        return 'an object {"N": samples >= 2}'


def _compile(v):
    if v is False or v is None or (isinstance(v, str) and v):
        return None
    return "false or the name of a torch.compile backend"


def _anything(v):
    return None


def _score_from(v):
    """The frozen score of a projection-only run (train/jobs/projection.py): written by --score-from."""
    if not (isinstance(v, dict) and v.get("kind") in ("diffusers", "wgfcore") and isinstance(v.get("path"), str)
            and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64):
        return 'an object {"kind": "diffusers" or "wgfcore", "path": ..., "sha256": ...} (written by --score-from)'


def _rows(v):
    return _list(_str(tuple(ROWS)))(v)


def _skip(v):
    if not isinstance(v, list) or not all(isinstance(s, str) and "@" in s for s in v):
        return 'a list of "row@N" strings'


EVAL_SCHEMA = {
    "metric": _str(METRICS),
    "rows": _rows,
    "steps": _list(_int(1)),
    "samples": _int(2),
    "samples_at": _samples_at,
    "skip": _skip,
    "batch": _int(1),
    "grid": _int(1),
    "classifier_epochs": _int(1),
    "bootstrap": _int(0),
    "ref_samples": _int(2),
    "delta_p": _delta_p,
    "seeds": _int(1),
}

SCHEMA = {
    "_doc": _str(),
    "dataset": _str(DATASETS),
    "resolution": _int(4, MAX_RESOLUTION),
    "channels": _int(1),
    "preset": _str(),
    "net": _net,
    "proj_net": _net,  # overrides of `net` for the projection network T alone (its width, say)
    "hidden": _int(1),
    "batch_size": _int(1),
    "iterations": _int(1),
    "lr": _num(0, lo_open=True),
    "lr_schedule": _str(("constant", "cosine")),
    "lr_min_ratio": _num(0, 1),
    "optimizer": _str(("adam", "adamw")),
    "adam_betas": _list(_num(0, 1, hi_open=True), length=2),
    "warmup": _int(0),
    "weight_decay": _num(0),
    "grad_clip": _num(0),
    "clip_jointly": _bool,
    "ema_decay": _num(0, 1, hi_open=True),
    "delta_tau": _delta_tau,
    "proj_weight": _num(0),
    "bf16": _bool,
    "num_workers": _int(0),
    "log_every": _int(1),
    "sample_every": _int(0),
    "ckpt_every": _int(1),
    "snapshot_every": _int(0),
    "cpu_threads": _int(1),
    "seed": _int(0, MAX_SEED),
    "data_root": _str(),
    "compile": _compile,
    "eval": EVAL_SCHEMA,
    "quick": _bool,  # set on --quick runs: untrained models, whose reports carry no verdicts
    "resumes": _anything,  # written by the trainer: what each resume changed
    "score_from": _score_from,  # a projection-only run's frozen score (--score-from): only T is trained
}

REQUIRED = {
    "image": ["dataset", "resolution", "channels", "preset", "batch_size", "iterations", "lr", "ema_decay",
              "delta_tau", "proj_weight", "num_workers", "log_every", "ckpt_every", "grad_clip", "seed", "eval"],
    "gmm": ["dataset", "hidden", "batch_size", "iterations", "lr", "ema_decay", "delta_tau", "log_every",
            "ckpt_every", "grad_clip", "seed", "eval"],
}
REQUIRED_EVAL = {"image": ["metric", "rows", "steps", "samples", "batch"], "gmm": ["rows", "steps", "samples"]}
GMM_MIN_SAMPLES = 4  # one point per mode of the mixture


def validate(cfg, where: str = "config", partial: bool = False) -> dict:
    """Check `cfg` against SCHEMA (every key known, every value of the right type and range); with
    `partial`, required keys may be missing (a --config file holds only what it overrides)."""
    if not isinstance(cfg, dict):
        raise UsageError(f"{where} must be a JSON object, got {type(cfg).__name__} {json.dumps(cfg)[:40]}")
    _check(cfg, SCHEMA, where, "")
    if not partial:
        kind = "gmm" if cfg.get("dataset") == "gmm" else "image"
        missing = [k for k in REQUIRED[kind] if k not in cfg] + \
                  [f"eval.{k}" for k in REQUIRED_EVAL[kind] if k not in cfg.get("eval", {})]
        if missing:
            raise UsageError(f"{where} lacks {', '.join(missing)}")
        if cfg["ckpt_every"] % cfg["log_every"]:
            raise UsageError(f"{where}: ckpt_every ({cfg['ckpt_every']}) must be a multiple of log_every "
                             f"({cfg['log_every']}), so that every checkpoint follows a finiteness check and a "
                             "resumed run logs the same rows")
        pn = cfg.get("proj_net") or {}
        if kind == "gmm" and (set(pn) - {"hidden"} or "hidden" in pn and not (
                isinstance(pn["hidden"], int) and not isinstance(pn["hidden"], bool) and pn["hidden"] >= 1)):
            raise UsageError(f"{where}: for dataset gmm, proj_net takes only {{\"hidden\": T's MLP width >= 1}}, "
                             f"got {json.dumps(pn)[:60]}")
        ecfg = cfg["eval"]
        if kind == "image" and ecfg.get("metric") == "w2" or kind == "gmm" and ecfg.get("metric", "w2") != "w2":
            raise UsageError(f"{where}: eval.metric {ecfg.get('metric')!r} does not fit dataset {cfg['dataset']!r}")
        if kind == "image" and cfg["channels"] != CHANNELS[cfg["dataset"]]:
            raise UsageError(f"{where}: channels {cfg['channels']} does not fit dataset {cfg['dataset']!r} "
                             f"(its images have {CHANNELS[cfg['dataset']]})")
        if ecfg.get("metric") == "digits-fd" and (cfg["dataset"], cfg["resolution"]) != ("digits", 16):
            raise UsageError(f"{where}: eval.metric 'digits-fd' is defined for the 16x16 digits, not dataset "
                             f"{cfg['dataset']!r} at {cfg['resolution']}x{cfg['resolution']}")
        if kind == "gmm" and min([ecfg["samples"], *ecfg.get("samples_at", {}).values()]) < GMM_MIN_SAMPLES:
            raise UsageError(f"{where}: eval.samples must be at least {GMM_MIN_SAMPLES} for the gmm job (its W2 "
                             "reference holds the same number of points in each of the mixture's 4 modes)")
    return cfg


def _check(cfg: dict, schema: dict, where: str, prefix: str) -> None:
    for k, v in cfg.items():
        name = prefix + str(k)
        if k not in schema:
            raise UsageError(f"{where}: unknown key {name!r} (known: {', '.join(sorted(schema))})")
        spec = schema[k]
        if isinstance(spec, dict):
            if not isinstance(v, dict):
                raise UsageError(f"{where}: {name} must be an object, got {json.dumps(v)[:40]}")
            _check(v, spec, where, name + ".")
            continue
        bad = spec(v)
        if bad:
            raise UsageError(f"{where}: {name} must be {bad}, got {json.dumps(v)[:60]}")


def read_json(path, what: str) -> dict:
    """A JSON object from `path`, or a one-line UsageError (missing, not UTF-8, not JSON, not an object)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        obj = json.loads(text)
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{what} {path} must hold a JSON object, got {json.dumps(obj)[:40]}")
    return obj


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


__all__ = ["validate", "read_json", "merge", "SCHEMA", "EVAL_SCHEMA", "DATASETS", "IMAGE_DATASETS", "PAPER_DATASETS",
           "METRICS"]
