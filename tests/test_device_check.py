"""bench/device_check.py: a GPU check that cannot lose what it measured, checked on CPU.

The --dry run exercises every part on tiny CPU selections: the node-id selection of the smoke
phase, a benchmark phase, a phase stopped with SIGINT at its cap that keeps the rows it finished
(in its rows file and in pytest-benchmark's JSON, which pytest still writes), the rest-of-the-tests
phase, the targets table, the --commit argument and the packed archive. The plan check collects the
real GPU selections on CPU and shows that --quick measures every GPU target and that no smoke
selector has gone stale. The rest are unit tests of the pieces.
"""
import importlib.util
import json
import os
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import devcheck_plugin  # noqa: E402
import summarize  # noqa: E402
import targets as T  # noqa: E402


def _module():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_cpu_in_one_line(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path / "dc")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--dry" in err
    assert not (tmp_path / "dc").exists()


@pytest.mark.parametrize("argv,says", [
    (["--dry", "--budget", "0"], "--budget must be > 0"),
    (["--dry", "--commit", "not-a-hash"], "--commit must be a commit hash"),
    (["--dry", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, says):
    assert _module().main(["--out", str(tmp_path / "dc"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_out_inside_pack_and_no_out_are_errors(tmp_path, capsys):
    mod = _module()
    assert mod.main(["--dry", "--pack", str(tmp_path), "--out", str(tmp_path / "inner")]) == 2
    assert "must not be inside --pack" in capsys.readouterr().err
    assert mod.main(["--dry"]) == 2
    assert "give --out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One --dry run with the coordinator's budget, a --commit and --pack."""
    base = tmp_path_factory.mktemp("dry")
    out, pack = base / "out", base / "pack"
    rc = _module().main(["--dry", "--out", str(out), "--budget", "60", "--commit", "abc1234", "--pack", str(pack)])
    return rc, out, pack


def test_dry_run_writes_the_summary_with_a_targets_table(dry):
    rc, out, _ = dry
    assert rc == 0
    md = (out / "device_check.md").read_text()
    assert "- device: cpu (--dry" in md and "- date: " in md
    assert "- commit: abc1234 (from --commit" in md
    table = md.split("## Targets")[1].split("## Phases")[0]
    assert "| # | issue | target | measured | from row(s) | status |" in table
    assert table.count("\n| ") >= len(T.TARGETS)  # one row per target
    assert f"of {len(T.TARGETS)} targets" in table
    assert "| smoke |" in md and "2 passed, 0 failed" in md.split("| smoke |")[1].split("\n")[0]
    assert "| warm |" in md and "| tests |" in md


def test_a_phase_stopped_at_its_cap_keeps_its_finished_rows(dry):
    rc, out, _ = dry
    line = (out / "device_check.md").read_text().split("| capped |")[1].split("\n")[0]
    assert "stopped at its cap (SIGINT)" in line
    rows = [json.loads(x) for x in (out / "rows-capped.jsonl").read_text().splitlines()]
    kept = [r["bench"]["name"] for r in rows if r.get("bench")]
    assert len(kept) == 1, kept  # three rows selected; the stop lands in the pause after the first, which is kept
    assert all(r["bench"]["stats"]["rounds"] >= 1 and "images_per_s" in r["bench"]["extra_info"]
               for r in rows if r.get("bench"))
    # SIGINT, not a kill: pytest wrote its benchmark JSON and its junit file for what finished
    saved = json.loads((out / "bench-capped.json").read_text())
    assert [b["name"] for b in saved["benchmarks"]] == kept
    assert (out / "capped.xml").exists()
    assert f"| {kept[0]} |" in (out / "bench-capped.md").read_text()


def test_pack_holds_every_file_with_the_summary_beside_it(dry):
    _, out, pack = dry
    assert sorted(p.name for p in pack.iterdir()) == ["device_check.md", "device_check.tar.gz"]
    assert (pack / "device_check.md").read_text() == (out / "device_check.md").read_text()
    with tarfile.open(pack / "device_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")} == names


def test_quick_plan_measures_every_gpu_target_and_every_smoke_selector_matches(tmp_path):
    """Both GPU plans, collected on CPU in one pytest run (the phases renamed apart): every phase
    selects tests, no smoke selector is stale, and each plan measures every GPU target but the
    opt-in torch.compile one."""
    import dataclasses

    mod = _module()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench")])}
    plans = {"quick": mod.quick_plan(), "full": mod.full_plan()}
    both = [dataclasses.replace(ph, name=f"{k}-{ph.name}") for k, plan in plans.items() for ph in plan]
    _, report = mod.plan_report(both, tmp_path, env)
    sizes = {k: len(v["ids"]) for k, v in report["phases"].items()}
    assert len(sizes) == len(both) and all(sizes.values()), sizes
    for k in plans:
        assert report["phases"][f"{k}-smoke"]["missing_selectors"] == []
        names = [i.split("::", 1)[1] for name, ph in report["phases"].items() if name.startswith(k + "-")
                 for i in ph["ids"]]
        unmeasured = [t.what for t, ok in T.coverage(names) if not ok and t.issue in ("11", "12", "3")]
        assert unmeasured == [next(t.what for t in T.TARGETS if "torch.compile" in t.what)], (k, unmeasured)


# --- the pieces ----------------------------------------------------------------------------------


def _row(name, **extra):
    return {"event": "test", "bench": {"name": name, "extra_info": extra}}


def test_targets_pass_miss_and_not_measured():
    recs = [
        _row("test_step_large[em-triton-fp32-large]", pct_copy_bw=91.0, gb_s=2700.0, copy_bw_gb_s=2967.0),
        _row("test_step_large[em-triton-bf16-large]", pct_copy_bw=50.0, gb_s=1200.0, copy_bw_gb_s=2400.0),
        _row("test_host_time_per_call[host-sample-em-step-fp32-4096]", time_per_call_s=30e-6),
        _row("test_bench_attention[fwd-triton-L64-bfloat16]", tflop_s=3.0),
        _row("test_bench_attention[fwd-sdpa-flash-L64-bfloat16]", tflop_s=2.9),
        _row("test_bench_attention[fwd-sdpa-L64-bfloat16]", tflop_s=3.1),
        _row("test_bench_unet[fwd+bwd-adm64-b32-sdpa]", images_per_s=200.0),
        _row("test_bench_unet[fwd+bwd-adm64-b32-fused]", images_per_s=250.0),
        _row("test_bench_unet[fwd+bwd-adm64-b32-fused-cl]", images_per_s=270.0),
    ]
    got = {t.what: r for t, r in T.evaluate(recs, {"mode": "full", "total_s": 400.0, "smoke_s": 70.0})}
    em32 = got["`em` with in-kernel noise, fp32, 2^27 elements: >= 90% of copy bandwidth"]
    assert em32.status == "pass" and em32.rows == ["test_step_large[em-triton-fp32-large]"]
    assert got["`em` with in-kernel noise, bf16, 2^27 elements: >= 80% of copy bandwidth"].status == "miss"
    assert got["`em` with in-kernel noise, fp16, 2^27 elements: >= 80% of copy bandwidth"].status == "not measured"
    host = got["host time per fused step inside `sample()` (eager, 4096 elements): <= 25 µs"]
    assert host.status == "miss" and host.figure == "30.0 µs"
    att = got["attention fwd, bfloat16, B=32 D=64 L64: >= 1.0x the best SDPA backend"]
    assert att.status == "miss" and "sdpa 3.1" in att.figure  # against the best SDPA row, not flash
    unet = got["adm64 training step (fwd+bwd, batch 32, bf16 autocast): >= 1.3x the eager sdpa path"]
    assert unet.status == "pass" and unet.figure.startswith("1.35x (fused-cl")
    assert got["the whole device check, every phase: <= 420 s on the GPU"].status == "pass"
    assert got["correctness smoke phase: <= 60 s"].status == "miss"
    assert got["`--quick`, one row per target: <= 180 s"].status == "not measured"
    assert len(got) == len(T.TARGETS)  # every target has its own wording


def test_every_target_names_the_rows_it_reads():
    for t in T.TARGETS:
        assert isinstance(t.evaluate.needs, list), t.what
    names = ["test_step_large[em-triton-fp32-large]"]
    cov = dict((t.what, ok) for t, ok in T.coverage(names))
    assert cov["`em` with in-kernel noise, fp32, 2^27 elements: >= 90% of copy bandwidth"]
    assert not cov["`em` with in-kernel noise, bf16, 2^27 elements: >= 80% of copy bandwidth"]


def test_commit_comes_from_the_argument_git_or_nowhere(monkeypatch, tmp_path):
    mod = _module()
    commit, source = mod.commit_info("deadbeef")
    assert commit == "deadbeef" and source.startswith("from --commit")
    monkeypatch.setattr(mod, "ROOT", tmp_path)  # a copy of the tree without .git
    assert mod.commit_info(None) == ("unknown", "no --commit given and no git repository here")
    assert mod.commit_info("abc1234") == ("abc1234", "from --commit")


def test_pack_cuts_a_huge_file_to_its_end(tmp_path):
    mod = _module()
    out = tmp_path / "out"
    out.mkdir()
    (out / "device_check.md").write_text("# summary\n")
    (out / "big.log").write_bytes(b"x" * (5 << 20) + b"END")
    mod.pack_dir(out, tmp_path / "pack")
    with tarfile.open(tmp_path / "pack" / "device_check.tar.gz") as tar:
        data = tar.extractfile("device_check/big.log").read()
    assert data.startswith(b"[first bytes cut") and data.endswith(b"END") and len(data) < (5 << 20)


def test_selectors_take_the_first_match_or_all_with_a_star():
    items = [SimpleNamespace(nodeid=n) for n in ("t.py::a[1]", "t.py::a[2]", "t.py::b", "u.py::c[x]", "u.py::c[y]")]
    chosen, missing = devcheck_plugin.select(items, ["u.py::c*", "t.py::a", "t.py::nope"])
    assert [i.nodeid for i in chosen] == ["u.py::c[x]", "u.py::c[y]", "t.py::a[1]"]
    assert missing == ["t.py::nope"]


def test_summary_from_rows_when_pytest_wrote_no_json():
    text = summarize.summarize_records([_row("test_x[a]", time_per_call_s=2e-3, images_per_s=10.0),
                                        {"event": "collected", "count": 1}])
    assert "from the rows file" in text and "| test_x[a] | 2.00 ms | 10.0 |" in text


def test_rows_file_survives_a_line_cut_by_a_kill(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps(_row("a", x=1)) + "\n" + '{"event": "test", "bench": {"na')
    assert [r["bench"]["name"] for r in _module().read_rows(p)] == ["a"]


def test_plugin_writes_and_syncs_each_row(tmp_path, monkeypatch):
    f = open(tmp_path / "rows.jsonl", "a")
    monkeypatch.setitem(devcheck_plugin._state, "file", f)
    devcheck_plugin._write({"event": "test", "nodeid": "x"})
    assert json.loads((tmp_path / "rows.jsonl").read_text())["nodeid"] == "x"  # on disk before close
    f.close()


def test_summarize_module_still_reads_a_benchmark_file(tmp_path, capsys):
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"benchmarks": [{"name": "r", "extra_info": {"gb_s": 1.5}}]}))
    assert summarize.main([str(js)]) == 0 and "| r | 1.5 |" in capsys.readouterr().out


def test_sigint_inside_a_benchmark_round_still_leaves_the_json(tmp_path):
    """pytest-benchmark's JSON writer fails on a benchmark stopped before its first round (no
    statistics), which would lose every finished row of the phase: the plugin leaves it out."""
    import signal
    import subprocess
    import time

    (tmp_path / "test_two.py").write_text(
        "import pathlib, time\n"
        "def test_done(benchmark):\n"
        "    benchmark.pedantic(lambda: None, rounds=2)\n"
        "def test_stopped(benchmark):\n"
        f"    marker = pathlib.Path({str(tmp_path / 'inside')!r})\n"
        "    benchmark.pedantic(lambda: (marker.touch(), time.sleep(60)), rounds=2)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "bench"), "WGF_ROWS": str(tmp_path / "rows.jsonl")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "devcheck_plugin",
                             "test_two.py", f"--benchmark-json={tmp_path / 'b.json'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.monotonic()
    while not (tmp_path / "inside").exists() and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 2  # pytest's "interrupted"
    assert [b["name"] for b in json.loads((tmp_path / "b.json").read_text())["benchmarks"]] == ["test_done"]
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["nodeid"] for r in rows if r.get("event") == "test"] == ["test_two.py::test_done"]
    assert [r["name"] for r in rows if r.get("event") == "dropped"] == ["test_stopped"]


@pytest.mark.parametrize("issue,pattern", [("16", "cpu-steps"), ("17", "loop")])
def test_cpu_targets_read_the_recorded_bench_files(issue, pattern):
    """The CPU targets name the rows their bench files really write: evaluated on the recorded file, every
    one-thread target has a figure in them (a renamed row would read 'not measured')."""
    paths = sorted((ROOT / "bench" / "results").glob(f"cpu-*-{pattern}.json"))
    assert paths, pattern
    recs = [{"event": "test", "bench": b} for path in paths for b in json.loads(path.read_text())["benchmarks"]]
    got = [(t, r) for t, r in T.evaluate(recs, {"mode": "full", "cpu_phase": True}) if t.issue == issue]
    # two-thread rows skip on a loaded machine; k-diffusion is not installed here (docs/sampling.md says why)
    one_thread = [(t, r) for t, r in got if "2 threads" not in t.what and "k-diffusion" not in t.what]
    assert one_thread, issue
    for t, r in one_thread:
        assert r.status in ("pass", "miss") and r.figure, (t.what, r)
