"""Every performance target of the project, read from benchmark rows: the targets table of a device check.

One `Target` per target of the issues (11 and 12: the GPU targets; 16 and 17: the CPU sampling
targets; 3: the first kernel targets not restated since; 18: the device check itself), each with
the rows it reads. `evaluate(rows, run)` gives, per target, the measured figure, the rows it came
from and pass / miss / not measured (with the reason). Rows are the benchmark records that
bench/devcheck_plugin.py writes (name, stats, extra_info); nothing is estimated: a target whose
rows are absent is "not measured". Names of rows are those of the bench files' parametrize ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Result:
    figure: str | None
    rows: list[str]
    status: str  # "pass", "miss", "not measured"
    why: str = ""


@dataclass
class Target:
    issue: str
    what: str
    evaluate: Callable[["Rows", dict], Result]


class Rows:
    """Benchmark rows by name (the last record of a name wins: a rerun replaces its row)."""

    def __init__(self, records):
        self.by_name = {}
        for r in records:
            b = r.get("bench")
            if b and b.get("name"):
                self.by_name[b["name"]] = b

    def get(self, name):
        return self.by_name.get(name)

    def value(self, name, key):
        """extra_info[key] of row `name`; a dotted key reads into a nested record ("ratio.median")."""
        b = self.by_name.get(name)
        if b is None:
            return None
        v = b.get("extra_info", {})
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return v if isinstance(v, (int, float)) else None

    def names(self, prefix):
        return [n for n in self.by_name if n.startswith(prefix)]


def _needs(fn, *groups):
    """Attach to an evaluator the rows it reads: each group is a list of alternatives, one of
    which must be measured (used by `device_check.py --plan` before any GPU time is spent)."""
    fn.needs = [list(g) for g in groups]
    return fn


def _missing(names, why=""):
    return Result(None, list(names), "not measured", why or "row not in this run: " + ", ".join(names))


def _verdict(ok: bool) -> str:
    return "pass" if ok else "miss"


# --- evaluators --------------------------------------------------------------------------------


def share_of_copy(name, at_least):
    def ev(rows, run):
        v = rows.value(name, "pct_copy_bw")
        if v is None:
            return _missing([name])
        gb = rows.value(name, "gb_s")
        bw = rows.value(name, "copy_bw_gb_s")
        return Result(f"{v:.1f}% ({gb:,.0f} of {bw:,.0f} GB/s)", [name], _verdict(v >= at_least))
    return _needs(ev, [name])


def host_time(name, at_most_us):
    def ev(rows, run):
        v = rows.value(name, "time_per_call_s")
        if v is None:
            return _missing([name])
        return Result(f"{v * 1e6:.1f} µs", [name], _verdict(v * 1e6 <= at_most_us))
    return _needs(ev, [name])


def speedup(name, baseline, key, at_least, strict=False):
    """rows[name][key] / rows[baseline][key] (a rate: higher is better)."""
    def ev(rows, run):
        a, b = rows.value(name, key), rows.value(baseline, key)
        if a is None or b is None:
            return _missing([n for n, v in ((name, a), (baseline, b)) if v is None])
        r = a / b
        return Result(f"{r:.2f}x ({a:,.1f} vs {b:,.1f} {key.replace('_per_s', '/s')})", [name, baseline],
                      _verdict(r > at_least if strict else r >= at_least))
    return _needs(ev, [name], [baseline])


SDPA_IMPLS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")


def attention_vs_sdpa(mode, shape, dtype, at_least):
    """The Triton row's TFLOP/s over the best SDPA row of the same mode, shape and dtype."""
    def ev(rows, run):
        tri = f"test_bench_attention[{mode}-triton-{shape}-{dtype}]"
        t = rows.value(tri, "tflop_s")
        sdpa = {impl: rows.value(f"test_bench_attention[{mode}-{impl}-{shape}-{dtype}]", "tflop_s")
                for impl in SDPA_IMPLS}
        sdpa = {k: v for k, v in sdpa.items() if v is not None}
        if t is None or not sdpa:
            return _missing([tri] if t is None else [f"test_bench_attention[{mode}-sdpa*-{shape}-{dtype}]"])
        best = max(sdpa, key=sdpa.get)
        r = t / sdpa[best]
        basis = "" if len(sdpa) >= 4 else f"; SDPA backends measured: {', '.join(sorted(sdpa))}"
        alt = rows.value(f"test_bench_attention[{mode}-triton-bwd5-{shape}-{dtype}]", "tflop_s")
        if alt is not None:  # the atomic 5-matmul backward, measured beside the default (issue 18)
            basis += f"; with the atomic backward (triton-bwd5): {alt / sdpa[best]:.2f}x"
        return Result(f"{r:.2f}x ({t:.1f} vs {best} {sdpa[best]:.1f} TFLOP/s{basis})",
                      [tri, f"test_bench_attention[{mode}-{best}-{shape}-{dtype}]"], _verdict(r >= at_least))
    return _needs(ev, [f"test_bench_attention[{mode}-triton-{shape}-{dtype}]"],
                  [f"test_bench_attention[{mode}-{impl}-{shape}-{dtype}]" for impl in SDPA_IMPLS])


UNET_FAST_PATHS = ("fused", "fused-cl", "triton", "sdpa-cl", "compile-fused", "compile-sdpa")


def unet_vs_sdpa(mode, batch, at_least, strict=False):
    """The fastest measured non-baseline path of the adm64 U-Net over the eager sdpa path."""
    def ev(rows, run):
        base = f"test_bench_unet[{mode}-adm64-b{batch}-sdpa]"
        b = rows.value(base, "images_per_s")
        paths = {p: rows.value(f"test_bench_unet[{mode}-adm64-b{batch}-{p}]", "images_per_s") for p in UNET_FAST_PATHS}
        paths = {k: v for k, v in paths.items() if v is not None}
        if b is None or not paths:
            return _missing([base] if b is None else [f"test_bench_unet[{mode}-adm64-b{batch}-fused*]"])
        best = max(paths, key=paths.get)
        r = paths[best] / b
        return Result(f"{r:.2f}x ({best} {paths[best]:,.1f} vs sdpa {b:,.1f} images/s)",
                      [f"test_bench_unet[{mode}-adm64-b{batch}-{best}]", base],
                      _verdict(r > at_least if strict else r >= at_least))
    return _needs(ev, [f"test_bench_unet[{mode}-adm64-b{batch}-sdpa]"],
                  [f"test_bench_unet[{mode}-adm64-b{batch}-{p}]" for p in UNET_FAST_PATHS])


def min_speedup_over(pairs, key, at_least, label):
    """The smallest of several rate ratios (every pair must reach the target)."""
    def ev(rows, run):
        got = []
        for a, b in pairs:
            va, vb = rows.value(a, key), rows.value(b, key)
            if va is not None and vb is not None:
                got.append((va / vb, a, b))
        if not got:
            return _missing([pairs[0][0], pairs[0][1]], f"no {label} rows in this run")
        r, a, b = min(got)
        extra = "" if len(got) == len(pairs) else f"; {len(got)} of {len(pairs)} pairs measured"
        return Result(f"{r:.2f}x (the lowest of {len(got)}: {a}{extra})", [a, b], _verdict(r >= at_least))
    return _needs(ev, [a for a, _ in pairs], [b for _, b in pairs])


def run_figure(key, at_most_s, modes):
    """A figure of the device check run itself (issue 18), from a run in one of `modes`."""
    def ev(rows, run):
        if run.get("mode") not in modes or run.get(key) is None:
            return Result(None, [], "not measured", f"needs a {' or '.join(modes)} run on a GPU")
        v = run[key]
        return Result(f"{v:.0f} s", [f"device_check.md ({key})"], _verdict(v <= at_most_s))
    return _needs(ev)


def cpu_ratio(names, at_most=None, at_least=None, key="ratio"):
    """CPU sampling targets (issues 16, 17): ratio rows of bench/test_bench_loop.py and
    bench/test_bench_cpu_steps.py, read when the device check ran its --cpu phase."""
    def ev(rows, run):
        found = [(n, rows.value(n, key)) for n in names if rows.value(n, key) is not None]
        if not found:
            why = ("the CPU bench phase is opt-in (--cpu)" if not run.get("cpu_phase")
                   else "row not in this run: " + ", ".join(names))
            return Result(None, list(names), "not measured", why)
        worst = max(found, key=lambda x: x[1]) if at_most is not None else min(found, key=lambda x: x[1])
        ok = worst[1] <= at_most if at_most is not None else worst[1] >= at_least
        return Result(f"{worst[1]:.2f}x", [worst[0]], _verdict(ok))
    return _needs(ev, names)


# --- the targets ---------------------------------------------------------------------------------

STEP_UPDATES = ("em", "project", "predict", "heun")
ATT_SHORT = ("L64", "L256", "L1024")
ATT_LONG = ("L4096-D64", "L4096-D128")


def _targets() -> list[Target]:
    t = []
    # issue 11, item 3: steps at the memory limit, 2^27 elements
    for update in STEP_UPDATES:
        for dt in ("fp32", "bf16", "fp16"):
            need = 90 if (dt == "fp32" or update in ("predict", "heun")) else 80
            noise = " with in-kernel noise" if update in ("em", "project") else ""
            t.append(Target("11", f"`{update}`{noise}, {dt}, 2^27 elements: >= {need}% of copy bandwidth",
                            share_of_copy(f"test_step_large[{update}-triton-{dt}-large]", need)))
    # issue 11, item 2: host time
    t.append(Target("11", "host time per fused step inside `sample()` (eager, 4096 elements): <= 25 µs",
                    host_time("test_host_time_per_call[host-sample-em-step-fp32-4096]", 25)))
    t.append(Target("11", "host time per public `kernels.sampler_step` call (4096 elements): <= 40 µs",
                    host_time("test_host_time_per_call[host-public-em-fp32-4096]", 40)))
    # issue 11, item 5: end to end with adm64 U-Nets
    for B, need in ((16, 1.5), (64, 1.15)):
        t.append(Target("11", f"Predict-Project N=20, adm64, batch {B}: Triton + CUDA graph >= {need}x torch eager",
                        speedup(f"test_predict_project_unet_images_per_s[unet-adm64-triton-graph-bf16-B{B}]",
                                f"test_predict_project_unet_images_per_s[unet-adm64-torch-eager-bf16-B{B}]",
                                "images_per_s", need)))
    # issue 12, item 1: attention against the best SDPA backend
    for mode in ("fwd", "fwd+bwd"):
        for dtype in ("bfloat16", "float16"):
            for shape in ATT_SHORT:
                t.append(Target("12", f"attention {mode}, {dtype}, B=32 D=64 {shape}: >= 1.0x the best SDPA backend",
                                attention_vs_sdpa(mode, shape, dtype, 1.0)))
            for shape in ATT_LONG:
                need = 1.2 if mode == "fwd" else 1.0
                t.append(Target("12", f"attention {mode}, {dtype}, B=4 H=16 {shape}: >= {need}x the best SDPA backend",
                                attention_vs_sdpa(mode, shape, dtype, need)))
    # issue 12, item 2: the U-Net
    t.append(Target("12", "adm64 training step (fwd+bwd, batch 32, bf16 autocast): >= 1.3x the eager sdpa path",
                    unet_vs_sdpa("fwd+bwd", 32, 1.3)))
    for B in (16, 64):
        t.append(Target("12", f"adm64 sampling forward, batch {B}: faster than the eager sdpa path (the same levers "
                              "must speed it up)", unet_vs_sdpa("fwd", B, 1.0, strict=True)))
    # issue 3 (its other targets are restated by issue 11)
    pairs = [(f"test_step[{u}-triton-{dt}-B256]", f"test_step[{u}-eager-{dt}-B256]")
             for u in STEP_UPDATES for dt in ("fp32", "bf16")]
    t.append(Target("3", "fused steps >= 3x the eager sequence (B=256, every update, fp32 and bf16)",
                    min_speedup_over(pairs, "gb_s", 3.0, "triton/eager B256")))
    cpairs = [(f"test_step[{u}-triton-{dt}-B256]", f"test_step[{u}-compile-{dt}-B256]")
              for u in STEP_UPDATES for dt in ("fp32", "bf16")]
    t.append(Target("3", "fused steps no slower than torch.compile (B=256; compile rows: opt-in --compile phase)",
                    min_speedup_over(cpairs, "gb_s", 1.0, "torch.compile B256 (opt-in --compile)")))
    # issue 16: bench/test_bench_cpu_steps.py, the C++ steps in whole sample() calls against a hand loop of the
    # same arithmetic, interleaved in one run (the median paired CPU-time speedup, one thread)
    cpp_rows = "test_sampler_vs_hand_loop[{}-{}-{}thread]"
    for shape in ("64x3x32x32", "256x3x64x64"):
        for s, need in (("euler_maruyama", 2.0), ("predict_project", 2.0), ("pf_ode", 1.5), ("heun_ode", 1.5)):
            t.append(Target("16", f"C++ steps, {s}, {shape}, 1 thread: >= {need}x the hand loop",
                            cpu_ratio([cpp_rows.format(s, shape, 1)], at_least=need, key="speedup_vs_hand_cpu.median")))
            t.append(Target("16", f"C++ steps, {s}, {shape}, 2 threads: >= {need}x the hand loop (wall)",
                            cpu_ratio([cpp_rows.format(s, shape, 2)], at_least=need,
                                      key="speedup_vs_hand_wall.median")))
    for shape in ("64x3x32x32", "256x3x64x64"):
        t.append(Target("16", f"C++ EM step, {shape}, 2 threads against 1: >= 1.6x",
                        cpu_ratio([f"test_two_threads_vs_one[{shape}]"], at_least=1.6,
                                  key="speedup_2_threads_wall.median")))
    for s in ("euler_maruyama", "pf_ode", "heun_ode"):
        t.append(Target("16", f"C++ steps, {s}, per-step host overhead at 64x2: no worse than the torch path",
                        cpu_ratio([f"test_host_overhead_64x2[{s}]"], at_least=1.0, key="speedup_vs_torch_cpu.median")))
    # bench/test_bench_loop.py: one row per (sampler, shape), the median paired wall-time ratio of
    # sample() to the hand loop and to each library's loop, interleaved in one run
    loop = "test_loop_against_hand_diffusers_kdiffusion[{}-{}]"
    kinds = {"em": "em", "pf_ode": "pf_ode", "heun": "heun", "predict_project": "pp"}
    for shape, tag in (("64x3x32x32-N100", "medium"), ("256x3x64x64-N20", "large")):
        for s, kind in kinds.items():
            t.append(Target("17", f"torch path, {s}, {shape}, 1 thread: <= 1.15x the hand loop",
                            cpu_ratio([loop.format(kind, tag)], at_most=1.15, key="ratio_vs_hand_wall.median")))
    for s, kind in kinds.items():
        t.append(Target("17", f"torch path, {s}, 64x2 N=1000, 1 thread: <= 1.5x the hand loop",
                        cpu_ratio([loop.format(kind, "tiny")], at_most=1.5, key="ratio_vs_hand_wall.median")))
    every = [loop.format(kind, tag) for kind in ("em", "pf_ode", "heun") for tag in ("tiny", "medium", "large")]
    for lib in ("diffusers", "k-diffusion"):
        t.append(Target("17", f"torch path faster than {lib}'s loop for the same sampler at every shape (worst row)",
                        cpu_ratio(every, at_most=1.0, key=f"ratio_vs_{lib}_wall.median")))
    # issue 18: the device check itself
    t.append(Target("18", "correctness smoke phase: <= 60 s", run_figure("smoke_s", 60, ("full", "quick"))))
    t.append(Target("18", "the whole device check, every phase: <= 420 s on the GPU",
                    run_figure("total_s", 420, ("full",))))
    t.append(Target("18", "`--quick`, one row per target: <= 180 s", run_figure("total_s", 180, ("quick",))))
    return t


TARGETS = _targets()


def coverage(names) -> list[tuple[Target, bool]]:
    """Whether a set of row names (a plan's selection) measures each target."""
    have = set(names)
    return [(t, all(any(n in have for n in g) for g in t.evaluate.needs)) for t in TARGETS]


def evaluate(records, run: dict) -> list[tuple[Target, Result]]:
    rows = Rows(records)
    return [(t, t.evaluate(rows, run)) for t in TARGETS]


def table(results) -> str:
    lines = ["| # | issue | target | measured | from row(s) | status |", "|---:|---|---|---|---|---|"]
    for i, (t, r) in enumerate(results, 1):
        status = r.status if r.status != "not measured" or not r.why else f"not measured: {r.why}"
        rows = "<br>".join(f"`{n}`" for n in r.rows) or "-"
        lines.append(f"| {i} | {t.issue} | {t.what} | {r.figure or '-'} | {rows} | {status} |")
    counts = {s: sum(r.status == s for _, r in results) for s in ("pass", "miss", "not measured")}
    lines.append("")
    lines.append(f"{counts['pass']} pass, {counts['miss']} miss, {counts['not measured']} not measured "
                 f"(of {len(results)} targets).")
    return "\n".join(lines)
