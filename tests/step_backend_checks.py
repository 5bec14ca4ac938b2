"""Checks every step backend of wgfcore.backends must pass, shared by the C++ (tests/test_cpu_steps.py)
and Triton (tests/test_kernels_step.py) backends' tests: one contract, one copy."""
from __future__ import annotations

import torch

from wgfcore.sample import FLAG_CLEAR


def check_finite_flag(steps, bad: float, device="cpu", last_output=lambda plan, s: s) -> None:
    """A planned backend's passes check the network output each reads (s, T, s') into finite_flag, keeping the
    first bad step; the state is not a network output. `last_output(plan, s_bad)` gives the output of the
    last pass (e.g. a network output of another dtype taken through plan.accept)."""
    x = torch.randn(3, 5000, device=device)  # two groups/programs: the bad element sits in the second
    s_bad = x.clone()
    s_bad[2, 4000] = bad
    tables = {"predict": torch.ones(9, 2, device=device), "em": torch.ones(9, 3, device=device),
              "project": torch.ones(9, 2, device=device), "heun": torch.ones(9, 4, device=device)}
    plan = steps.plan(x, tables)
    plan.em(x, x, "em", 2, True)
    plan.heun(x, s_bad, x, x, "heun", 3)  # heun checks s' (its s went through predict first)
    assert int(plan.finite_flag) == FLAG_CLEAR
    plan.project(x, s_bad, "project", 5, False)
    plan.predict(x, s_bad, "predict", 7)  # a later bad step does not overwrite the first
    assert int(plan.finite_flag) == 5
    plan.finite_flag.fill_(FLAG_CLEAR)
    plan.heun(x, x, x, s_bad, "heun", 4)
    plan.em(s_bad, x, "em", 1, True)  # the state is not a network output: not checked
    assert int(plan.finite_flag) == 4
    plan.finite_flag.fill_(FLAG_CLEAR)
    plan.em(x, last_output(plan, s_bad), "em", 6, False)
    assert int(plan.finite_flag) == 6
