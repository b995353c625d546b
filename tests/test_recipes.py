"""docs/recipes.md stays runnable: every ich-prep / ich-train command in its code blocks parses
with today's CLIs, each build and fit makes a valid config, and each timm:TAG is a pretrained tag
timm knows for that model (nothing is run or downloaded)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import timm

from ich_prep.cli import make_parser as prep_parser
from ich_prep.config import BuildConfig, parse_windows
from ich_train.cli import build_parser as train_parser
from ich_train.config import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"


def _commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", RECIPES.read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [_as_cli(shlex.split(line)) for line in lines if line.strip()]


def _as_cli(cmd: list[str]) -> list[str]:
    """`torchrun [its flags] -m ich_train fit ...` is `ich-train fit ...` on every process."""
    if cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1] == "ich_train":
        return ["ich-train", *cmd[cmd.index("-m") + 2 :]]
    return cmd


def _subcommands(parser) -> set[str]:
    return {name for a in parser._subparsers._group_actions for name in a.choices}


def test_recipes_have_commands():
    cmds = _commands()
    assert sum(c[:2] == ["ich-train", "fit"] for c in cmds) >= 7
    assert all(c[0] in ("ich-prep", "ich-train") for c in cmds)


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: " ".join(c[:2] + c[-2:]))
def test_recipe_command_parses_and_makes_a_valid_config(cmd):
    tool, argv = cmd[0], cmd[1:]
    parser = prep_parser() if tool == "ich-prep" else train_parser()
    if argv[0] not in _subcommands(parser):
        pytest.skip(f"{tool} {argv[0]} is not on this branch yet")
    args = parser.parse_args(argv)  # a usage error exits 2 and fails the test
    if tool == "ich-prep" and argv[0] == "build":
        BuildConfig(dicom_dir=args.dicom_dir, labels=args.labels, size=args.size,
                    windows=parse_windows(args.windows), spacing_mm=args.spacing_mm)  # fmt: skip
    if tool == "ich-train" and argv[0] == "fit":
        names = set(TrainConfig.__dataclass_fields__)
        cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
        if (cfg.pretrained or "").startswith("timm:"):  # a tag timm knows, for this model
            tag = cfg.pretrained.removeprefix("timm:")
            assert tag in timm.list_pretrained(f"{cfg.model}.*"), tag
