"""Verdicts that respect noise (issue 10): a difference is called only when its paired interval
excludes zero and it is not negligibly small; the gmm job's verdicts pair cells seed by seed."""
import numpy as np
import pytest
from scipy import stats

from train.evaluation.report import MIN_EFFECT, bootstrap_verdicts, seed_interval, toy_verdicts, verdict


def test_verdict_words():
    assert verdict(-0.3, -0.5, 0.1, 10.0) == "within noise"
    assert verdict(-0.3, -0.5, -0.1, 10.0) == "better"
    assert verdict(0.3, 0.1, 0.5, 10.0) == "worse"
    # beyond noise but tiny: PP at N = 1000 (delta_p = 0.003) against EM, with a near-zero paired spread
    assert verdict(-1e-4, -2e-4, -0.5e-4, 0.18).startswith("no practical difference")
    assert verdict(-MIN_EFFECT * 0.18 * 1.01, -1, -1e-9, 0.18) == "better"


def test_seed_interval_is_the_student_t_interval():
    d = [0.01, -0.02, 0.005, 0.03, -0.004]
    m, lo, hi = seed_interval(d)
    ref = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert m == pytest.approx(np.mean(d)) and (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_toy_verdicts_pair_seeds_and_flag_pp_equal_to_em():
    rng = np.random.default_rng(0)
    em = list(0.15 + 0.03 * rng.standard_normal(5))  # seed-to-seed sd ~0.03, as measured on the toy
    per_seed = {
        ("em", 1000): em,
        ("pp", 1000): [x + 1e-5 for x in em],  # the projection moves nothing at delta_p = 0.003
        ("em2n", 1000): [x - 0.002 for x in em],
        ("em", 20): [x + 0.1 for x in em],
        ("pp", 20): [x + 0.1005 for x in em],
        ("em2n", 20): [x + 0.02 for x in em],  # paired: the shared seed noise cancels in the difference
    }
    lines = toy_verdicts(per_seed, "learned", [1000, 20], 5)
    n1000 = next(line for line in lines if line.startswith("- N=1000"))
    n20 = next(line for line in lines if line.startswith("- N=20"))
    assert "not a test of the projection" in n1000 and "PP is better" not in n1000
    assert "vs EM at 2N steps (equal NFE): +0.0805" in n20 and "PP is worse" in n20
    # unpaired, the same per-cell spread would hide a 0.002 difference; paired it is exact but negligible
    assert "no practical difference" in n1000


def test_bootstrap_verdict_lines():
    rows = [{"label": "Predict-Project minus Score-based (EM) (paired)", "N": 100, "value": -0.22, "se": 0.2,
             "scale": 6.4},
            {"label": "Predict-Project minus Score-based (EM, 2N steps) (paired)", "N": 20, "value": 12.0,
             "se": 2.0, "scale": 22.0}]
    a, b = bootstrap_verdicts(rows)
    assert a.endswith("95% interval [-0.61, +0.17]: within noise.")
    assert b.endswith("Predict-Project is worse.")
