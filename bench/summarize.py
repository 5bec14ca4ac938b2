"""Turn a pytest-benchmark JSON file into a Markdown table of achieved rates.

    python bench/summarize.py bench/results/<device>-<date>-<commit>.json [> table.md]

Columns come from each row's extra_info (see bench/conftest.py `record`): time per call, GB/s,
% of the session's measured copy bandwidth, TFLOP/s and images/s, where a row records them.
Only figures that are in the file are printed; nothing is estimated.
"""
from __future__ import annotations

import argparse
import json
import sys

# (header, extra_info keys in order of preference, formatter)
COLUMNS = [
    ("time / call", ("time_per_call_s",), lambda v: _fmt_time(v)),
    ("GB/s", ("gb_s",), lambda v: f"{v:,.1f}"),
    ("% copy BW", ("pct_copy_bw",), lambda v: f"{v:.1f}"),
    ("TFLOP/s", ("tflop_s", "tflops", "TFLOP/s"), lambda v: f"{v:.2f}"),
    ("images/s", ("images_per_s",), lambda v: f"{v:,.1f}"),
    # bench/test_bench_loop.py: median paired ratio wgfcore / baseline [25-75 % of the rounds]
    ("÷ hand (wall)", ("ratio_vs_hand_wall",), lambda v: _fmt_ratio(v)),
    ("÷ hand (CPU)", ("ratio_vs_hand_cpu",), lambda v: _fmt_ratio(v)),
    ("÷ diffusers (wall)", ("ratio_vs_diffusers_wall",), lambda v: _fmt_ratio(v)),
    ("÷ k-diffusion (wall)", ("ratio_vs_k-diffusion_wall",), lambda v: _fmt_ratio(v)),
    # bench/test_bench_cpu_steps.py: median paired speed-up of the C++ backend [90 % interval]
    ("× hand (CPU)", ("speedup_vs_hand_cpu",), lambda v: _fmt_ratio(v)),
    ("× hand (wall)", ("speedup_vs_hand_wall",), lambda v: _fmt_ratio(v)),
    ("× torch backend (CPU)", ("speedup_vs_torch_cpu",), lambda v: _fmt_ratio(v)),
    ("2 threads ÷ 1 (wall)", ("speedup_2_threads_wall",), lambda v: _fmt_ratio(v)),
    ("× without spared outputs (CPU)", ("speedup_of_spared_cpu",), lambda v: _fmt_ratio(v)),
    ("--fused ÷ --quick time (wall)", ("fused_time_over_quick_wall",), lambda v: _fmt_ratio(v)),
    ("eval time torch ÷ cpp", ("eval_speedup_cpp_vs_torch",), lambda v: f"{v:.2f}"),
]


def _fmt_ratio(v: dict) -> str:
    lo, hi = (v["q25"], v["q75"]) if "q25" in v else (v["lo90"], v["hi90"])
    return f"{v['median']:.2f} [{lo:.2f}, {hi:.2f}]"


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _value(info: dict, keys):
    for k in keys:
        v = info.get(k)
        if isinstance(v, (int, float)) or (isinstance(v, dict) and "median" in v):
            return v
    return None


def summarize(data: dict) -> str:
    rows = data.get("benchmarks", [])
    infos = [r.get("extra_info", {}) for r in rows]
    devices = sorted({i["device"] for i in infos if "device" in i}) or [data.get("machine_info", {}).get("cpu", {})
                                                                        .get("brand_raw", "unknown")]
    commit = data.get("commit_info", {})
    copy_bw = sorted({i["copy_bw_gb_s"] for i in infos if "copy_bw_gb_s" in i})
    lines = [
        f"- device: {', '.join(devices)}",
        f"- commit: {commit.get('id', 'unknown')}{' (dirty tree)' if commit.get('dirty') else ''}",
        f"- date: {data.get('datetime', 'unknown')}",
    ]
    if copy_bw:
        lines.append(f"- measured device-to-device copy bandwidth: {', '.join(f'{b:,.1f}' for b in copy_bw)} GB/s")
    cols = [c for c in COLUMNS if any(_value(i, c[1]) is not None for i in infos)]
    lines += ["", "| benchmark | " + " | ".join(c[0] for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for r, info in zip(rows, infos):
        cells = []
        for _, keys, fmt in cols:
            v = _value(info, keys)
            cells.append("-" if v is None else fmt(v))
        lines.append(f"| {r.get('name', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize_records(records: list[dict]) -> str:
    """The same table from bench/devcheck_plugin.py's JSON-lines rows (a phase whose pytest was
    killed before it wrote its pytest-benchmark file keeps them)."""
    rows = [r["bench"] for r in records if r.get("bench")]
    data = {"benchmarks": [{"name": b["name"], "extra_info": b.get("extra_info", {})} for b in rows],
            "commit_info": {"id": "see device_check.md"}, "datetime": "see device_check.md"}
    return "(from the rows file: pytest-benchmark wrote no JSON for this phase)\n\n" + summarize(data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_file", help="a file written by pytest --benchmark-json=...")
    args = p.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    if not data.get("benchmarks"):
        print(f"{args.json_file}: no benchmark rows (was it run with --benchmark-only?)", file=sys.stderr)
        return 1
    sys.stdout.write(summarize(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
