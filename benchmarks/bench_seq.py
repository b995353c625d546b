"""Time the sequence stage (ich-train seq fit) per series on this machine's CPU, for the GPU-time
arithmetic in docs/training.md: random features of `--dim` (efficientnet_b0 pools 1280) over
`--series` series of `--slices` slices, one training epoch and one validation pass.

    python benchmarks/bench_seq.py --series 2000 --slices 35 --dim 1280
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ich_prep import LABELS
from ich_train.embed import LOGITS, META_KEY
from ich_train.seq import SeqConfig, fit


def write_features(path: Path, series: int, slices: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    n = series * slices
    cols = {
        "image_id": [f"ID_{i}" for i in range(n)],
        "series_id": [f"ID_s{i // slices}" for i in range(n)],
        "slice_rank": np.tile(np.arange(slices, dtype=np.int32), series),
        "series_len": np.full(n, slices, np.int32),
        "fold": (np.arange(n) // slices % 5).astype(np.int16),
        "cnn": (np.arange(n) // slices % 5).astype(np.int16),  # out of fold: CNN k embeds fold k
    }
    for name in LABELS:
        cols[name] = (rng.random(n) < 0.1).astype(np.int8)
    for name in LOGITS:
        cols[name] = rng.normal(-2, 1, n).astype(np.float32)
    feats = rng.normal(size=n * dim).astype(np.float16)
    table = pa.table(cols).append_column("features", pa.FixedSizeListArray.from_arrays(pa.array(feats), dim))  # fmt: skip
    pq.write_table(
        table.replace_schema_metadata(
            {META_KEY: json.dumps({"checkpoints": [{"valid_fold": k} for k in range(5)]}).encode()}
        ),
        path,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--series", type=int, default=2000)
    p.add_argument("--slices", type=int, default=35)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--hidden", type=int, default=128)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "f.parquet"
        write_features(feats, a.series, a.slices, a.dim)
        t0 = time.perf_counter()
        r = fit(SeqConfig(protocol="pooled", features=str(feats), valid_fold=0, epochs=1, hidden=a.hidden), str(Path(tmp) / "run"), log=lambda *_: None)  # fmt: skip
        wall = time.perf_counter() - t0
    print(f"{a.series} series x {a.slices} slices x {a.dim} features, hidden {a.hidden}: one epoch "
          f"(train on 4/5, validate 1/5, reading included) {wall:.1f} s = {wall / a.series * 1e3:.2f} ms/series; best {r['best_valid_loss']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
