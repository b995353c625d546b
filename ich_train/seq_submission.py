"""`ich-train predict --seq S... --checkpoint C...`: the stage-2 Kaggle submission.

The test build is embedded by every fold CNN C, and sequence checkpoints S run over CNNs' test
series as their --protocol says (`pairs`): pooled (trained on the out-of-fold features of these
same CNNs), every S over every C; per-cnn (trained on one CNN's own features), each S over its own
CNN only. The probabilities are averaged over the (C, S) pairs. Images the build could not read
get the CNNs' mean training prior, as in the 2D submission.
"""

from __future__ import annotations

import numpy as np

from ich_prep.location import sha256_file
from ich_train import distributed
from ich_train.checkpoint import CheckpointError
from ich_train.data import Build, create_loader
from ich_train.embed import embed_loader
from ich_train.embed_format import embedding_table
from ich_train.infer import check_preprocessing, eval_stream, load_model
from ich_train.seq import SeqError, SeqModel, load, one_thread, predict_series, select_inputs
from ich_train.seq_data import as_positions, series_of_table
from ich_train.submission import align_to_index, check_out_file, check_submission, write_submission


def _seq_models(paths: list[str], tta: tuple[str, ...]) -> list[tuple[SeqModel, dict]]:
    """The sequence models with their checkpoints, each refused unless it was trained on features
    embedded with the same --tta (the mean of a slice's and its mirror's features is not what a
    model trained on single views learned from, nor the reverse)."""
    models = []
    for path in paths:
        ck = load(path)
        trained_tta = (ck.get("embed") or {}).get("tta")
        if isinstance(trained_tta, list) and sorted(map(str, trained_tta)) != sorted(tta):
            said = [" ".join(t) if t else "none" for t in (sorted(map(str, trained_tta)), sorted(tta))]  # fmt: skip
            raise SeqError(f"--seq {path} was trained on embeddings made with --tta {said[0][:40]!r}, this predict uses --tta {said[1]!r}; pass the --tta its embeddings used (embed's --tta)")  # fmt: skip
        model = SeqModel(**ck["model_args"])
        model.load_state_dict(ck["model"])
        models.append((model, ck))
    return models


def pairs(seqs: list[str], cks: list[dict], cnn_sha: dict[str, str]) -> dict[str, list[int]]:
    """--checkpoint path -> the indices of the --seq models to run over its test features: every
    one for pooled models, its own for per-cnn ones; SeqError (one line) for a protocol mix, a
    CNN a model never learned from, a per-cnn model without its CNN, or a CNN without its model."""
    protocol = {ck["config"].get("protocol", "pooled") for ck in cks}
    if len(protocol) > 1:
        raise SeqError(f"--seq mixes sequence models of --protocol {' and '.join(sorted(protocol))}; pass models of one protocol (per-cnn ones run on their own CNN only, pooled ones on every CNN)")  # fmt: skip
    trained = [{c.get("sha256") for c in ck["embed"]["checkpoints"]} for ck in cks]
    if protocol == {"per-cnn"}:
        out: dict[str, list[int]] = {c: [] for c in cnn_sha}
        for i, (path, shas) in enumerate(zip(seqs, trained, strict=True)):
            mine = [c for c, sha in cnn_sha.items() if sha in shas]
            if not mine:
                raise SeqError(f"--seq {path} (--protocol per-cnn) was trained on the features of one CNN, {next(iter(ck['path'] for ck in cks[i]['embed']['checkpoints']), '?')[-80:]!r}, which is not among --checkpoint; pass each per-cnn sequence model with its own fold CNN")  # fmt: skip
            out[mine[0]].append(i)
        alone = [c for c, mine in out.items() if not mine]
        if alone:
            raise SeqError(f"--checkpoint {alone[0]} has no --seq model of its own (--protocol per-cnn pairs each sequence model with the CNN it was trained on); pass its model or leave it out")  # fmt: skip
        return out
    for path, shas in zip(seqs, trained, strict=True):
        foreign = [c for c, sha in cnn_sha.items() if shas and sha not in shas]
        if foreign:
            raise SeqError(f"--seq {path} was trained on features of other CNNs than --checkpoint {foreign[0]}; pass the fold CNNs whose out-of-fold features it learned from")  # fmt: skip
    return {c: list(range(len(seqs))) for c in cnn_sha}


def _cnn_sha256(path: str) -> str:
    """The sha256 of a --checkpoint file, or a CheckpointError naming it (missing, a folder, ...)."""
    try:
        return sha256_file(path)
    except OSError as e:
        raise CheckpointError(f"--checkpoint {path} cannot be read ({e.strerror or e}); pass the fold CNNs' best.pt files (ich-train fit)") from None  # fmt: skip


def predict_seq_submission(
    cnns: list[str], seqs: list[str], shards: str, out: str, tta: tuple[str, ...] = (),
    batch_size: int = 128, workers: int = 4, device: str = "auto", progress: bool = True,
) -> dict:  # fmt: skip
    """Write the stage-2 submission for the test build `shards` to `out` (see the module doc)."""
    check_out_file(out)
    cnn_sha = {c: _cnn_sha256(c) for c in cnns}  # first: a missing --checkpoint is named as such
    models = _seq_models(seqs, tta)
    runs = pairs(seqs, [ck for _, ck in models], cnn_sha)
    dist = distributed.setup(device)
    try:
        build = Build(shards)
        sel = build.select(None)
        total: dict[str, np.ndarray] = {}
        priors = []
        for path in cnns:
            cnn, augment, ck = load_model(path, dist.device)
            check_preprocessing(path, ck, build)
            loader = create_loader(eval_stream(build, sel, ck, dist, batch_size, workers, "the sequence stage"), workers, dist.device)  # fmt: skip
            res = embed_loader(cnn, loader, augment, dist=dist, precision=ck["config"].get("precision", "auto"), tta=tta, progress=progress)  # fmt: skip
            series = series_of_table(embedding_table(build, res, 0), f"the features of {path}")
            for i in runs[path]:
                (seq, seq_ck), seq_path = models[i], seqs[i]
                takes = seq_ck["model_args"]["feature_dim"]  # 0: --inputs logits
                if takes not in (0, series[0].features.shape[1]):
                    raise SeqError(f"--seq {seq_path} takes other features than {path} gives; pass the CNNs it was trained with")  # fmt: skip
                mine = as_positions(select_inputs(series, takes), seq_ck["slice_inputs"]["positions"], f"--shards {shards}")  # fmt: skip
                with one_thread():
                    p = predict_series(seq, mine)
                for image_id, row in zip(p["ids"], p["probs"], strict=True):
                    total[image_id] = total.get(image_id, 0) + row
            priors.append(np.asarray(ck["prior"]))
        ids = sorted(total)
        probs = np.stack([total[i] for i in ids]) / sum(map(len, runs.values()))
        ids, probs, n_filled = align_to_index(build.index, ids, probs, np.mean(priors, axis=0))
        if dist.main:
            write_submission(out, ids, probs)
            check_submission(out, ids)
        return {"out": out, "images": len(ids), "filled_with_prior": n_filled, "checkpoints": len(cnns), "seq_checkpoints": len(seqs)}  # fmt: skip
    finally:
        distributed.cleanup()
