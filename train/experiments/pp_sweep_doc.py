"""How issue 20's sweep is written down (docs/pp_sweep.md, docs/pp_sweep_toy.md; ALGORITHMS §7): the table of
paired verdicts, every cell's value, the figure of quality against cost, and the page's generated section
between a pre-registration above it and a hand-written reading below it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..evaluation.plots import pyplot
from .pp_sweep_cost import LABEL

DOC_MARK = "## Results"
#: the reading of the results, written by hand below the generated section; re-generating keeps it
HAND_MARK = "<!-- written by hand from here on: the generator keeps it -->"


def rewrite_doc(doc: Path, generated: str, title: str) -> None:
    """Replace the generated section of `doc` (from its DOC_MARK heading up to HAND_MARK, if any): the part
    before it (a pre-registration) and the hand-written part after HAND_MARK are kept as they are."""
    old = doc.read_text() if doc.is_file() else title + "\n"
    head = old.split("\n" + DOC_MARK + "\n")[0].split(HAND_MARK)[0].rstrip("\n")
    tail = HAND_MARK + old.split(HAND_MARK, 1)[1] if HAND_MARK in old else ""
    doc.write_text(head + "\n\n" + generated.rstrip("\n") + "\n" + ("\n" + tail if tail else ""))


def cells_lines(values: dict, f: str) -> list:
    """Every drawn cell's value, one row per (cell, training seed, sample count) ({(seed, name, n): value}),
    so that the rows of a subset's file are rows of the full one."""
    L = ["| cell | training seed | n | value |", "|---|---:|---:|---:|"]
    for seed, name, n in sorted(values, key=lambda k: (k[1], k[0], k[2])):
        L.append(f"| {name} | {seed} | {n} | {format(values[(seed, name, n)], f)} |")
    return L


def _iv(d, f=".2f"):
    return "—" if d is None else f"{d['diff']:+{f}} [{d['lo']:+{f}}, {d['hi']:+{f}}]"


def sweep_lines(rows, metric: str, n: int, f: str = ".2f") -> list:
    """The table of the sweep: per configuration its paired differences against EM at equal cost."""
    short = {"pays": "**pays**", "loses": "**loses**", "within noise": "·", "one seed": "?"}
    L = [f"{metric} ({n} samples per cell) of the configuration minus that of EM at K steps, paired within each "
         "training seed, averaged over the seeds [95% t-interval over the seeds]; negative favours PP. K: the same N; "
         "equal NFE; equal FLOPs (⌈N(1 + F_T/F_score)⌉); equal wall time (⌈N·r⌉, r from the timing table). "
         "Verdicts: **pays** (interval below 0), **loses** (above 0), · (within noise). φ: the range of the per-step "
         "fraction √β·δp·δτ/(1 + √β/2) over the steps.", "",
         f"| T | N | δp | φ | {metric} | vs EM at N | vs EM, equal NFE (K) | vs EM, equal FLOPs (K) | "
         "vs EM, equal wall time (K) | NFE / FLOPs / wall |", "|---|---:|---:|---|---:|---|---|---|---|---|"]
    for r in rows:
        T = f"learned, width {r['width']}" if r["proj"] == "pp" else LABEL[r["proj"]]
        fr = f"{r['fraction'][0]:.3f}–{r['fraction'][1]:.2f}"
        if r.get("missing"):
            L.append(f"| {T} | {r['N']} | {r['dp']:g} | {fr} | not drawn | | | | | |")
            continue
        v = " / ".join(short[r[m]["verdict"]] if m in r else "—" for m in ("nfe", "flops", "wall"))
        L.append(f"| {T} | {r['N']} | {r['dp']:g} | {fr} | {r['value']:{f}} | {_iv(r.get('same_n'), f)} | "
                 f"{_iv(r.get('nfe'), f)} ({r['K']['nfe']}) | {_iv(r.get('flops'), f)} ({r['K']['flops']}) | "
                 f"{_iv(r.get('wall'), f)} ({r['K']['wall']}) | {v} |")
    done = [r for r in rows if not r.get("missing")]
    L += ["", f"Verdict counts over the {len(done)} drawn configurations (of {len(rows)}): " + "; ".join(
        f"{m}: " + ", ".join(f"{sum(1 for r in done if m in r and r[m]['verdict'] == k)} {k}"
                             for k in ("pays", "loses", "within noise")) for m in ("nfe", "flops", "wall")) + "."]
    pays = [(r, m) for r in done for m in ("nfe", "flops", "wall") if m in r and r[m]["verdict"] == "pays"]
    L += ["", "Candidates (a \"pays\" verdict; by the pre-registered rule a candidate stands only once confirmed on "
          "two further training seeds): " + ("; ".join(
              f"{LABEL[r['proj']] if r['proj'] != 'pp' else 'learned T width ' + r['width']}, N = {r['N']}, "
              f"δp = {r['dp']:g}, equal {m}: {_iv(r[m], f)}" for r, m in pays) or "none") + "."]
    return L


def plot(rows, curves, heun, cost, path: Path, ylabel: str, title: str = ""):
    """Three panels (NFE, FLOPs, wall time per sample): the EM curve, the Heun points and every drawn
    configuration, each at its mean over the seeds (rows' "fig"; curves {("em", K): {seed: value}})."""
    plt = pyplot()
    colours = {"1": "tab:red", "0.5": "tab:orange", "0.25": "tab:olive", "tweedie": "tab:purple",
               "tweedie_free": "tab:cyan"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), dpi=110)
    for ax, m, xl in zip(axes, ("nfe", "flops", "wall"), ("NFE per sample", "FLOPs per sample (counted)",
                                                        "wall time per sample (s, this machine)")):
        em = sorted((cost("em", k[1], None, m), np.mean(list(v.values()))) for k, v in curves.items())
        ax.plot(*zip(*em), "k.-", lw=1.2, label="EM (every step count drawn)")
        if heun:
            ax.plot(*zip(*sorted((cost("heun", N, None, m), v) for N, v in heun.items())), "b--", marker="D", ms=4,
                    lw=1, label="Heun PF-ODE")
        # diverged configurations would squash the axis: values above `top` are drawn at it, outlined black
        top = 3 * max([v for _, v in em] + list(heun.values()))
        seen = set()
        for r in rows:
            if r.get("missing"):
                continue
            key = r["width"] if r["proj"] == "pp" else r["proj"]
            ax.scatter(cost(r["proj"], r["N"], r["width"], m), min(r["fig"], top), c=colours.get(key, "gray"),
                       marker={20: "o", 40: "s", 100: "^"}[r["N"]], s=10 + 8 * math.log10(r["dp"] / 0.1 + 1) ** 2,
                       alpha=0.8, edgecolors="k" if r["fig"] > top else "none", label=None if key in seen else (
                           f"PP, learned T width {r['width']}" if r["proj"] == "pp" else LABEL[r["proj"]]))
            seen.add(key)
        ax.set(xscale="log", yscale="log", xlabel=xl, ylabel=ylabel + f"\n(outlined: above {top:.3g}, drawn at the top)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}Predict-Project against EM at equal cost (○ N=20, □ N=40, △ N=100; larger marker = "
                 "larger δp)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


__all__ = ["DOC_MARK", "HAND_MARK", "rewrite_doc", "cells_lines", "sweep_lines", "plot"]
