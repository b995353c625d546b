"""Shard streaming: fold selection, exact epochs, rank/worker splits, no unpickling."""

import dataclasses
import pickle

import pytest
import torch

from ich_prep.manifest import FormatError
from ich_train.data import (
    Build,
    EvalStream,
    ShardError,
    TrainStream,
    create_loader,
    decode_sample,
    read_shard,
)
from tests.train_fixtures import deadline, make_build

CPU = torch.device("cpu")


class Boom:
    """Unpickling this creates a file: proof that a pickle member was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _ids(loader):
    return [i for batch in loader for i in batch["id"]]


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return make_build(
        tmp_path_factory.mktemp("b"), folds=3, per_shard=10, shards_per_fold=2, size=16
    )


def test_fold_selection_reads_only_the_selected_shards(tmp_path):
    """Unselected folds' shards are garbage on disk; training and validation on the others still work."""
    root = make_build(tmp_path, folds=3, per_shard=8, size=16)
    (root / "train-f2-00000.tar").write_bytes(b"not a tar file" * 100)
    b = Build(root)
    with pytest.raises(ShardError):  # control: reading the damaged shard does fail
        list(read_shard(b.select([2])[0], b.encoding))
    train = TrainStream(b.select([0]), b.encoding, 4, 2, shuffle_buffer=4)
    valid = EvalStream(b.select([1]), b.encoding, 4)
    assert len(_ids(create_loader(train, 0, CPU))) == 8
    assert sorted(_ids(create_loader(valid, 0, CPU))) == sorted(b.ids(b.select([1])))


def test_unknown_fold_names_the_available_folds(build_dir):
    """Asking for a fold the build lacks lists the folds it has."""
    with pytest.raises(ValueError, match=r"its folds are \[0, 1, 2\]"):
        Build(build_dir).select([7])


def test_every_rank_gets_the_same_number_of_batches_with_fewer_shards_than_slots(tmp_path):
    """1 shard, 3 ranks x 2 workers: each rank yields exactly its quota and nothing hangs."""
    root = make_build(tmp_path, folds=2, per_shard=6, size=16)
    b = Build(root)
    counts = []
    with deadline(60):
        for rank in range(3):
            ds = TrainStream(b.select([0]), b.encoding, 4, 5, rank=rank, world=3, shuffle_buffer=3)
            counts.append(len(list(create_loader(ds, 2, CPU))))
    assert counts == [5, 5, 5]


def test_validation_covers_every_sample_once_over_ranks_and_workers(build_dir):
    """3 ranks x 2 workers over 2 shards: the union is the fold, no duplicates, empty slots end."""
    b = Build(build_dir)
    shards = b.select([1])
    seen = []
    with deadline(60):
        for rank in range(3):
            seen += _ids(
                create_loader(
                    EvalStream(shards, b.encoding, 3, rank=rank, world=3, workers=2), 2, CPU
                )
            )
    assert sorted(seen) == sorted(b.ids(shards))


def test_eval_len_matches_the_batches_yielded(build_dir):
    """len(EvalStream) counts the partial last batch of every worker."""
    b = Build(build_dir)
    ds = EvalStream(b.select([0, 1]), b.encoding, 3, workers=2)
    assert len(list(create_loader(ds, 2, CPU))) == len(ds)


def test_sample_order_is_fixed_by_seed_and_epoch(build_dir):
    """Same seed and epoch: same order; another epoch: another order."""
    b = Build(build_dir)

    def order(seed, epoch):
        ds = TrainStream(b.select([0, 1]), b.encoding, 4, 10, seed=seed, shuffle_buffer=8)
        ds.set_epoch(epoch)
        return _ids(create_loader(ds, 0, CPU))

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert sorted(order(1, 0)) == sorted(b.ids(b.select([0, 1])))  # 40 samples, 40 read: one pass


@pytest.mark.parametrize(("workers", "skip"), [(0, 3), (2, 3), (2, 6), (3, 4), (2, 7)])
def test_skipping_batches_resumes_the_same_epoch_order(build_dir, workers, skip):
    """set_epoch(e, skip=k) yields exactly the batches after the first k of epoch e, in order."""
    b = Build(build_dir)

    def batches(skip):
        ds = TrainStream(b.select([0, 1]), b.encoding, 3, 7, seed=4, shuffle_buffer=5)
        ds.set_epoch(2, skip=skip)
        with deadline(60):
            return [batch["id"] for batch in create_loader(ds, workers, CPU)]

    full = batches(0)
    assert len(full) == 7
    assert batches(skip) == full[skip:]


def test_batches_are_uint8_nhwc_with_float_labels(build_dir):
    """Images stay uint8 (B, H, W, 3) until the device; labels are float (B, 6)."""
    b = Build(build_dir)
    batch = next(iter(create_loader(TrainStream(b.select([0]), b.encoding, 4, 1), 0, CPU)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 16, 16, 3)
    assert batch["label"].dtype == torch.float32 and batch["label"].shape == (4, 6)


def test_pickle_members_are_never_unpickled(tmp_path):
    """A `.pyd` member whose unpickling would create a file is skipped unread; reading still works."""
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Boom(marker))
    pickle.loads(evil)  # control: this pickle really creates the file when unpickled
    assert marker.exists()
    marker.unlink()
    root = make_build(
        tmp_path / "b", folds=2, per_shard=6, size=16, extra={"pyd": evil, "pickle": evil}
    )
    b = Build(root)
    raw = list(read_shard(b.select([0])[0], b.encoding))
    assert all({k for k in s if not k.startswith("__")} == {b.encoding, "json"} for s in raw)
    assert len(_ids(create_loader(EvalStream(b.select([0, 1]), b.encoding, 4), 0, CPU))) == 12
    assert not marker.exists()


def test_sample_without_image_member_fails_clearly(tmp_path):
    """A sample missing the manifest's encoding member is named in the error."""
    root = make_build(tmp_path, folds=2, per_shard=4, size=16, encoding="png")
    b = Build(root)
    b.encoding = "npy.gz"  # as if the manifest named another encoding than the shards hold
    with pytest.raises(
        ShardError, match=r"no \.npy\.gz image"
    ):  # the one decode: sample.decode_sample
        [decode_sample(r, b.encoding) for r in read_shard(b.select([0])[0], b.encoding)]


def test_truncated_shard_is_detected(tmp_path):
    """A shard holding fewer samples than the manifest says raises, naming the shard."""
    root = make_build(tmp_path, folds=2, per_shard=4, size=16)
    b = Build(root)
    shard = b.select([0])[0]
    short = dataclasses.replace(shard, samples=shard.samples + 1)
    with pytest.raises(ShardError, match="held 4 samples, the manifest says 5"):
        list(read_shard(short, b.encoding))


def test_index_and_manifest_disagreeing_is_refused(tmp_path):
    """An index whose ok rows do not match the manifest's shard counts is an inconsistent build."""
    import json

    import pandas as pd

    root = make_build(tmp_path, folds=2, per_shard=4, size=16)
    index = pd.read_parquet(root / "index.parquet")
    index.iloc[:-1].to_parquet(root / "index.parquet")
    with pytest.raises(FormatError, match="declares 7 rows.*manifest says 8"):
        Build(root)  # the row count is checked from the Parquet footer first
    m = json.loads((root / "manifest.json").read_text())
    m["counts"]["inputs"] = 7
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="inconsistent"):
        Build(root)


def test_shards_stream_over_http_without_curl(tmp_path, monkeypatch):
    """A shard URL (http://) reads like a local file, with no curl (or any program) on PATH."""
    import functools
    import http.server
    import threading

    root = make_build(tmp_path, folds=2, per_shard=5, size=16)
    b = Build(root)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    try:
        local = b.select([0])[0]
        url = f"http://127.0.0.1:{server.server_address[1]}/{local.name}"
        remote = dataclasses.replace(local, url=url)
        with deadline(60):
            assert [s["__key__"] for s in read_shard(remote, b.encoding)] == [
                s["__key__"] for s in read_shard(local, b.encoding)
            ]
    finally:
        server.shutdown()


def test_build_in_an_fsspec_store_streams_like_a_local_one(tmp_path):
    """A build copied to an fsspec URL (memory://, as s3:// would be) gives the same batches."""
    import fsspec

    root = make_build(tmp_path, folds=2, per_shard=6, size=16)
    fs = fsspec.filesystem("memory")
    for f in root.iterdir():
        fs.pipe(f"/ichbuild/{f.name}", f.read_bytes())

    def ids(where):
        b = Build(where)
        return _ids(create_loader(TrainStream(b.select([0]), b.encoding, 3, 2, seed=1), 0, CPU))

    assert ids("memory://ichbuild") == ids(str(root))
