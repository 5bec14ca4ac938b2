"""The studies built on the engine, each a subcommand of `train/run.py` (ALGORITHMS §5-6):

    chen          Chen et al.'s statistics on a trained digits U-Net (chen_trajectories.py, chen_report.py)
    chen-optimal  the same geometry with the memorising optimal denoiser (chen_optimal.py)
    kwon          does the score-matching objective bound W2? (kwon_bound.py, kwon_setups.py, kwon_report.py)
    diffusers-digits  a diffusers UNet2DModel trained on the digits with our DSM loss (diffusers_digits.py)
    compare-projections  T trained alone (--score-from) against T trained jointly, paired (compare_projections.py)
    pp-sweep      issue 20's pre-registered sweep: does Predict-Project pay at equal compute? (pp_sweep.py,
                  pp_sweep_cost.py, pp_sweep_report.py, pp_sweep_doc.py)
    pp-sweep-toy  the same sweep on the 2-D toy, learned and analytic score (pp_sweep_toy.py)

Each module has `add_arguments(parser)` and `run(args) -> exit code`; a new study adds one line here.
"""
from . import (chen_optimal, chen_trajectories, compare_projections, diffusers_digits, kwon_bound, pp_sweep,
               pp_sweep_toy)

EXPERIMENTS = {"chen": chen_trajectories, "chen-optimal": chen_optimal, "kwon": kwon_bound,
               "diffusers-digits": diffusers_digits, "compare-projections": compare_projections,
               "pp-sweep": pp_sweep, "pp-sweep-toy": pp_sweep_toy}

__all__ = ["EXPERIMENTS"]
