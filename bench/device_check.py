"""One command for a GPU check that keeps every figure it measured, in order of value, within a budget.

    python bench/device_check.py --out DIR                  # on a CUDA machine: the whole check, <= 420 s
    python bench/device_check.py --quick --pack $OUT        # one row per target, <= 180 s, one archive
    python bench/device_check.py --dry --out DIR --budget 60   # CPU: every part of the plumbing

Phases run one after another as pytest processes, each with its own cap (and never past the
budget). In order of value: Triton's cache warmed in parallel processes (in the background,
`python bench/build_check.py --warm`), a correctness smoke test (one test per kernel and per
sampler path), the figures (step bandwidth and host time, sampler end to end, attention, U-Net),
then the full GPU test files with what is left; `--compile` adds the torch.compile rows and
`--cpu` the CPU sampling benches, both opt-in. A phase that reaches its cap is stopped with
SIGINT, so pytest still writes its JSON and junit files (SIGKILL follows only if it does not stop),
and bench/devcheck_plugin.py has written every finished test and benchmark row to
`rows-<phase>.jsonl` the moment it finished. After every phase `device_check.md` is rewritten:
device, commit (and where it came from), the targets table (bench/targets.py: every performance
target, its measured figure, its row, pass / miss / not measured), each phase's outcome, wall
time and Triton compile time, apart. `--pack DIR` also writes DIR/device_check.tar.gz (every
file) and DIR/device_check.md after every phase: two files, which a GPU machine's 8-file limit
returns whole. Without CUDA and without --dry it stops with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))  # summarize.py, targets.py (bench/ is not a package)

MIN_PHASE_S = 8.0      # a phase that would start with less than this left is not run
SIGINT_GRACE_S = 20.0  # after SIGINT, time for pytest to write its reports before SIGKILL
PACK_FILE_LIMIT = 15 << 20  # one returned file may hold 16 MiB: keep a margin


@dataclass
class Phase:
    """One pytest run. `select`: node-id selectors (bench/devcheck_plugin.py) instead of `args`' own
    selection; `cap_after_first_row`: the cap counts from the first finished row (--dry's demo of a
    stopped phase, so that it does not depend on how fast pytest starts on a loaded machine)."""

    name: str
    what: str
    args: list
    cap_s: float
    bench: bool = False
    select: list = field(default_factory=list)
    cap_after_first_row: bool = False
    after_smoke: bool = False  # deselect what the smoke phase ran
    hold_after_row_s: float = 0.0  # --dry: each row is followed by this pause, so the stop falls between rows


# --- the plans --------------------------------------------------------------------------------

# One test per kernel and per sampler path ("prefix" = the first matching test, "prefix*" = all).
SMOKE = [
    "tests/test_kernels_step.py::test_fp32_equals_ops",
    "tests/test_kernels_step.py::test_low_precision_no_worse_than_torch",
    "tests/test_kernels_step.py::test_plan_path_equals_public_kernels_bitwise",
    "tests/test_kernels_step.py::test_sampler_matches_torch_in_distribution*",
    "tests/test_sample.py::test_cuda_graph_replay_is_bitwise_eager_on_triton*",
    "tests/test_sample.py::test_cuda_graph_torch_backend_and_guard",
    "tests/test_attention.py::test_tile_boundaries",
    "tests/test_attention.py::test_strided_inputs_match_contiguous",
    "tests/test_groupnorm.py::test_group_of_one_element_and_stride_zero_gradient",
    "tests/test_unet.py::test_fused_kernels_agree_with_math_in_output_and_gradients",
]
GPU_TESTS = ["tests/test_kernels_step.py", "tests/test_sample.py", "tests/test_attention.py", "tests/test_groupnorm.py",
             "tests/test_unet.py"]
CPU_BENCHES = ["bench/test_bench_loop.py", "bench/test_bench_cpu_steps.py"]  # issues 16 and 17 (opt-in)

STEP_K = "large or host or ((triton or eager) and (B16 or B256) and (fp32 or bf16))"


def full_plan() -> list[Phase]:
    return [
        Phase("smoke", "correctness: one test per kernel and per sampler path", GPU_TESTS, 60, select=SMOKE),
        Phase("step", "step kernels: 2^27 bandwidth, B16/B256 against eager, host time",
              ["bench/test_bench_step.py", "-k", STEP_K], 50, bench=True),
        Phase("sampler", "Predict-Project N=20 with adm64 U-Nets: torch eager, Triton eager, Triton + graph",
              ["bench/test_bench_sampler.py", "-k", "unet and not compile"], 90, bench=True),
        Phase("attention", "attention per shape, dtype and backend (no math references)",
              ["bench/test_bench_attention.py", "-k", "not sdpa-math and not -math-"], 60, bench=True),
        Phase("unet", "adm64 U-Net per path: training step and sampling forward",
              ["bench/test_bench_unet.py", "-k", "adm64 and not compile"], 80, bench=True),
        Phase("tests", "the full GPU test files, less the smoke tests", GPU_TESTS, 400, after_smoke=True),
    ]


def quick_plan() -> list[Phase]:
    return [
        Phase("smoke", "correctness: one test per kernel and per sampler path", GPU_TESTS, 35, select=SMOKE),
        Phase("step", "2^27 bandwidth per update and dtype, host time, B256 against eager",
              ["bench/test_bench_step.py", "-k", "(large and not w8) or host or "
               "((triton or eager) and B256 and (fp32 or bf16))"], 30, bench=True),
        Phase("attention", "attention: Triton and SDPA's own pick per shape",
              ["bench/test_bench_attention.py", "-k", "(-triton-L or -sdpa-L) and not float32"], 25, bench=True),
        Phase("unet", "adm64: sdpa, fused, fused channels_last",
              ["bench/test_bench_unet.py", "-k", "adm64 and (sdpa or fused) and not compile and not sdpa-cl"], 35,
              bench=True),
        Phase("sampler", "adm64 Predict-Project: torch eager and Triton + graph",
              ["bench/test_bench_sampler.py", "-k", "unet and (torch-eager or triton-graph) and not compile"], 55,
              bench=True),
    ]


def opt_in_phases(compile_: bool, cpu: bool) -> list[Phase]:
    out = []
    if compile_:
        out.append(Phase("compile", "torch.compile rows (minutes of compilation)",
                         ["bench/test_bench_step.py", "bench/test_bench_unet.py", "bench/test_bench_sampler.py",
                          "-k", "(compile and B256) or (adm64 and compile) or graph-compile"], 600, bench=True))
    if cpu:
        files = [f for f in CPU_BENCHES if (ROOT / f).exists()]
        out.append(Phase("cpu", "CPU sampling benches (issues 16 and 17)", files, 240, bench=True))
    return out


def dry_plan() -> list[Phase]:
    """CPU stand-ins for every part: selection (smoke), a benchmark phase, a phase stopped at its
    cap with its finished rows kept, and the rest-of-the-tests phase."""
    return [
        Phase("smoke", "correctness (CPU stand-in: two sampling tests)", ["tests/test_sample.py"], 40,
              select=["tests/test_sample.py::test_cuda_graph_errors",
                      "tests/test_sample.py::test_graph_key_names_everything_that_changes_the_captured_work"]),
        Phase("step", "a step row on CPU", ["bench/test_bench_step.py", "-k", "em-eager-fp32-B1"], 40, bench=True),
        Phase("capped", "tiny U-Net rows on CPU, stopped at a cap of 0 s after the first row",
              ["bench/test_bench_unet.py", "-k", "fwd-tiny and cpu and (math or sdpa) and not compile"], 0.0,
              bench=True, cap_after_first_row=True, hold_after_row_s=120.0),
        Phase("tests", "the rest of the test file, less the smoke tests",
              ["tests/test_sample.py", "-k", "graph_key or cuda_graph_errors or bad_arguments"], 60, after_smoke=True),
    ]


# --- running one phase ---------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: Phase
    status: str  # "finished", "stopped at its cap (SIGINT)", "killed", "not run: ..."
    exit_code: object = None
    wall_s: float = 0.0
    records: list = field(default_factory=list)
    files: list = field(default_factory=list)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def _stop(proc: subprocess.Popen, grace: float) -> str:
    """SIGINT to the phase's process group (what Ctrl-C sends), then SIGKILL if it does not end."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        return "finished"
    try:
        proc.wait(timeout=grace)
        return "stopped at its cap (SIGINT)"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"killed (no exit {grace:.0f} s after SIGINT)"


def run_phase(ph: Phase, out: Path, cap: float, env: dict, smoke_ids: list) -> PhaseResult:
    rows = out / f"rows-{ph.name}.jsonl"
    log = out / f"{ph.name}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "devcheck_plugin", *ph.args,
           f"--junitxml={out / (ph.name + '.xml')}"]
    penv = dict(env, WGF_ROWS=str(rows))
    if ph.hold_after_row_s:
        penv["WGF_HOLD_AFTER_ROW_S"] = str(ph.hold_after_row_s)
    if ph.select:
        sel = out / f"select-{ph.name}.txt"
        sel.write_text("\n".join(ph.select) + "\n")
        penv["WGF_SELECT"] = str(sel)
    if ph.after_smoke:
        cmd += [f"--deselect={i}" for i in smoke_ids]
    if ph.bench:
        cmd += ["--benchmark-only", f"--benchmark-json={out / ('bench-' + ph.name + '.json')}"]
    rows.unlink(missing_ok=True)  # the plugin appends: a rerun into the same folder starts afresh
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=penv, start_new_session=True)
        deadline = None if ph.cap_after_first_row else t0 + cap
        status = "finished"
        while proc.poll() is None:
            if deadline is None and any(r.get("event") == "test" for r in read_rows(rows)):
                deadline = time.monotonic() + ph.cap_s
            if deadline is not None and time.monotonic() >= deadline:
                status = _stop(proc, SIGINT_GRACE_S)
                break
            if ph.cap_after_first_row and time.monotonic() - t0 > cap:  # no row came at all
                status = _stop(proc, SIGINT_GRACE_S)
                break
            time.sleep(0.1)
    res = PhaseResult(ph, status, proc.returncode, time.monotonic() - t0, read_rows(rows))
    res.files = [p.name for p in (rows, log, out / f"{ph.name}.xml", out / f"bench-{ph.name}.json") if p.exists()]
    if ph.bench:
        _write_bench_md(res, out)
    return res


def _write_bench_md(res: PhaseResult, out: Path) -> None:
    from summarize import summarize, summarize_records

    js = out / f"bench-{res.phase.name}.json"
    md = out / f"bench-{res.phase.name}.md"
    try:
        text = summarize(json.loads(js.read_text()))
    except (OSError, json.JSONDecodeError):
        text = summarize_records(res.records)  # pytest-benchmark wrote nothing: the rows file has them
    md.write_text(text)
    res.files.append(md.name)


# --- the summary ---------------------------------------------------------------------------------


def outcome(res: PhaseResult) -> str:
    tests = [r for r in res.records if r.get("event") == "test"]
    if not tests and res.status.startswith("not run"):
        return res.status
    n = {k: sum(r["outcome"] == k for r in tests) for k in ("passed", "failed", "skipped", "not found")}
    rows = sum(1 for r in tests if r.get("bench"))
    parts = [f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped"]
    if n["not found"]:
        parts.append(f"{n['not found']} selectors matched nothing")
    if res.phase.bench:
        parts.append(f"{rows} rows kept")
    started = any(r.get("event") == "collected" for r in res.records)
    parts.append(res.status + ("" if started or res.status.startswith("not run") else ", before collection ended"))
    return "; ".join(parts) + f"; exit {res.exit_code}"


def compile_s(res: PhaseResult) -> tuple[float, int]:
    tests = [r for r in res.records if r.get("event") == "test"]
    return sum(r.get("triton_compile_s", 0.0) for r in tests), sum(r.get("triton_compiles", 0) for r in tests)


def commit_info(arg: str | None) -> tuple[str, str]:
    """(commit, where it came from): --commit wins; else git; else unknown."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain")) if head else False
    if arg:
        note = ""
        if head and not head.startswith(arg):
            note = f"; git's HEAD here is {head[:12]}{' (dirty)' if dirty else ''}"
        return arg, f"from --commit{note}"
    if head:
        return head, "from git" + (" (dirty tree)" if dirty else "")
    return "unknown", "no --commit given and no git repository here"


def write_summary(out: Path, head: list, results: list, run: dict, warm: dict | None, pack: Path | None) -> None:
    from targets import evaluate, table

    records = [r for res in results for r in res.records]
    lines = head + [f"- elapsed: {run['total_s']:.0f} s of a {run['budget']:.0f} s budget"
                    + (f"; first figure after {run['first_figure_s']:.0f} s" if run.get("first_figure_s") else ""), ""]
    lines += ["## Targets", "", table(evaluate(records, run)), ""]
    lines += ["## Phases", "", "| phase | what | outcome | wall s | Triton compile s (kernels) | files |",
              "|---|---|---|---:|---:|---|"]
    if warm is not None:
        lines.append(f"| warm | {warm['what']} | {warm['outcome']} | {warm['wall_s']:.0f} | - | "
                     f"{', '.join(warm['files'])} |")
    for res in results:
        cs, cn = compile_s(res)
        lines.append(f"| {res.phase.name} | {res.phase.what} | {outcome(res)} | {res.wall_s:.0f} | "
                     f"{cs:.1f} ({cn}) | {', '.join(res.files) or '-'} |")
    lines += ["", "Triton compile s: seconds spent in Triton's compiler (or loading from its disk cache) during the "
              "phase's tests, from Triton's JIT hooks; the rest of the wall time is running, collection and start-up. "
              "Compare a run with `--no-warm` to see what the warm-up saves.", ""]
    problems = [(res.phase.name, r) for res in results for r in res.records
                if r.get("event") == "test" and r["outcome"] in ("failed", "not found")]
    if problems:
        lines += ["## Failures", ""]
        lines += [f"- {name}: `{r['nodeid']}` {r['outcome']}: {r.get('message', '')}" for name, r in problems]
        lines.append("")
    text = "\n".join(lines) + "\n"
    tmp = out / ".device_check.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "device_check.md")
    if pack is not None:
        pack_dir(out, pack)


def pack_dir(out: Path, dest: Path) -> None:
    """dest/device_check.tar.gz with every file of `out` (a file over 4 MiB keeps its last 4 MiB),
    and dest/device_check.md beside it; both replaced atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".device_check.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(out.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            data = p.read_bytes()
            if len(data) > (4 << 20):
                data = b"[first bytes cut by device_check --pack]\n" + data[-(4 << 20):]
            info = tarfile.TarInfo(f"device_check/{p.name}")
            info.size, info.mtime = len(data), int(p.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    if tmp.stat().st_size > PACK_FILE_LIMIT:
        print(f"device_check: the archive is {tmp.stat().st_size >> 20} MiB, over what a GPU machine returns",
              file=sys.stderr)
    os.replace(tmp, dest / "device_check.tar.gz")
    shutil.copyfile(out / "device_check.md", dest / ".device_check.md.tmp")
    os.replace(dest / ".device_check.md.tmp", dest / "device_check.md")


# --- the plan, without running anything ---------------------------------------------------------


def _k_and_files(ph: Phase) -> tuple[list, str]:
    files, k, it = [], "", iter(ph.args)
    for a in it:
        if a == "-k":
            k = next(it)
        else:
            files.append(a)
    return files, k


def plan_report(plan: list[Phase], out: Path, env: dict) -> tuple[str, dict]:
    """Collect every phase's selection (one `pytest --collect-only` of all their files; -k and the
    smoke selectors applied per phase as pytest would) and say which tests each runs, which smoke
    selectors match nothing and which targets no phase measures: what a GPU run would bring back,
    checked at no GPU time."""
    from targets import coverage

    spec = []
    for ph in plan:
        files, k = _k_and_files(ph)
        if files:
            spec.append({"name": ph.name, "files": files, "k": k, "select": ph.select})
    path = out / "plan-spec.json"
    path.write_text(json.dumps(spec))
    files = sorted({f for ph in spec for f in ph["files"]})
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p",
                        "devcheck_plugin", *files], cwd=ROOT, env=dict(env, WGF_PLAN=str(path)), capture_output=True,
                       text=True)
    try:
        phases = json.loads(Path(str(path) + ".out").read_text())
    except (OSError, ValueError):
        raise SystemExit(f"device_check: --plan: the collection failed (exit {r.returncode}):\n{r.stdout[-2000:]}")
    names = [i.split("::", 1)[1] for ph in phases.values() for i in ph["ids"]]
    cov = coverage(names)
    report = {"phases": phases, "targets": [{"issue": t.issue, "what": t.what, "measured": ok} for t, ok in cov]}
    lines = ["| phase | tests selected | selectors matching nothing |", "|---|---:|---|"]
    for name, ph in phases.items():
        lines.append(f"| {name} | {len(ph['ids'])} | {', '.join(ph['missing_selectors']) or '-'} |")
    lines += ["", "Targets no phase of this plan measures:"]
    lines += [f"- issue {t.issue}: {t.what}" for t, ok in cov if not ok] or ["- none"]
    return "\n".join(lines) + "\n", report


# --- main ----------------------------------------------------------------------------------------


def _error(msg: str) -> int:
    print(f"device_check: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for every file (default with --pack: a new temporary folder)")
    p.add_argument("--pack", help="also write DIR/device_check.tar.gz and DIR/device_check.md after every phase")
    p.add_argument("--dry", action="store_true", help="CPU: run every part of the plumbing on tiny selections")
    p.add_argument("--quick", action="store_true", help="one row per target (<= 180 s)")
    p.add_argument("--budget", type=float, help="wall-clock seconds for all phases (default 395; --quick 160; "
                                                "--dry 60), leaving room for a last phase's SIGINT grace within "
                                                "the 420 s / 180 s targets")
    p.add_argument("--commit", help="the commit measured, when the tree has no .git (recorded as given)")
    p.add_argument("--no-warm", action="store_true", help="skip the parallel warm-up of Triton's cache")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes for the warm-up (default: all cores but one)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (opt-in phase)")
    p.add_argument("--cpu", action="store_true", help="add the CPU sampling benches of issues 16 and 17 (opt-in)")
    p.add_argument("--plan", action="store_true", help="run nothing: collect each phase's tests and list the targets "
                                                       "the plan leaves unmeasured (any machine; writes plan.json)")
    args = p.parse_args(argv)

    budget = args.budget if args.budget is not None else (60.0 if args.dry else 160.0 if args.quick else 395.0)
    if budget <= 0:
        return _error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.commit is not None and not re.fullmatch(r"[0-9a-fA-F]{7,40}", args.commit):
        return _error(f"--commit must be a commit hash (7 to 40 hex digits), got {args.commit!r}")
    if args.jobs < 1:
        return _error(f"--jobs must be >= 1, got {args.jobs}")
    if args.out is None and args.pack is None:
        return _error("give --out DIR (or --pack DIR)")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="device_check-"))
    pack = Path(args.pack) if args.pack else None
    if pack is not None and out.resolve().is_relative_to(pack.resolve()):
        return _error(f"--out {out} must not be inside --pack {pack}: a GPU machine returns at most 8 files from it")

    import torch

    cuda = torch.cuda.is_available()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if args.plan:
        out.mkdir(parents=True, exist_ok=True)
        plan = dry_plan() if args.dry else quick_plan() if args.quick else full_plan()
        text, report = plan_report(plan + opt_in_phases(args.compile, args.cpu), out, env)
        (out / "plan.json").write_text(json.dumps(report, indent=1))
        print(text)
        return 0
    if not cuda and not args.dry:
        return _error("no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
                      "or pass --dry to check its plumbing on CPU")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _error(f"cannot create --out {out}: {e.strerror}")

    import triton

    mode = "dry" if args.dry else "quick" if args.quick else "full"
    commit, source = commit_info(args.commit)
    device = torch.cuda.get_device_name() if cuda and not args.dry else "cpu (--dry: plumbing only, no GPU figures)"
    head = [
        "# Device check",
        "",
        f"- device: {device}",
        f"- commit: {commit} ({source})",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
        f"python {sys.version.split()[0]}, {os.cpu_count()} host cores",
        f"- mode: {mode}; command: python bench/device_check.py {' '.join(argv if argv is not None else sys.argv[1:])}",
    ]
    plan = dry_plan() if args.dry else quick_plan() if args.quick else full_plan()
    plan += opt_in_phases(args.compile, args.cpu)

    t_start = time.monotonic()
    wall_start = time.time()
    run = {"mode": mode, "budget": budget, "total_s": 0.0, "cpu_phase": args.cpu}

    def left() -> float:
        return budget - (time.monotonic() - t_start)

    # Warm Triton's cache in the background while the smoke phase runs; the figures wait for it.
    warm, warm_proc = None, None
    if not args.no_warm:
        # every scenario, also for --quick: its figures launch the full check's kernels at fewer sizes
        flags = ["--list", "--quick"] if args.dry else ["--warm", "--jobs", str(args.jobs)]
        wcmd = [sys.executable, str(BENCH / "build_check.py"), *flags, "--json", str(out / "warm.json")]
        wenv = dict(env, TRITON_INTERPRET="0") if args.dry else env
        warm = {"what": f"Triton's cache filled by `python bench/build_check.py {' '.join(flags)}`"
                        + (" (--dry: it lists the launches, compiles nothing)" if args.dry else ""),
                "outcome": "running", "wall_s": 0.0, "files": ["warm.log", "warm.json"], "t0": time.monotonic()}
        wlog = open(out / "warm.log", "w")
        warm_proc = subprocess.Popen(wcmd, cwd=ROOT, stdout=wlog, stderr=subprocess.STDOUT, env=wenv,
                                     start_new_session=True)
    # the figures wait for the warm-up at most this long after the start (the smoke phase runs meanwhile);
    # what it has not compiled by then compiles in the phases, as without it
    warm_cap = min(0.25 * budget, 105.0) if not args.dry else 0.45 * budget

    def finish_warm():
        if warm_proc is None or warm["outcome"] != "running":
            return
        try:
            warm_proc.wait(timeout=max(0.0, warm_cap - (time.monotonic() - warm["t0"])))
            status = f"finished, exit {warm_proc.returncode}"
        except subprocess.TimeoutExpired:
            status = _stop(warm_proc, SIGINT_GRACE_S) + f" (cap {warm_cap:.0f} s)"
        warm["wall_s"] = time.monotonic() - warm["t0"]
        try:
            n = len(json.loads((out / "warm.json").read_text())["rows"])
            status += f"; {n} distinct kernel specialisations"
        except (OSError, ValueError, KeyError):
            pass
        warm["outcome"] = status

    results: list[PhaseResult] = []
    smoke_ids: list[str] = []
    failed = False
    for ph in plan:
        if ph.name != "smoke":
            finish_warm()
        cap = min(ph.cap_s, left()) if not ph.cap_after_first_row else max(left(), 0.0)
        if left() < MIN_PHASE_S or (ph.bench and not ph.args):
            why = "budget spent" if left() < MIN_PHASE_S else "no such bench file in this tree"
            res = PhaseResult(ph, f"not run: {why}")
        else:
            res = run_phase(ph, out, cap, env, smoke_ids)
            failed |= res.exit_code not in (0, 5, None) and res.status == "finished"
            failed |= any(r.get("outcome") == "failed" for r in res.records)
        if ph.name == "smoke":
            smoke_ids = [r["nodeid"] for r in res.records if r.get("event") == "test" and r["outcome"] != "not found"]
            run["smoke_s"] = res.wall_s
        results.append(res)
        run["total_s"] = time.monotonic() - t_start
        firsts = [r["time"] for x in results if x.phase.bench for r in x.records if r.get("bench")]
        if firsts:
            run["first_figure_s"] = min(firsts) - wall_start
        write_summary(out, head, results, run, warm, pack)
    finish_warm()
    run["total_s"] = time.monotonic() - t_start
    write_summary(out, head, results, run, warm, pack)
    print((out / "device_check.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
