"""A small build starts no more workers than it has work for: one header chunk (<= 256 files) is
read in the build process, and the compile starts one worker per pending shard at most (a worker
costs ~1 s of imports; a 136-image build spent 9 s starting them for its header pass)."""

from __future__ import annotations

import joblib

import ich_prep.build as build_module
from ich_prep.build import build
from ich_prep.config import BuildConfig
from tests.conftest import phantom_hu, write_hu


def test_a_small_build_starts_no_more_workers_than_its_work(tmp_path, monkeypatch):
    for i in range(3):
        write_hu(tmp_path / "in" / f"ID_s{i}.dcm", phantom_hu(64), z=float(i))
    asked, real = [], joblib.Parallel

    def parallel(*args, **kw):
        asked.append(kw["n_jobs"])
        return real(*args, **kw)

    monkeypatch.setattr(build_module.joblib, "Parallel", parallel)
    cfg = BuildConfig(dicom_dir=str(tmp_path / "in"), labels=None, size=32, shard_size=2)
    res = build(cfg, tmp_path / "out", jobs=4, progress=False)
    assert res.manifest["counts"]["ok"] == 3
    assert asked == [1, 1]  # one header chunk: here; one series, so one shard: one worker
