"""The compile on a real dask.distributed LocalCluster (process workers on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from ich_prep.build import build
from ich_prep.config import BuildConfig
from ich_prep.synth import write_synthetic

# a dask.distributed cluster of worker processes: not in `make test-fast`
pytestmark = pytest.mark.slow

distributed = pytest.importorskip("dask.distributed", reason="the dask extra is not installed")


def tree_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return write_synthetic(root / "data", patients=12, seed=1, slices_per_series=8)


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cl:
        yield cl


def cfg(synth) -> BuildConfig:
    return BuildConfig(
        dicom_dir=str(synth["train_dir"]),
        labels=str(synth["labels_csv"]),
        size=64,
        shard_size=3,
        folds=3,
    )


def test_dask_build_is_byte_identical_to_local(synth, cluster, tmp_path):
    """Shard tasks on Dask workers give the same files, byte for byte, as a local build."""
    build(cfg(synth), tmp_path / "local", jobs=1, progress=False)
    with distributed.Client(cluster):
        build(cfg(synth), tmp_path / "dask", jobs=-1, progress=False, backend="dask")
    assert tree_bytes(tmp_path / "dask") == tree_bytes(tmp_path / "local")


def test_worker_killed_mid_build_loses_nothing(synth, cluster, tmp_path):
    """kill -9 of a worker during a build: the task is retried elsewhere; same bytes as local."""
    build(cfg(synth), tmp_path / "local", jobs=1, progress=False)
    out = tmp_path / "dask"
    with distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        errors = []

        def run():
            try:
                build(cfg(synth), out, jobs=-1, progress=False, backend="dask")
            except Exception as e:  # noqa: BLE001 - reported to the test thread below
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 120
        while time.time() < deadline and len(list((out / "_work").glob("*.tar.json"))) < 2:
            time.sleep(0.01)
        assert not (out / "manifest.json").exists(), "the kill must land mid-build"
        os.kill(pids[0], signal.SIGKILL)
        t.join(timeout=300)
        assert not t.is_alive() and not errors, errors
    assert tree_bytes(out) == tree_bytes(tmp_path / "local")
    assert not list(out.glob("*.partial"))
