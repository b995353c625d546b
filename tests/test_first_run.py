"""What a newcomer sees on a first run: synth's summary, a preview across the whole build."""

from __future__ import annotations

import json

import pytest

from ich_prep.cli import main


def test_synth_prints_a_summary_and_keeps_json_behind_a_flag(tmp_path, capsys):
    """`ich-prep synth` tells a person what it wrote (patients, series, slices, positives, the
    planted quirks) instead of raw JSON; `--json` still prints the JSON for scripts."""
    argv = ["synth", "--patients", "3", "--slices", "2", "--seed", "4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert main([*argv, "--out", str(tmp_path / "b"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    train = f"train: {info['patients']['train']} patients, {info['series']['train']} series, {info['train_images']} slices"  # fmt: skip
    assert train in text
    assert f"test:  {info['patients']['test']} patients, {info['series']['test']} series" in text
    assert ", ".join(f"{k} {v}" for k, v in info["positives"].items()) in text
    assert ", ".join(f"{k} {v}" for k, v in info["forms"].items()) in text
    assert info["corrupt"] and f"truncated (unreadable) slices: {info['corrupt'][0]}" in text
    assert sum(info["series"].values()) == sum(info["forms"].values())
    assert "{" not in text
