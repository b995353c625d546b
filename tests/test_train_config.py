"""TrainConfig: validation, round trip, resume comparison."""

import pytest

from ich_train.config import ConfigError, TrainConfig, check_resumable


def _cfg(**kw):
    return TrainConfig(shards="s", out="runs/x", **kw)


def test_round_trip_through_dict():
    """to_dict (json-able) and from_dict give back an equal config."""
    cfg = _cfg(train_folds=(0, 1), pos_weight=(2.0,), model="resnet10t")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_valid_fold_inside_train_folds_is_refused():
    """Validating on a training fold is an error naming the fix."""
    with pytest.raises(ConfigError, match="drop it from --train-folds"):
        _cfg(valid_fold=1, train_folds=(0, 1))


def test_resume_refuses_a_changed_learning_rate():
    """A field that changes training (lr) differs: the message names the flag and both values."""
    with pytest.raises(ConfigError, match=r"--lr: run has 0.001, now 0.002"):
        check_resumable(_cfg(lr=1e-3).to_dict(), _cfg(lr=2e-3))


def test_resume_allows_runtime_fields_to_change():
    """Workers, device, compile and the shards location may differ on resume."""
    check_resumable(
        _cfg(workers=8).to_dict(),
        TrainConfig(shards="http://host/s", out="runs/x", workers=0, compile=True),
    )


def test_unknown_fields_are_refused_by_name():
    """A config from a newer version names the fields it does not know."""
    with pytest.raises(ConfigError, match="newfield"):
        TrainConfig.from_dict({**_cfg().to_dict(), "newfield": 1})
