"""What the CLI tests share: a tiny run configuration, `train/run.py` run in this process, and the
one-line-error check every user error must pass (one line, "error:", exit code 2, no traceback)."""
from train.run import main

#: the --quick digits config narrowed further: a 16-channel U-Net, batch 8, a few steps, a tiny evaluation
TINY = {"batch_size": 8, "log_every": 2, "ckpt_every": 2, "warmup": 2,
        "net": {"model_channels": 16, "head_channels": 32},
        "eval": {"steps": [3], "samples": 6, "batch": 6, "grid": 6, "classifier_epochs": 1}}


def cli(argv, capsys):
    """(exit code, stderr) of `train/run.py argv` run in this process (argparse errors included)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(code, err, *expect, absent=()):
    """A user error: exit 2 and exactly one line, `error: ...`, holding every `expect` and no `absent`."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    for a in absent:
        assert a not in err, err
