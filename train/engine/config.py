"""A run's configuration as the code reads it: the typed `Config` (and its `EvalConfig`), made from a
checked JSON dict; how a new run's config is assembled from its layers (dataset file, --quick,
--config, command line); and what a resumed run may change.

The JSON dict stays the stored form (config.json, every checkpoint's "config"), unchanged key for key:
`Config.data` is that dict, and `Config.from_dict` is the one place that reads its keys. Every
default of an optional key is written here, once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import UsageError
from .schema import DATASETS, EVAL_SCHEMA, SCHEMA, IMAGE_DATASETS, PAPER_DATASETS, merge, read_json, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: --quick on a paper dataset: the same data and metric, a tiny network and budget (a pipeline check)
QUICK_PAPER = {"preset": "tiny", "iterations": 20, "batch_size": 8, "warmup": 5, "ema_decay": 0.9, "log_every": 5,
               "ckpt_every": 10, "sample_every": 0, "snapshot_every": 0, "num_workers": 2,
               "eval": {"steps": [20], "samples": 16, "batch": 16, "ref_samples": 64}}

#: what a resumed run may change (everything else is fixed by the checkpoint's config)
RESUMABLE = {"iterations", "eval", "log_every", "sample_every", "ckpt_every", "snapshot_every", "num_workers",
             "data_root", "compile"}


def _frozen(v):
    return tuple(_frozen(x) for x in v) if isinstance(v, list) else v


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation table: rows (sampler keys of `train.evaluation.table.ROWS`) x columns N."""

    steps: tuple
    samples: int
    rows: tuple = ()
    metric: str = "w2"
    batch: int | None = None
    samples_at: dict = field(default_factory=dict)  # {"N": samples} where a column differs
    skip: tuple = ()  # "row@N" cells left out for budget
    grid: int = 64  # samples in each cell's image grid
    classifier_epochs: int = 12
    bootstrap: int = 0
    ref_samples: int = 50_000
    delta_p: float | dict | None = None  # None: the paper's per N
    seeds: int = 1


@dataclass(frozen=True)
class Config:
    """A checked run configuration (schema: `train.engine.schema.SCHEMA`). `data` is the JSON dict it
    was made from, which is what config.json and checkpoints store."""

    dataset: str
    batch_size: int
    iterations: int
    lr: float
    ema_decay: float
    delta_tau: float | tuple
    log_every: int
    ckpt_every: int
    grad_clip: float
    seed: int
    eval: EvalConfig
    resolution: int | None = None
    channels: int | None = None
    preset: str | None = None
    net: dict = field(default_factory=dict)
    proj_net: dict = field(default_factory=dict)  # overrides of `net` for the projection network T alone
    hidden: int | None = None
    num_workers: int = 0
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.0
    optimizer: str = "adamw"
    adam_betas: tuple = (0.9, 0.999)
    warmup: int = 0
    weight_decay: float = 0.0
    clip_jointly: bool = False
    proj_weight: float = 1.0
    bf16: bool = True
    sample_every: int = 0
    snapshot_every: int = 0
    cpu_threads: int | None = None
    data_root: str | None = None
    compile: str | bool = False
    quick: bool = False  # set on --quick runs: untrained models, whose reports carry no verdicts
    resumes: tuple = ()  # written by the trainer: what each resume changed
    score_from: dict | None = None  # a projection-only run's frozen score (kind, path, sha256, ...)
    data: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "Config":
        d = validate(d, where)
        ev = EvalConfig(**{k: _frozen(v) for k, v in d["eval"].items()})
        kw = {k: _frozen(v) for k, v in d.items() if k not in ("eval", "_doc")}
        kw["net"], kw["proj_net"] = dict(d.get("net") or {}), dict(d.get("proj_net") or {})
        kw["compile"] = d.get("compile") or False
        if d.get("score_from") is not None:
            kw["score_from"] = json.loads(json.dumps(d["score_from"]))
        return cls(**kw, eval=ev, data=d)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self.data))

    def with_changes(self, where: str = "config", **changes) -> "Config":
        """A new Config with top-level keys replaced (eval: a dict merged into the current one)."""
        d = self.to_dict()
        if "eval" in changes:
            changes["eval"] = merge(d["eval"], changes["eval"])
        return Config.from_dict({**d, **changes}, where)

    @property
    def toy(self) -> bool:
        """The 2-D mixture job (MLPs, W2) rather than an image job."""
        return self.dataset == "gmm"

    @property
    def projection_only(self) -> bool:
        """Only T is trained, on the frozen score of `score_from` (train/run.py train --score-from)."""
        return self.score_from is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.resolution, self.resolution)


CONFIG_KEYS = {f.name for f in fields(Config)} - {"data"}
assert CONFIG_KEYS | {"_doc"} == set(SCHEMA) and {f.name for f in fields(EvalConfig)} == set(EVAL_SCHEMA), \
    "the typed config and the schema name the same keys"


# --- assembling a new run's config --------------------------------------------------------------------

def base_name(dataset: str, quick: bool) -> str:
    if dataset == "gmm":
        return "gmm_quick" if quick else "gmm"
    return "quick" if quick and dataset == "digits" else dataset


def build(dataset: str, quick: bool, config_file, overrides: dict, seed: int | None) -> Config:
    """The config of a new run: train/configs/<dataset>.json (or its --quick form), then the --config
    file, then the command line's explicit values; seed from --seed, else the files, else 0."""
    cfg = read_json(CONFIGS / f"{base_name(dataset, quick)}.json", "built-in config")
    if quick and dataset in PAPER_DATASETS:
        cfg = merge(cfg, QUICK_PAPER)
    if config_file:
        user = validate(read_json(config_file, "--config"), f"--config {config_file}", partial=True)
        if "dataset" in user and user["dataset"] != dataset:
            raise UsageError(f"--config {config_file} sets dataset {user['dataset']!r} but --dataset is {dataset!r}")
        cfg = merge(cfg, user)
    if overrides.get("preset"):  # a preset chosen on the command line comes without the config's narrowing
        cfg["net"] = {}
    cfg = merge(cfg, overrides)
    if seed is not None:
        cfg["seed"] = seed
    cfg.setdefault("seed", 0)
    if quick:
        cfg["quick"] = True
    cfg.pop("_doc", None)
    return Config.from_dict(cfg)


# --- resuming -----------------------------------------------------------------------------------------

def resume(saved: dict, asked: dict, step: int, where: str, evaluation_pending: bool = False) -> tuple[Config, dict]:
    """(config to continue with, {key: [old, new]} of the allowed changes) for a run resumed at `step`.

    `asked` holds only what the user set explicitly (command line and --config). Asking for another
    value of a key the checkpoint fixes is an error naming every such key; asking for the same value
    is fine. A run whose training is complete may be resumed only to finish its evaluation
    (`evaluation_pending`), or with more iterations."""
    conflicts, changed = [], {}
    for k, v in asked.items():
        old = saved.get(k)
        if k == "eval" and isinstance(old, dict):
            v = merge(old, v)
        if v == old:
            continue
        if k in RESUMABLE:
            changed[k] = [old, v]
        else:
            conflicts.append(f"{k} (checkpoint {json.dumps(old)}, asked {json.dumps(v)})")
    if conflicts:
        raise UsageError(f"{where} fixes {'; '.join(conflicts)}: a resumed run continues its own setup "
                         "(start a new run in another --out to change it)")
    cfg = merge(saved, {k: new for k, (_, new) in changed.items()})
    if cfg["iterations"] < step or cfg["iterations"] == step and not evaluation_pending:
        done = " (its training is complete)" if cfg["iterations"] == step else ""
        raise UsageError(f"{where} is at step {step}, and --iterations {cfg['iterations']} is not beyond it{done}: "
                         "ask for more iterations to continue the run, or re-evaluate it with `train/run.py eval`")
    if changed:
        cfg["resumes"] = list(saved.get("resumes", [])) + [{"at_step": step, "changed": changed}]
    return Config.from_dict(cfg, f"{where} (its config)"), changed


__all__ = ["Config", "EvalConfig", "build", "resume", "RESUMABLE", "DATASETS", "IMAGE_DATASETS", "PAPER_DATASETS",
           "QUICK_PAPER", "CONFIGS", "read_json", "merge", "validate"]
