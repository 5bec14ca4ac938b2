"""Joint training of the score (epsilon) and projection U-Nets, and the Table 1 evaluation.

Training: `wgfcore.losses.joint_loss` (ALGORITHMS §1 and §3) with AdamW, warm-up, gradient
clipping, EMA of both networks, bf16 autocast on GPU, DDP, atomic checkpoints and exact resume
(the data order and the loss noise are functions of (seed, rank, step) and of saved generator
states). Evaluation: the rows of Ghimire et al. Table 1 (EM and Predict-Project, ALGORITHMS §2)
plus EM at 2N steps and Heun on the PF-ODE at equal NFE, columns N; metric digits-FD or FID (§7).
"""
from __future__ import annotations

import copy
import functools
import csv
import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from wgfcore import ops
from wgfcore.losses import joint_loss
from wgfcore.sample import eps_to_score, nfe, sample
from wgfcore.sde import VPSDE

from . import checkpoint as ckpt
from . import distributed as D
from .fid import Stats, frechet_distance

#: Table 1 rows: key -> (label, sampler, steps per column N)
ROWS = {
    "em": ("Score-based (EM)", "euler_maruyama", 1),
    "pp": ("Predict-Project", "predict_project", 1),
    "em2n": ("Score-based (EM, 2N steps)", "euler_maruyama", 2),
    "heun": ("Heun PF-ODE", "heun_ode", 1),
}


# --- networks -------------------------------------------------------------------------------------

def build_nets(cfg: dict):
    """Score (epsilon) and projection networks: the same U-Net twice (Ghimire et al. App. B).

    cfg['preset'] names a `UNet.from_preset` preset; cfg['net'] (optional) overrides its arguments."""
    from wgfcore.nets import UNet

    kw = dict(cfg.get("net") or {}, img_resolution=cfg["resolution"], in_channels=cfg["channels"])
    for k, v in kw.items():  # JSON has no tuples
        if isinstance(v, list):
            kw[k] = tuple(v)
    return UNet.from_preset(cfg["preset"], **kw), UNet.from_preset(cfg["preset"], **kw)


def set_attention_backend(nets, backend: str) -> None:
    for net in nets:
        if not hasattr(net, "set_attention_backend"):
            raise TypeError(f"{type(net).__name__} has no set_attention_backend(); --fused needs the wgfcore U-Net")
        net.set_attention_backend(backend)


class JointObjective(nn.Module):
    """Both networks in one module, so that DDP syncs all gradients after a single forward."""

    def __init__(self, eps_model: nn.Module, proj_model: nn.Module, sde: VPSDE, cfg: dict):
        super().__init__()
        self.eps, self.proj, self.sde = eps_model, proj_model, sde
        dt = cfg["delta_tau"]
        self.delta_tau = [int(n) for n in dt] if isinstance(dt, (list, tuple)) else float(dt)
        self.proj_weight = float(cfg["proj_weight"])

    def forward(self, x0: torch.Tensor, generator: torch.Generator):
        loss, parts = joint_loss(self.eps, self.proj, x0, self.sde, delta_tau=self.delta_tau,
                                 proj_weight=self.proj_weight, generator=generator)
        return loss, torch.stack([parts["dsm"], parts["proj"]])


class EMA:
    """Exponential moving average of a network's parameters (buffers copied as they are)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = float(decay)
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        ema_p = [p for p in self.net.parameters()]
        src_p = [p.detach() for p in net.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warm-up to cfg['lr'] over cfg['warmup'] steps, then constant (as in score_sde)."""
    w = int(cfg.get("warmup", 0))
    return cfg["lr"] * min(1.0, (step + 1) / w) if w > 0 else cfg["lr"]


# --- data order -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, n: int, global_batch: int, seed: int, d: D.Dist) -> torch.Tensor:
    """Indices of this rank's share of the global batch at `step`: a function of (seed, step) only.

    Epoch e uses randperm(n) from a generator seeded by (seed, e); a step takes the next
    `global_batch` indices (the last incomplete batch of an epoch is dropped), and rank r its r-th slice.
    """
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
    epoch, j = divmod(step, per_epoch)
    perm = _epoch_perm(n, int(seed), epoch)
    per_rank = global_batch // d.world
    lo = j * global_batch + d.rank * per_rank
    return perm[lo:lo + per_rank]


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields `batch_indices(step)` for step = start .. stop-1 (for file datasets read by a DataLoader)."""

    def __init__(self, n, global_batch, seed, d, start, stop):
        self.args, self.start, self.stop = (n, global_batch, seed, d), start, stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        n, gb, seed, d = self.args
        for step in range(self.start, self.stop):
            yield batch_indices(step, n, gb, seed, d).tolist()


def batches(dataset, cfg: dict, d: D.Dist, start: int, stop: int):
    """Iterator over (step, x0 on device) from `start` to `stop`."""
    n, gb, seed = len(dataset), cfg["batch_size"], cfg["seed"]
    if gb % d.world:
        raise ValueError(f"batch_size {gb} must be divisible by the number of processes {d.world}")
    data = getattr(dataset, "data", None)
    if data is not None:  # in memory: index directly
        for step in range(start, stop):
            yield step, data[batch_indices(step, n, gb, seed, d)].to(d.device, non_blocking=True)
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatchSampler(n, gb, seed, d, start, stop), num_workers=cfg["num_workers"],
        pin_memory=d.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if cfg["num_workers"] > 0 else None)
    for step, x in zip(range(start, stop), loader):
        yield step, x.to(d.device, non_blocking=True)


# --- logging --------------------------------------------------------------------------------------

LOSS_FIELDS = ["step", "loss", "dsm", "proj", "lr", "grad_norm_eps", "grad_norm_proj", "seconds"]


class LossLog:
    """losses.csv (rank 0), truncated to the resume step so a resumed run has no duplicate rows."""

    def __init__(self, path: Path, resume_step: int | None, tb_dir: Path | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, LOSS_FIELDS)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        if tb_dir is not None:
            try:  # TensorBoard is optional
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(tb_dir))
            except Exception:
                self.tb = None

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOSS_FIELDS).writerow(row)
        if self.tb is not None:
            for k in ("loss", "dsm", "proj", "lr", "grad_norm_eps", "grad_norm_proj"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, scale: int = 1) -> None:
    from torchvision.utils import save_image

    x = (x.float().clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=2, pad_value=1.0)


# --- training -------------------------------------------------------------------------------------

def _autocast(d: D.Dist, cfg: dict):
    on = d.device.type == "cuda" and bool(cfg.get("bf16", True))
    return torch.autocast(device_type=d.device.type, dtype=torch.bfloat16, enabled=on)


def _grad_norm_clip(params, max_norm: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def _state(step, obj, opt, ema_eps, ema_proj, cfg, d, gen) -> dict:
    """Everything needed to continue exactly; RNG states of every rank (gathered to rank 0)."""
    rng = ckpt.capture_rng({"loss_noise": gen})
    if d.enabled:
        box = [None] * d.world
        torch.distributed.all_gather_object(box, rng)
        rng = box
    else:
        rng = [rng]
    return {"step": step, "config": cfg, "world_size": d.world,
            "eps": obj.eps.state_dict(), "proj": obj.proj.state_dict(),
            "ema_eps": ema_eps.net.state_dict(), "ema_proj": ema_proj.net.state_dict(),
            "optimizer": opt.state_dict(), "rng": rng}


def train(cfg: dict, run_dir: Path, d: D.Dist | None = None, *, resume: Path | None = None,
          make_nets: Callable[[dict], tuple[nn.Module, nn.Module]] | None = None, fused: bool = False,
          dataset=None, progress: bool = True, stop_at: int | None = None):
    """Train for cfg['iterations'] steps (from a checkpoint with `resume`). Returns (eps_ema, proj_ema,
    logged rows). `stop_at` stops after that step, as an interruption would (checkpoint written)."""
    from .datasets import make_dataset

    d = d or D.Dist()
    run_dir = Path(run_dir)
    make_nets = make_nets or build_nets
    if dataset is None:
        dataset = make_dataset(cfg["dataset"], cfg.get("data_root"), cfg["resolution"])
    sde = VPSDE()

    torch.manual_seed(cfg["seed"])  # same initial weights on every rank (DDP also broadcasts them)
    eps_model, proj_model = make_nets(cfg)
    if fused:
        set_attention_backend([eps_model, proj_model], "triton")
    obj = JointObjective(eps_model, proj_model, sde, cfg).to(d.device)
    ema_eps, ema_proj = EMA(obj.eps, cfg["ema_decay"]), EMA(obj.proj, cfg["ema_decay"])
    opt = torch.optim.AdamW(obj.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0),
                            betas=tuple(cfg.get("adam_betas", (0.9, 0.999))))
    gen = torch.Generator(device=d.device).manual_seed(int(cfg["seed"]) * 7919 + d.rank + 1)

    start = 0
    if resume is not None:
        state = ckpt.load(resume, map_location="cpu")
        if int(state["world_size"]) != d.world:
            raise SystemExit(f"{resume} was written by {state['world_size']} processes; resume it with "
                             f"the same number (got {d.world}) so the data order and noise continue exactly")
        obj.eps.load_state_dict(state["eps"])
        obj.proj.load_state_dict(state["proj"])
        ema_eps.net.load_state_dict(state["ema_eps"])
        ema_proj.net.load_state_dict(state["ema_proj"])
        opt.load_state_dict(state["optimizer"])
        ckpt.restore_rng(state["rng"][d.rank], {"loss_noise": gen})
        start = int(state["step"])

    model = obj
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            obj, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    log = LossLog(run_dir / "losses.csv", start if resume is not None else None,
                  run_dir / "tensorboard") if d.main else None
    ckpt_dir = run_dir / "checkpoints"
    rows, acc, t0 = [], [], time.time()
    every = max(1, int(cfg["log_every"]))
    stop = cfg["iterations"] if stop_at is None else min(stop_at, cfg["iterations"])
    bar = tqdm(total=cfg["iterations"], initial=start, desc="train", disable=not (progress and d.main),
               dynamic_ncols=True)
    obj.train()
    for step, x0 in batches(dataset, cfg, d, start, stop):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        with _autocast(d, cfg):
            loss, parts = model(x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn_eps = _grad_norm_clip(obj.eps.parameters(), cfg["grad_clip"])
        gn_proj = _grad_norm_clip(obj.proj.parameters(), cfg["grad_clip"])
        opt.step()
        ema_eps.update(obj.eps)
        ema_proj.update(obj.proj)
        acc.append(torch.cat([loss.detach().float().view(1), parts.float(), gn_eps.view(1), gn_proj.view(1)]))
        done = step + 1
        bar.update(1)
        if done % every == 0 or done == stop:
            m = D.all_reduce_sum(d, torch.stack(acc).mean(0)) / d.world  # one host sync per log interval
            acc = []
            m = m.tolist()
            row = {"step": done, "loss": m[0], "dsm": m[1], "proj": m[2], "lr": lr, "grad_norm_eps": m[3],
                   "grad_norm_proj": m[4], "seconds": round(time.time() - t0, 3)}
            rows.append(row)
            if d.main:
                log.write(row)
                bar.set_postfix(loss=f"{m[0]:.4g}", dsm=f"{m[1]:.4g}", proj=f"{m[2]:.4g}")
        if cfg.get("sample_every") and done % cfg["sample_every"] == 0 and d.main:
            obj.eval()
            with torch.no_grad():
                x, _ = _draw(ema_eps.net, ema_proj.net, sde, "predict_project", 20, min(64, cfg["eval"]["grid"]),
                             cfg, d, seed=cfg["seed"] + 10_000, backend="triton" if fused else "auto")
            save_grid(x, run_dir / "samples" / f"train_step{done:08d}_pp20.png", scale=_grid_scale(cfg))
            obj.train()
        if done % cfg["ckpt_every"] == 0 or done == stop:
            snap = bool(cfg.get("snapshot_every")) and done % cfg["snapshot_every"] == 0
            state = _state(done, obj, opt, ema_eps, ema_proj, cfg, d, gen)
            if d.main:
                ckpt.save_checkpoint(state, ckpt_dir, done, keep_snapshot=snap)
            D.barrier(d)
    bar.close()
    if log is not None:
        log.close()
        plot_losses(run_dir / "losses.csv", run_dir / "losses.png")
    return ema_eps.net, ema_proj.net, rows


# --- evaluation -----------------------------------------------------------------------------------

def _grid_scale(cfg):
    return max(1, 64 // cfg["resolution"])


def _score_and_proj(eps_net, proj_net, sde, cfg, d):
    """Wrap the EMA networks as score / projection functions (bf16 network on GPU, fp32 update)."""
    eps_score = eps_to_score(eps_net, sde)

    def score_fn(x, t):
        with _autocast(d, cfg):
            return eps_score(x, t).float() if d.device.type == "cuda" else eps_score(x, t)

    def proj_fn(x, t):
        with _autocast(d, cfg):
            return proj_net(x, t).float()

    return score_fn, proj_fn


def _draw(eps_net, proj_net, sde, sampler, steps, n, cfg, d, *, seed, backend, delta_p=None, progress=False):
    """n samples with `sampler` for `steps` steps; returns (x, network calls per sample)."""
    score_fn, proj_fn = _score_and_proj(eps_net, proj_net, sde, cfg, d)
    shape = (n, cfg["channels"], cfg["resolution"], cfg["resolution"])
    return sample(score_fn, shape, steps, sampler=sampler, proj_fn=proj_fn if sampler == "predict_project" else None,
                  delta_p=delta_p, seed=seed, device=d.device, backend=backend, progress=progress,
                  return_nfe=True, sde=sde)


def samples_at(ecfg: dict, N: int) -> int:
    """Samples per cell in column N: ecfg['samples'], or ecfg['samples_at'][str(N)] where given."""
    return int((ecfg.get("samples_at") or {}).get(str(N), ecfg["samples"]))


def cells(ecfg: dict):
    """(row key, column N) cells in table order, each with its sampler, step count, NFE, delta_p and
    sample count; cells listed in ecfg['skip'] as "row@N" are left out (budget)."""
    out = []
    skip = set(ecfg.get("skip") or [])
    for key in ecfg["rows"]:
        if key not in ROWS:
            raise ValueError(f"unknown evaluation row {key!r}; choose from {sorted(ROWS)}")
        label, sampler, mult = ROWS[key]
        for N in ecfg["steps"]:
            if f"{key}@{N}" in skip:
                continue
            steps = int(N) * mult
            dp = None
            if sampler == "predict_project":
                dp = ecfg.get("delta_p", {}).get(str(N)) if ecfg.get("delta_p") else None
                dp = ops.default_delta_p(int(N)) if dp is None else float(dp)
            out.append({"row": key, "label": label, "sampler": sampler, "N": int(N), "steps": steps,
                        "nfe": nfe(sampler, steps), "delta_p": dp, "n": samples_at(ecfg, int(N))})
    return out


@torch.no_grad()
def evaluate(cfg: dict, eps_net, proj_net, features, ref: tuple, out_dir: Path, d: D.Dist | None = None, *,
             ecfg: dict | None = None, backend: str = "auto", progress: bool = True, prefix: str = "",
             extra_rows: list | None = None):
    """Fill the Table 1 grid: for every (row, N), draw ecfg['samples'] samples with the EMA networks,
    take `features`, and report the Fréchet distance to the reference statistics `ref` = (mu, sigma).

    Samples are drawn in batches whose seed depends only on the batch index (the same prior draws
    for every cell), and batches are dealt to ranks round-robin, so the numbers do not depend on the
    number of processes. Writes <prefix>results.csv/.md, a grid per cell and the metric-vs-NFE plot.
    """
    d = d or D.Dist()
    ecfg = ecfg or cfg["eval"]
    sde = VPSDE()
    eps_net.eval().to(d.device)
    proj_net.eval().to(d.device)
    bs = int(ecfg["batch"])
    n_boot = int(ecfg.get("bootstrap", 0))
    kept_all = {}
    todo = cells(ecfg)
    mine = {c["n"]: [b for b in range(math.ceil(c["n"] / bs)) if b % d.world == d.rank] for c in todo}
    results = []
    bar = tqdm(total=sum(len(mine[c["n"]]) for c in todo), desc=f"evaluate ({features.name})",
               disable=not (progress and d.main), dynamic_ncols=True)
    for c in todo:
        t0 = time.time()
        st = Stats(features.dims)
        kept = []  # features themselves, only when a bootstrap is asked for (small feature spaces)
        calls, n = 0, c.pop("n")
        for b in mine[n]:
            x, calls = _draw(eps_net, proj_net, sde, c["sampler"], c["steps"], min(bs, n - b * bs), cfg, d,
                             seed=int(cfg["seed"]) * 100_003 + 12_345 + b, backend=backend, delta_p=c["delta_p"],
                             progress=progress and d.main and c["steps"] >= 200)
            f = features(x)
            st.add(f)
            if n_boot:
                kept.append(f)
            if b == 0 and d.main:
                save_grid(x[: ecfg.get("grid", 64)], out_dir / "samples" / f"{prefix}{c['row']}_N{c['N']}.png",
                          scale=_grid_scale(cfg))
            bar.update(1)
        st = Stats.unpack(D.all_reduce_sum(d, st.packed().to(d.device)).cpu(), features.dims)
        if calls and calls != c["nfe"]:
            raise RuntimeError(f"{c['sampler']} made {calls} network calls for {c['steps']} steps, "
                               f"expected {c['nfe']}")
        mu, sigma = st.mu_sigma()
        value = frechet_distance(mu, sigma, *ref)
        se = None
        if n_boot:
            allf = D.all_gather_cat(d, torch.cat(kept).to(d.device) if kept else
                                    torch.zeros(0, features.dims, dtype=torch.float64, device=d.device)).cpu()
            se = bootstrap_se(allf, ref, n_boot, seed=int(cfg["seed"]))
            kept_all[(c["row"], c["N"])] = allf
        r = dict(c, metric=features.name, value=value, se=se, n_samples=int(st.n),
                 seconds=round(time.time() - t0, 2))
        results.append(r)
        bar.set_postfix_str(f"{c['row']} N={c['N']}: {value:.3f}")
    bar.close()
    paired = []
    for N in ecfg["steps"]:  # sample i of every cell starts from the same prior draw: compare in pairs
        if ("em", N) in kept_all and ("pp", N) in kept_all:
            diff, se = paired_difference(kept_all[("pp", N)], kept_all[("em", N)], ref, n_boot, int(cfg["seed"]))
            paired.append({"row": "pp_minus_em", "label": "Predict-Project minus EM (paired)", "sampler": "difference",
                           "N": int(N), "steps": int(N), "nfe": "", "delta_p": None, "metric": features.name,
                           "value": diff, "se": se, "n_samples": kept_all[("pp", N)].shape[0], "seconds": 0.0})
    if d.main:
        write_results(results + paired + (extra_rows or []), out_dir, prefix, cfg, ecfg, features.name)
    return results + paired


def bootstrap_se(f: torch.Tensor, ref: tuple, n_boot: int, seed: int = 0) -> float:
    """Standard deviation of the Fréchet distance over `n_boot` resamples (with replacement) of the
    generated features `f` (n, d), the reference held fixed: the sampling noise of one cell's value."""
    g = torch.Generator().manual_seed(seed)
    n = f.shape[0]
    vals = [frechet_distance(*Stats(f.shape[1]).add(f[torch.randint(0, n, (n,), generator=g)]).mu_sigma(), *ref)
            for _ in range(n_boot)]
    return float(torch.tensor(vals, dtype=torch.float64).std())


def paired_difference(f_a: torch.Tensor, f_b: torch.Tensor, ref: tuple, n_boot: int, seed: int = 0):
    """FD(a) - FD(b) and its bootstrap standard deviation, resampling the pairs (a_i, b_i) together.

    Cells share their prior draws and noise seeds sample by sample, so this paired error is much
    smaller than the two cells' own errors combined."""
    if f_a.shape != f_b.shape:
        raise ValueError(f"paired cells need equal sample counts, got {tuple(f_a.shape)} and {tuple(f_b.shape)}")
    dims, n = f_a.shape[1], f_a.shape[0]

    def fd(f):
        return frechet_distance(*Stats(dims).add(f).mu_sigma(), *ref)

    g = torch.Generator().manual_seed(seed + 1)
    vals = []
    for _ in range(n_boot):
        i = torch.randint(0, n, (n,), generator=g)
        vals.append(fd(f_a[i]) - fd(f_b[i]))
    return fd(f_a) - fd(f_b), float(torch.tensor(vals, dtype=torch.float64).std())


def write_results(results, out_dir: Path, prefix: str, cfg: dict, ecfg: dict, metric: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["row", "label", "sampler", "N", "steps", "nfe", "delta_p", "metric", "value", "se", "n_samples",
              "seconds"]
    with open(out_dir / f"{prefix}results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    (out_dir / f"{prefix}results.md").write_text(results_markdown(results, ecfg, metric))
    name = metric.lower().replace("-", "_")
    plot_metric(results, out_dir / (f"{prefix}vs_nfe.png" if prefix.startswith(name) else
                                    f"{prefix}{name}_vs_nfe.png"), metric)
    overview_figure(out_dir, [r for r in results if r["row"] in ROWS], ecfg, out_dir / f"{prefix}samples_overview.png",
                    resolution=cfg["resolution"], scale=_grid_scale(cfg), prefix=prefix)


def _cell(r) -> str:
    se = f" ± {r['se']:.1f}" if r.get("se") not in (None, "") else ""
    return f"{r['value']:.2f}{se} (NFE {r['nfe']})"


def results_markdown(results, ecfg: dict, metric: str) -> str:
    """Table 1 layout: a row per sampler, a column per N, each cell 'value (NFE k)'."""
    Ns = list(ecfg["steps"])
    grid = [r for r in results if r["row"] in ROWS]
    extra = [r for r in results if r["row"] not in ROWS]
    head = "| Sampler | " + " | ".join(f"N={N}" for N in Ns) + " |\n|---|" + "---:|" * len(Ns) + "\n"
    lines = []
    for key in ecfg["rows"]:
        cellv = {r["N"]: r for r in grid if r["row"] == key}
        if not cellv:
            continue
        vals = [_cell(cellv[N]) if N in cellv else "not run" for N in Ns]
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(vals) + " |")
    pairs = {r["N"]: r for r in extra if r["row"] == "pp_minus_em"}
    if pairs:
        lines.append("| Predict-Project minus EM, paired | " + " | ".join(
            f"{pairs[N]['value']:+.2f} ± {pairs[N]['se']:.1f}" if N in pairs else "" for N in Ns) + " |")
    extra = [r for r in extra if r["row"] != "pp_minus_em"]
    for r in extra:  # reference rows (e.g. the estimator's floor at each sample count)
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['value']:.2f}" if r["n_samples"] in {c["n_samples"] for c in grid if c["N"] == N} else ""
            for N in Ns) + " |")
    per_col = ", ".join(f"N={N}: {sorted({r['n_samples'] for r in grid if r['N'] == N})[0]}"
                        for N in Ns if any(r["N"] == N for r in grid))
    dps = ", ".join(f"N={r['N']}: {r['delta_p']:.3g}" for r in grid if r["row"] == "pp")
    note = (f"\n{metric}, lower is better. Samples per cell: {per_col}. NFE = network evaluations per sample "
            f"(Predict-Project and Heun call a network twice per step).")
    if dps:
        note += f" Predict-Project delta_p: {dps}."
    if any(r.get("se") is not None for r in grid):
        note += (f" ± is the bootstrap standard deviation ({ecfg.get('bootstrap')} resamples of the generated "
                 f"samples, reference fixed). The paired row resamples EM and Predict-Project samples together "
                 f"(sample i of both starts from the same prior draw and noise seed); negative favours "
                 f"Predict-Project, and only a difference beyond about twice its ± is a finding.")
    return head + "\n".join(lines) + "\n" + note + "\n"


def plot_metric(results, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    for key, (label, _, _) in ROWS.items():
        rs = sorted((r for r in results if r["row"] == key), key=lambda r: r["nfe"])
        if rs:
            se = [r.get("se") for r in rs]
            ax.errorbar([r["nfe"] for r in rs], [r["value"] for r in rs], marker="o", label=label, capsize=3,
                        yerr=None if any(v is None for v in se) else se)
    for r in results:
        if r["sampler"] == "data":
            ax.axhline(r["value"], color="gray", ls=":", lw=1, label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel("NFE per sample (log scale)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_losses(csv_path: Path, path: Path) -> None:
    """Training curves from losses.csv: L_dsm and L_proj against the step (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    step = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    ax.plot(step, [float(r["dsm"]) for r in rows], label="L_dsm (score, eps-prediction)")
    ax.plot(step, [float(r["proj"]) for r in rows], label="L_proj (projection)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss per sample (mean over the log interval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overview_figure(run_dir: Path, results, ecfg: dict, path: Path, k: int = 4, resolution: int = 16,
                    scale: int = 1, prefix: str = "") -> None:
    """One figure of the first k x k samples of every evaluated cell (rows: samplers, columns: N),
    cut from the per-cell grids in run_dir/samples (tiles of resolution*scale px, 2 px padding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [key for key in ecfg["rows"] if any(r["row"] == key for r in results)]
    Ns = list(ecfg["steps"])
    tile = resolution * scale + 2
    fig, axes = plt.subplots(len(rows), len(Ns), figsize=(1.9 * len(Ns) + 1.2, 1.9 * len(rows) + 0.3), dpi=100,
                             squeeze=False)
    for i, key in enumerate(rows):
        for j, N in enumerate(Ns):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = next((r for r in results if r["row"] == key and r["N"] == N), None)
            f = Path(run_dir) / "samples" / f"{prefix}{key}_N{N}.png"
            if r is not None and f.is_file():
                with Image.open(f) as im:
                    ax.imshow(im.convert("L").crop((0, 0, 2 + k * tile, 2 + k * tile)), cmap="gray", vmin=0,
                              vmax=255, interpolation="nearest")
                ax.set_title(f"N={N}, NFE {r['nfe']}: {r['value']:.1f}", fontsize=7)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            if j == 0:
                ax.set_ylabel(ROWS[key][0].replace(" (", "\n("), fontsize=7)
    metric = results[0]["metric"] if results else ""
    fig.suptitle(f"First {k * k} samples per cell (same prior draws); titles: {metric}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load_run(run_dir: Path, map_location="cpu", make_nets=None):
    """(config, EMA score net, EMA projection net, step) from a run folder's newest checkpoint."""
    run_dir = Path(run_dir)
    path = ckpt.find_resumable(run_dir / "checkpoints")
    if path is None:
        raise ckpt.CheckpointError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
    state = ckpt.load(path, map_location=map_location)
    cfg = state["config"]
    eps_net, proj_net = (make_nets or build_nets)(cfg)
    eps_net.load_state_dict(state["ema_eps"])
    proj_net.load_state_dict(state["ema_proj"])
    return cfg, eps_net.eval(), proj_net.eval(), int(state["step"])


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


__all__ = ["ROWS", "build_nets", "JointObjective", "EMA", "lr_at", "batch_indices", "train", "evaluate", "cells",
           "results_markdown", "plot_metric", "plot_losses", "overview_figure", "save_grid", "load_run", "set_attention_backend"]
