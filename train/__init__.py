"""Reference trainer and evaluation for the image experiments of Ghimire et al. (ALGORITHMS §1-3, §7).

`python train/run.py` is the command line; nothing in wgfcore or kernels imports this package.
"""
