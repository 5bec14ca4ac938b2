"""The jobs `train/run.py` dispatches to: train an image run (image.py, image_training.py), re-evaluate
one (reevaluate.py), the 2-D toy (toy.py), and export a run's results into docs/ (export.py)."""
