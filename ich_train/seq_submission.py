"""`ich-train predict --seq S... --checkpoint C...`: the stage-2 Kaggle submission.

The test build is embedded by every fold CNN C (the features the sequence models were trained on
came from these same CNNs, out of fold); every sequence checkpoint S runs over each CNN's test
series; the probabilities are averaged over all (C, S) pairs. Images the build could not read get
the CNNs' mean training prior, as in the 2D submission.
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


def _seq_models(paths: list[str], cnn_sha: dict[str, str], tta: tuple[str, ...]) -> list[tuple[SeqModel, dict]]:  # fmt: skip
    """The sequence models, each refused unless it was trained on features of the given CNNs,
    embedded with the same --tta (the mean of a slice's and its mirror's features is not what a
    model trained on single views learned from, nor the reverse)."""
    models = []
    for path in paths:
        ck = load(path)
        trained_tta = (ck.get("embed") or {}).get("tta")
        if isinstance(trained_tta, list) and sorted(map(str, trained_tta)) != sorted(tta):
            said = [" ".join(t) if t else "none" for t in (sorted(map(str, trained_tta)), sorted(tta))]  # fmt: skip
            raise SeqError(f"--seq {path} was trained on embeddings made with --tta {said[0][:40]!r}, this predict uses --tta {said[1]!r}; pass the --tta its embeddings used (embed's --tta)")  # fmt: skip
        trained_on = {c.get("sha256") for c in (ck.get("embed") or {}).get("checkpoints", []) if isinstance(c, dict)}  # fmt: skip
        foreign = [c for c, sha in cnn_sha.items() if trained_on and sha not in trained_on]
        if foreign:
            raise SeqError(f"--seq {path} was trained on features of other CNNs than --checkpoint {foreign[0]}; pass the fold CNNs whose out-of-fold features it learned from")  # fmt: skip
        model = SeqModel(**ck["model_args"])
        model.load_state_dict(ck["model"])
        models.append((model, ck))
    return models


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
    models = _seq_models(seqs, {c: _cnn_sha256(c) for c in cnns}, tta)
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
            for (seq, seq_ck), seq_path in zip(models, seqs, strict=True):
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
        probs = np.stack([total[i] for i in ids]) / (len(cnns) * len(models))
        ids, probs, n_filled = align_to_index(build.index, ids, probs, np.mean(priors, axis=0))
        if dist.main:
            write_submission(out, ids, probs)
            check_submission(out, ids)
        return {"out": out, "images": len(ids), "filled_with_prior": n_filled, "checkpoints": len(cnns), "seq_checkpoints": len(seqs)}  # fmt: skip
    finally:
        distributed.cleanup()
