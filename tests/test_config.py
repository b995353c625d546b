"""The build config: window parsing, validation, and the CLI's clear refusals."""

import re

import pytest

from ich_prep.cli import main
from ich_prep.config import BuildConfig, ConfigError, Window, parse_windows
from ich_prep.errors import UserError


def test_presets_and_pairs():
    """Presets and CENTER/WIDTH pairs parse to named windows in the given order."""
    presets = parse_windows("brain,subdural,bone")
    assert presets == (
        Window("brain", 40.0, 80.0),
        Window("subdural", 80.0, 200.0),
        Window("bone", 600.0, 2800.0),
    )
    pairs = parse_windows("40/80,80/200,600/2800")
    assert [(w.center, w.width) for w in pairs] == [(w.center, w.width) for w in presets]
    assert parse_windows("brain,-100/400.5,soft-tissue")[1] == Window("c-100w400.5", -100.0, 400.5)


@pytest.mark.parametrize("spec", ["", ",".join(["brain"] * 9), "brain,skull,bone", "40/0,1/1,2/2"])
def test_bad_windows_refused(spec):
    """No window or more than 8, an unknown preset or a zero width: a ValueError that says what is
    allowed."""
    with pytest.raises(ValueError, match="window"):
        parse_windows(spec)


def test_one_to_eight_windows_make_the_layout():
    """Each window is one channel of the layout; 1 and 8 are allowed, and a window may repeat."""
    for spec, n in (("brain", 1), ("brain,bone", 2), ("brain,brain,brain", 3), (",".join(["bone"] * 8), 8)):  # fmt: skip
        cfg = BuildConfig(dicom_dir="d", windows=parse_windows(spec))
        assert cfg.layout.channels == n and BuildConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("encoding", ["png", "jpg"])
def test_png_and_jpg_take_one_or_three_windows(encoding):
    """cv2 writes and reads 8-bit grey or RGB: 2 or 5 windows in png/jpg are refused naming npy.gz
    (also from a manifest someone edited); 1 and 3 are built."""
    for spec in ("brain", "brain,subdural,bone"):
        BuildConfig(dicom_dir="d", encoding=encoding, windows=parse_windows(spec))
    for spec in ("brain,bone", "brain,subdural,bone,soft-tissue,40/40"):
        with pytest.raises(ConfigError, match="use --encoding npy.gz"):
            BuildConfig(dicom_dir="d", encoding=encoding, windows=parse_windows(spec))
    d = BuildConfig(dicom_dir="d", encoding="npy.gz", windows=parse_windows("brain,bone")).to_dict()
    with pytest.raises(ConfigError, match="stores 1 or 3 channels"):
        BuildConfig.from_dict({**d, "encoding": encoding})


def test_config_round_trips_through_json_dict():
    """to_dict gives plain json types and from_dict rebuilds the same frozen config."""
    cfg = BuildConfig(dicom_dir="d", labels="l.csv", spacing_mm=0.8, encoding="png")
    d = cfg.to_dict()
    assert isinstance(d["windows"], list) and BuildConfig.from_dict(d) == cfg


@pytest.mark.parametrize(
    "kw, word",
    [({"encoding": "webp"}, "encoding"), ({"size": 8}, "size"), ({"fraction": 1.5}, "fraction"),
     ({"shard_size": 0}, "shard-size"), ({"labels": "x.csv", "folds": 1}, "folds"),
     ({"limit": 0}, "--limit must be a whole number >= 1"), ({"limit": -1}, "--limit"),
     ({"fraction": 0.0}, "fraction"), ({"spacing_mm": float("inf")}, "0.1 to 10.0 mm"),
     ({"spacing_mm": float("nan")}, "spacing-mm"), ({"spacing_mm": 0.001}, "spacing-mm"),
     ({"spacing_mm": 10.5}, "spacing-mm"), ({"seed": -1}, "--seed must be a whole number from 0"),
     ({"seed": 2**32}, "seed"), ({"size": 4097}, "16 to 4096"), ({"shard_size": 100_001}, "shard-size"),
     ({"labels": "x.csv", "folds": 101}, "2 to 100"), ({"size": 64.5}, "size")],
)  # fmt: skip
def test_invalid_config_refused(kw, word):
    """Impossible or absurd settings are refused naming the option and its range: a ConfigError,
    which is a UserError (one line, exit 2 in the CLI) and still a ValueError."""
    with pytest.raises(ConfigError, match=re.escape(word)) as e:
        BuildConfig(dicom_dir="d", **kw)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)


def test_edges_of_the_ranges_are_allowed():
    """The bounds themselves are valid settings."""
    BuildConfig(dicom_dir="d", labels="x.csv", size=16, spacing_mm=0.1, seed=0, limit=1,
                fraction=1.0, shard_size=1, folds=2)  # fmt: skip
    BuildConfig(dicom_dir="d", labels="x.csv", size=4096, spacing_mm=10.0, seed=2**32 - 1,
                shard_size=100_000, folds=100)  # fmt: skip


def test_manifest_config_out_of_range_is_refused():
    """A config read back from a manifest goes through the same checks."""
    d = BuildConfig(dicom_dir="d").to_dict()
    with pytest.raises(ConfigError, match="--spacing-mm"):
        BuildConfig.from_dict({**d, "spacing_mm": 0.001})


def test_cli_refuses_bad_windows_with_exit_2(tmp_path, capsys):
    """`ich-prep build --windows brain,skull` exits 2 with a one-line reason, no traceback."""
    rc = main(
        [
            "build",
            "--dicom-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--windows",
            "brain,skull",
        ]
    )
    assert rc == 2 and "neither a preset" in capsys.readouterr().err


def test_cli_refuses_missing_dicom_dir(tmp_path, capsys):
    """A --dicom-dir that does not exist exits 2 naming it."""
    rc = main(
        ["build", "--dicom-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert rc == 2 and "nope is not a folder" in capsys.readouterr().err
