"""One command for a GPU check: the GPU-relevant tests and a benchmark subset, results in one folder.

    python bench/device_check.py --out DIR            # on a CUDA machine, in under 8 minutes
    python bench/device_check.py --out DIR --dry      # CPU: the same plumbing on a tiny selection

Phases run one after another as pytest subprocesses, each with what is left of a wall-clock
budget (`--budget`, default 450 s: the 8-minute target less start-up and margin); a phase that
would start with under 20 s left is not run, and the summary says so. Written into DIR:

- `tests.log`, `tests.xml`: kernels, attention, U-Net, sampling and CUDA-graph tests;
- `bench-<phase>.json` (pytest-benchmark) and `bench-<phase>.md` (bench/summarize.py);
- `device_check.md`: device, commit, date, versions, and each phase's outcome.

Without CUDA and without --dry it stops with one line and exit status 2: a GPU check on a CPU
measures nothing. Copy DIR's JSON files to bench/results/ to record a run (see its README).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # for summarize.py (bench/ is not a package)

# (name, pytest arguments) on a GPU, in order of what issue 11 needs most if the budget runs
# out: the step kernels at the measured sizes plus 2^27 ("large") and the host-time rows, the
# end-to-end adm64 sampling rows, then the attention and U-Net rows at the U-Net shapes.
GPU_TESTS = ["tests/test_kernels_step.py", "tests/test_sample.py", "tests/test_attention.py", "tests/test_groupnorm.py",
             "tests/test_unet.py"]
GPU_BENCH = [
    ("step", ["bench/test_bench_step.py", "-k", "(not compile and (B16 or B256) and (fp32 or bf16)) or large or host"]),
    ("sampler", ["bench/test_bench_sampler.py", "-k", "unet"]),
    # every attention shape, dtype and backend except the slow math references (issue 12)
    ("attention", ["bench/test_bench_attention.py", "-k", "not sdpa-math and not -math-"]),
    # the adm64 step and forward rows per path; the compiled rows spend minutes compiling
    ("unet", ["bench/test_bench_unet.py", "-k", "adm64 and not compile"]),
]
# --dry on CPU: one cheap item per phase, so that every file and table is still written.
DRY_TESTS = ["tests/test_sample.py", "-k", "cuda_graph_errors or graph_key"]
DRY_BENCH = [("step", ["bench/test_bench_step.py", "-k", "em-eager-fp32-B1"])]
MIN_PHASE_S = 20.0


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int | str, float]:
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timed out"
    return rc, time.monotonic() - t0


def _counts(xml: Path) -> str:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return "no report"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = a["tests"] - a["failures"] - a["errors"] - a["skipped"]
    return f"{passed} passed, {a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the logs, JSON files and Markdown summaries")
    p.add_argument("--dry", action="store_true", help="run the plumbing on a tiny CPU selection (no GPU figures)")
    p.add_argument("--budget", type=float, default=450.0, help="wall-clock seconds for all phases (default 450)")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print("device_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
              "or pass --dry to check its plumbing on CPU", file=sys.stderr)
        return 2
    if args.budget <= 0:
        print(f"device_check: --budget must be > 0 seconds, got {args.budget}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"device_check: cannot create --out {out}: {e.strerror}", file=sys.stderr)
        return 2

    import triton
    from summarize import summarize

    device = torch.cuda.get_device_name() if cuda else "cpu (--dry: plumbing only, no GPU figures)"
    dirty = " (dirty tree)" if _git("status", "--porcelain") not in ("", "unknown") else ""
    head = [
        "# Device check",
        "",
        f"- device: {device}",
        f"- commit: {_git('rev-parse', 'HEAD')}{dirty}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- command: python bench/device_check.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
        "| phase | outcome | wall s |",
        "|---|---|---:|",
    ]
    rows, failed = [], False
    deadline = time.monotonic() + args.budget
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

    def left() -> float:
        return deadline - time.monotonic()

    tests = DRY_TESTS if args.dry else GPU_TESTS
    if left() >= MIN_PHASE_S:
        rc, dt = _run(py + tests + [f"--junitxml={out / 'tests.xml'}"], out / "tests.log", left())
        outcome = _counts(out / "tests.xml") if rc != "timed out" else "timed out (see tests.log)"
        failed |= rc not in (0, 5)
        rows.append(("tests", f"{outcome}; exit {rc}", dt))
    else:
        rows.append(("tests", "not run: budget spent", 0.0))
    for name, sel in (DRY_BENCH if args.dry else GPU_BENCH):
        if left() < MIN_PHASE_S:
            rows.append((f"bench-{name}", "not run: budget spent", 0.0))
            continue
        js = out / f"bench-{name}.json"
        rc, dt = _run(py + sel + ["--benchmark-only", f"--benchmark-json={js}"], out / f"bench-{name}.log", left())
        failed |= rc not in (0, 5)
        if js.exists():
            with open(js) as f:
                data = json.load(f)
            (out / f"bench-{name}.md").write_text(summarize(data))
            outcome = f"{len(data.get('benchmarks', []))} rows -> bench-{name}.md; exit {rc}"
        else:
            outcome = f"no JSON written; exit {rc} (see bench-{name}.log)"
        rows.append((f"bench-{name}", outcome, dt))
    lines = head + [f"| {n} | {o} | {dt:.0f} |" for n, o, dt in rows]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
