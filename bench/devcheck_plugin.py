"""pytest plugin of bench/device_check.py: nothing measured is lost, even when a phase is stopped.

    WGF_ROWS=rows.jsonl [WGF_SELECT=select.txt] python -m pytest -p devcheck_plugin ...

(bench/ on PYTHONPATH; device_check.py does this.) It writes one JSON line per test to WGF_ROWS
the moment the test's report exists, flushed and synced: the outcome, the duration, the Triton
compile seconds spent during the test (Triton's JIT hooks), and for a benchmark its statistics
and `extra_info` (what bench/conftest.py `record` stores). A phase interrupted or killed keeps
every finished row. With WGF_SELECT, a file of node-id selectors (one per line; `prefix` keeps
the first collected test whose id starts with it, `prefix*` every such test), only those run, in
the file's order, and selectors that match nothing are written as rows too. With
WGF_HOLD_AFTER_ROW_S (only --dry's demo of a stopped phase), it waits that long after each test's
row, so that the phase's stop arrives between two rows whatever the machine's load.
"""
from __future__ import annotations

import json
import os
import time

import pytest

_state = {"file": None, "compile_s": 0.0, "compiles": 0, "starts": {}}


def _write(row: dict) -> None:
    f = _state["file"]
    if f is None:
        return
    row.setdefault("time", time.time())
    f.write(json.dumps(row, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _install_compile_timer() -> None:
    """Count the seconds Triton spends compiling (an in-memory cache miss: a real compile, or a
    load from the on-disk cache), through the hooks Triton calls before and after it."""
    try:
        import triton
        knobs = triton.knobs.runtime
    except (ImportError, AttributeError):
        return
    if knobs.jit_cache_hook is not None or knobs.jit_post_compile_hook is not None:
        return  # someone else's hooks: leave them alone, report no compile time

    def before(*, key, **_):
        _state["starts"][str(key)] = time.perf_counter()
        return None  # None: compile as usual

    def after(*, key, **_):
        t0 = _state["starts"].pop(str(key), None)
        if t0 is not None:
            _state["compile_s"] += time.perf_counter() - t0
            _state["compiles"] += 1
        return None

    knobs.jit_cache_hook = before
    knobs.jit_post_compile_hook = after


def pytest_configure(config):
    path = os.environ.get("WGF_ROWS")
    if path:
        _state["file"] = open(path, "a")
        _write({"event": "start", "pid": os.getpid()})
    _install_compile_timer()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # before pytest-benchmark's own wrapper writes the JSON
def pytest_sessionfinish(session, exitstatus):
    """A benchmark interrupted before its first round has no statistics, and pytest-benchmark's
    JSON writer then fails on it (min() of nothing), losing every finished row of the phase:
    leave such a benchmark out before the writer runs (its test row says it was interrupted)."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and isinstance(getattr(bs, "benchmarks", None), list):
        for b in [b for b in bs.benchmarks if not getattr(getattr(b, "stats", None), "data", None)]:
            bs.benchmarks.remove(b)
            _write({"event": "dropped", "name": getattr(b, "name", "?"),
                    "message": "interrupted before its first round: no statistics, left out of the JSON"})
    yield


def pytest_unconfigure(config):
    if _state["file"] is not None:
        _write({"event": "end"})
        _state["file"].close()
        _state["file"] = None


def read_selectors(path: str) -> list[str]:
    with open(path) as f:
        return [s.strip() for s in f if s.strip() and not s.strip().startswith("#")]


def select(items: list, selectors: list[str]) -> tuple[list, list[str]]:
    """(items to run in selector order, selectors that matched nothing); see the module docstring."""
    chosen, missing, taken = [], [], set()
    for sel in selectors:
        every = sel.endswith("*")
        prefix = sel[:-1] if every else sel
        hits = [it for it in items if it.nodeid.startswith(prefix) and it.nodeid not in taken]
        if not hits:
            missing.append(sel)
            continue
        for it in hits if every else hits[:1]:
            taken.add(it.nodeid)
            chosen.append(it)
    return chosen, missing


def plan(items: list, phases: list[dict]) -> dict:
    """For `device_check.py --plan`: the tests each phase would run, from one collection of all
    their files. A phase is {"name", "files", "k" (its -k expression or ""), "select" (selectors)};
    -k is evaluated with pytest's own matcher, as `pytest -k` does."""
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression

    out = {}
    for ph in phases:
        mine = [it for it in items if it.nodeid.split("::")[0] in ph["files"]]
        if ph.get("k"):
            expr = Expression.compile(ph["k"])
            mine = [it for it in mine if expr.evaluate(KeywordMatcher.from_item(it))]
        missing = []
        if ph.get("select"):
            mine, missing = select(mine, ph["select"])
        out[ph["name"]] = {"ids": [it.nodeid for it in mine], "missing_selectors": missing}
    return out


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    plan_path = os.environ.get("WGF_PLAN")
    if plan_path:  # device_check.py --plan: answer, then run nothing
        with open(plan_path) as f:
            phases = json.load(f)
        with open(plan_path + ".out", "w") as f:
            json.dump(plan(items, phases), f)
        config.hook.pytest_deselected(items=list(items))
        items[:] = []
        return
    path = os.environ.get("WGF_SELECT")
    if not path:
        return
    chosen, missing = select(items, read_selectors(path))
    keep = {id(it) for it in chosen}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    items[:] = chosen
    for sel in missing:
        _write({"event": "test", "nodeid": sel, "outcome": "not found", "when": "collect",
                "message": "no collected test matches this selector"})


def pytest_collection_finish(session):
    _write({"event": "collected", "count": len(session.items)})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _state["compile_s"], _state["compiles"] = 0.0, 0


def _bench(item) -> dict | None:
    bm = getattr(item, "funcargs", {}).get("benchmark")
    if bm is None or getattr(bm, "stats", None) is None:
        return None
    st = bm.stats.stats
    stats = {k: getattr(st, k) for k in ("min", "max", "mean", "median", "stddev", "iqr", "rounds", "iterations")
             if hasattr(st, k)}
    return {"name": bm.name, "fullname": bm.fullname, "params": bm.params, "stats": stats,
            "extra_info": dict(bm.extra_info)}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    # one row per test: its call, or the setup/teardown step that skipped or failed it
    if rep.when == "call" or (rep.when != "call" and not rep.passed):
        row = {"event": "test", "nodeid": item.nodeid, "when": rep.when, "outcome": rep.outcome,
               "duration_s": round(rep.duration, 4), "triton_compile_s": round(_state["compile_s"], 3),
               "triton_compiles": _state["compiles"]}
        if rep.skipped and isinstance(rep.longrepr, tuple):
            row["message"] = str(rep.longrepr[2])[:300]
        elif rep.failed:
            text = str(rep.longrepr)
            row["message"] = next((ln for ln in text.splitlines() if ln.startswith("E ")), text[:300])[:500]
        if hasattr(rep, "wasxfail"):
            row["xfail"] = rep.wasxfail
        bench = _bench(item) if rep.when == "call" else None
        if bench:
            row["bench"] = bench
        _write(row)
        hold = float(os.environ.get("WGF_HOLD_AFTER_ROW_S", "0"))
        if hold > 0 and rep.when == "call":
            time.sleep(hold)  # --dry's capped phase: the SIGINT lands here, so exactly one row is finished
