"""bench/device_check.py: the one-command GPU check refuses a CPU run in one line, and its --dry
mode writes every file (test report, benchmark JSON, Markdown summaries) on CPU."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "bench" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_cpu_in_one_line(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path / "dc")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "--dry" in err
    assert not (tmp_path / "dc").exists()


def test_bad_budget_is_a_one_line_error(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path), "--dry", "--budget", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_dry_run_writes_reports(tmp_path):
    out = tmp_path / "dc"
    assert _module().main(["--out", str(out), "--dry"]) == 0
    summary = (out / "device_check.md").read_text()
    assert "- device: cpu (--dry" in summary and "- commit: " in summary and "- date: " in summary
    assert "| tests | 2 passed, 0 failed" in summary
    data = json.loads((out / "bench-step.json").read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_step[em-eager-fp32-B1]"]
    assert "| test_step[em-eager-fp32-B1] |" in (out / "bench-step.md").read_text()
