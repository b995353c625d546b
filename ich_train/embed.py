"""ich-train embed: each slice's pooled CNN features (float16) and logits, with its image id,
series id, slice rank and position, for the sequence stage (ich_train.seq).

One Parquet file, readable by pandas, pyarrow and DuckDB, in the format of ich_train.embed_format
(its one owner): the columns and the schema metadata (`ich_embed`: the checkpoints with path,
sha256 and valid fold, the build, the TTA).

Out of fold (`oof=True`, several checkpoints): fold k is embedded by the checkpoint whose
validation fold was k, so no row's features come from a CNN that trained on it; that is what the
sequence model must learn from (docs/training.md says what in-sample features do instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ich_prep.location import atomic_file, sha256_file
from ich_train import distributed
from ich_train.data import Build, create_loader
from ich_train.distributed import Dist, all_gather
from ich_train.embed_format import LOGITS, META_KEY, EmbedError, embedding_table
from ich_train.engine import autocast
from ich_train.infer import check_preprocessing, eval_stream, load_model
from ich_train.progress import track
from ich_train.submission import check_out_file

__all__ = ["LOGITS", "META_KEY", "EmbedError", "embed", "embed_loader", "pooled_and_logits"]


def pooled_and_logits(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features (B, D), logits (B, 6)) of a timm model, computing the trunk once."""
    fx = model.forward_features(x)
    pooled = model.forward_head(fx, pre_logits=True)
    return pooled, model.get_classifier()(pooled)


@torch.no_grad()
def embed_loader(model, loader, augment, *, dist: Dist, precision="auto", tta=(), progress=True):
    """{'ids', 'features' (N, D) float16, 'logits' (N, 6) float32} over every rank's share."""
    model.eval()
    ids, feats, logits = [], [], []
    for batch in track(loader, "embed", "batch", dist.main and progress):
        x = augment(batch["image"].to(dist.device, non_blocking=True), train=False)
        with autocast(dist.device, precision):
            f, z = pooled_and_logits(model, x)
            if "hflip" in tta:
                f2, z2 = pooled_and_logits(model, x.flip(3))
                f, z = (f.float() + f2.float()) / 2, (z.float() + z2.float()) / 2
        ids.extend(batch["id"])
        feats.append(f.float().cpu().numpy().astype(np.float16))
        logits.append(z.float().cpu().numpy().astype(np.float32))
    local = (ids, _cat(feats, np.float16), _cat(logits, np.float32))
    parts = all_gather(dist, local)
    return {
        "ids": [i for p in parts for i in p[0]],
        "features": np.concatenate(
            [p[1] for p in parts if len(p[1])] or [np.zeros((0, 0), np.float16)]
        ),  # fmt: skip
        "logits": np.concatenate(
            [p[2] for p in parts if len(p[2])] or [np.zeros((0, 6), np.float32)]
        ),  # fmt: skip
    }


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros((0, 0), dtype)


def assign_folds(checkpoints: list[str], valid_folds: list[int], folds: list[int], oof: bool):
    """fold -> index of the checkpoint that embeds it. Out of fold: the checkpoint whose validation
    fold it is (each asked-for fold exactly one); otherwise one checkpoint embeds every fold."""
    if not oof:
        if len(checkpoints) != 1:
            raise EmbedError(
                f"{len(checkpoints)} checkpoints given without --oof; features of different CNNs "
                "cannot be mixed in one file: pass one --checkpoint, or --oof with one per fold"
            )
        return dict.fromkeys(folds, 0)
    out = {}
    for fold in folds:
        mine = [i for i, v in enumerate(valid_folds) if v == fold]
        if len(mine) != 1:
            raise EmbedError(
                f"--oof: fold {fold} is the validation fold of {len(mine)} of the checkpoints "
                f"(their validation folds: {valid_folds}); pass exactly one checkpoint per fold"
            )
        out[fold] = mine[0]
    return out


def check_same_inputs(checkpoints: list[str], configs: list[dict]) -> None:
    """EmbedError unless every CNN reads the same input: single slices (2D) or the same context
    (2.5D: --context K, --context-window). The sequence model of fold k trains on the other folds'
    features and is scored on fold k's, so one file must not mix what its CNNs saw."""
    seen = [(c.get("context", 0), c.get("context_window")) for c in configs]
    for path, s in zip(checkpoints, seen, strict=True):
        if s != seen[0]:
            what = [f"--context {k}" + (f" --context-window {w}" if w else "") if k else "2D (no --context)" for k, w in (seen[0], s)]  # fmt: skip
            raise EmbedError(f"--checkpoint {path} was trained on {what[1]}, {checkpoints[0]} on {what[0]}: one embeddings file must not mix 2D and 2.5D CNNs; pass fold CNNs trained with the same --context")  # fmt: skip


def embed(
    checkpoints: list[str], shards: str, out: str, folds: list[int] | None = None,
    oof: bool = False, tta: tuple[str, ...] = (), batch_size: int = 128, workers: int = 4,
    device: str = "auto", progress: bool = True,
) -> dict:  # fmt: skip
    """Embed `folds` of `shards` (None: all of them; a test build: everything) into `out`."""
    check_out_file(Path(out), "--out", "embed.parquet")
    dist = distributed.setup(device)
    try:
        build = Build(shards)
        folds = list(folds) if folds is not None else (build.folds or [-1])
        loaded = [load_model(c, dist.device) for c in checkpoints]
        for c, (_, _, ckpt) in zip(checkpoints, loaded, strict=True):
            check_preprocessing(c, ckpt, build)
        check_same_inputs(checkpoints, [ck["config"] for _, _, ck in loaded])
        owner = assign_folds(checkpoints, [ck["config"]["valid_fold"] for _, _, ck in loaded], folds, oof)  # fmt: skip
        tables = []
        for i, (model, augment, ckpt) in enumerate(loaded):
            mine = [f for f, o in owner.items() if o == i]
            if not mine:
                continue
            sel = build.select(None if mine == [-1] else mine)
            stream = eval_stream(build, sel, ckpt, dist, batch_size, workers, "the sequence stage")
            res = embed_loader(
                model, create_loader(stream, workers, dist.device), augment, dist=dist,
                precision=ckpt["config"].get("precision", "auto"), tta=tta, progress=progress,
            )  # fmt: skip
            tables.append(embedding_table(build, res, i))
        table = pa.concat_tables(tables)
        meta = {
            "checkpoints": [
                {
                    "path": str(c),
                    "sha256": sha256_file(c),
                    "valid_fold": ck["config"]["valid_fold"],
                    "model": ck["config"]["model"],
                }  # fmt: skip
                for c, (_, _, ck) in zip(checkpoints, loaded, strict=True)
            ],
            "build": str(shards),
            "oof": oof,
            "tta": list(tta),
            "feature_dim": int(table.schema.field("features").type.list_size),
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        if dist.main:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(out)) as tmp:
                pq.write_table(table, tmp)
        return {"rows": table.num_rows, "series": len(set(table.column("series_id").to_pylist())), **meta}  # fmt: skip
    finally:
        distributed.cleanup()
