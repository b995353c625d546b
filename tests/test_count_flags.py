"""Every count flag of both CLIs has a sane range (errors.int_range, or the config that owns the
flag): a huge value is one line and exit 2 before anything starts (was: `fit --workers 100000`
forked until the load reached 123). DataLoader workers die with their parent (was: 300+ outlived
it)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ich_prep.cli import main as prep_main
from ich_prep.cli import make_parser
from ich_train.cli import build_parser
from ich_train.cli import main as train_main

X, Y = "<in>", "<out>"  # replaced by paths inside a regular file
BASE = {
    ("ich-prep", "build"): ["build", "--dicom-dir", X, "--labels", X, "--out", Y],
    ("ich-prep", "synth"): ["synth", "--out", Y],
    ("ich-prep", "verify"): ["verify", X],
    ("ich-prep", "info"): ["info", X],
    ("ich-prep", "preview"): ["preview", X],
    ("ich-train", "fit"): ["fit", "--shards", X, "--out", Y],
    ("ich-train", "evaluate"): ["evaluate", "--checkpoint", X, "--shards", X, "--fold", "0"],
    ("ich-train", "report"): ["report", X, "--out", Y],
    ("ich-train", "predict"): ["predict", "--checkpoint", X, "--shards", X],
    ("ich-train", "bench"): ["bench", "--shards", X],
    ("ich-train", "embed"): ["embed", "--checkpoint", X, "--shards", X, "--out", Y],
    ("ich-train", "average"): ["average", X, X, "--out", Y, "--shards", X],
    ("ich-train", "seq", "fit"): ["seq", "fit", "--features", X, "--valid-fold", "0", "--out", Y],
    ("ich-train", "seq", "evaluate"): [
        "seq",
        "evaluate",
        "--checkpoint",
        X,
        "--features",
        X,
        "--fold",
        "0",
    ],  # fmt: skip
}
# Whole-number flags that are not counts: fold numbers (checked against the build), and
# thresholds where any size is meaningful (a subset of more images than exist is all of them).
NOT_COUNTS = {"--fold", "--valid-fold", "--folds@embed", "--limit", "--max-errors"}


def subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))
            return
    yield path, parser


def int_flags():
    """(tool, subcommand path, flag) of every option of both CLIs that parses a whole number."""
    for tool, parser in (("ich-prep", make_parser()), ("ich-train", build_parser())):
        for path, sub in subparsers(parser, (tool,)):
            for a in sub._actions:
                flag = next((o for o in a.option_strings if o.startswith("--")), None)
                whole = a.type is int or hasattr(a.type, "bounds")
                if flag and whole and flag not in NOT_COUNTS and f"{flag}@{path[-1]}" not in NOT_COUNTS:  # fmt: skip
                    yield path, flag


FLAGS = sorted(set(int_flags()))


def test_the_count_flags_are_found():
    names = {f for _, f in FLAGS}
    assert {"--workers", "--batch-size", "--epochs", "--shuffle-buffer", "--jobs", "--shard-size",
            "--n", "--batch-series", "--steps", "--patients"} <= names  # fmt: skip
    assert len(FLAGS) >= 35


@pytest.mark.parametrize("value", [str(10**12), "-1"])
@pytest.mark.parametrize("path, flag", FLAGS, ids=[f"{' '.join(p[1:])} {f}" for p, f in FLAGS])
def test_every_count_flag_refuses_huge_values_in_one_line(path, flag, value, tmp_path, capsys):
    """`FLAG 10**12` and `FLAG -1` on every count flag of every subcommand: exit 2 and one line
    naming the flag, before any file is read or worker started (inputs and outputs lie inside a
    regular file, so nothing could be written anyway)."""
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "x")
    argv = [bad if a in (X, Y) else a for a in BASE[path]]
    main = prep_main if path[0] == "ich-prep" else train_main
    rc = main([*argv, flag, value])
    err = capsys.readouterr().err
    assert rc == 2, (path, flag, value, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert flag in err, err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_workers_100000_is_refused_before_a_worker_starts(tmp_path, capsys):
    """The reported case, in-process: one line naming the range; no child process was made."""
    before = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
    rc = train_main(["fit", "--shards", str(tmp_path / "b"), "--out", str(tmp_path / "r"), "--workers", "100000"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--workers" in err and "from 0 to 64" in err, err
    children = [p for p in set(os.listdir("/proc")) - before if p.isdigit()]
    assert all(_ppid(int(p)) != os.getpid() for p in children)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from torch.utils.data import IterableDataset
    from ich_train.data import create_loader

    class Busy(IterableDataset):  # a worker deep in its dataset (reading a shard), never idle
        def __iter__(self):
            yield {"x": torch.zeros(1)}
            while True:
                time.sleep(0.05)

    it = iter(create_loader(Busy(), 2, torch.device("cpu")))
    next(it)
    print(" ".join(str(w.pid) for w in it._workers), flush=True)
    time.sleep(600)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl PR_SET_PDEATHSIG is Linux")
def test_loader_workers_die_with_their_parent():
    """A training process with 2 busy DataLoader workers is killed with SIGKILL (no cleanup runs):
    its workers are gone within seconds (was: they kept running). The whole process group is
    killed on every exit path."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "DataLoader workers outlived their parent"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
