"""Nothing a build or a DICOM file holds can drive the terminal: every C0/C1 control character and
every bidi override or isolate in a member name, an index detail, a path or a message is shown as
an escape by both CLIs (terminal.for_terminal, through terminal.echo), never written raw."""

from __future__ import annotations

import ast
import io
import json
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ich_prep.cli import main as prep_main
from ich_prep.manifest import dumps
from ich_prep.shards import sha256_file
from ich_prep.terminal import echo, for_terminal
from ich_train.cli import main as train_main
from tests.sharing_fixtures import manifest_of, rewrite_manifest, shard_members
from tests.train_fixtures import make_build

ROOT = Path(__file__).resolve().parents[1]
C0 = [chr(i) for i in range(0x20)] + ["\x7f"]
C1 = [chr(i) for i in range(0x80, 0xA0)]
BIDI = [chr(i) for i in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)]
FORMAT = ["\u200b", "\u200d", "\ufeff", "\u2028", "\u2029", "\ud800", "\U000e0001"]
HOSTILE = C0 + C1 + BIDI + FORMAT


def raw_control(text: str) -> list[str]:
    """The hostile characters left raw in `text` (newlines between our lines allowed)."""
    return sorted({repr(c) for c in text if c in HOSTILE and c != "\n"})


@pytest.mark.parametrize("c", HOSTILE, ids=lambda c: f"U+{ord(c):04X}")
def test_for_terminal_escapes_every_control_format_and_bidi_character(c):
    """Each character alone, inside text and repeated: shown as its escape, nothing else changed."""
    for text in (c, f"ab{c}[2J{c}cd", c * 3 + "ID_1"):
        shown = for_terminal(text)
        assert shown.isprintable() and not raw_control(shown), repr(shown)
        assert shown.replace(for_terminal(c), c) == text
    assert for_terminal(c) in (f"\\x{ord(c):02x}", f"\\u{ord(c):04x}", f"\\U{ord(c):08x}")


def test_echo_keeps_our_lines_and_escapes_within_them(capsys):
    echo("one\x1b[2J\ntwo\u202e")
    assert capsys.readouterr().out == "one\\x1b[2J\ntwo\\u202e\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return make_build(tmp_path_factory.mktemp("term") / "b", folds=2, per_shard=4, size=16)


def test_verify_shows_hostile_member_names_escaped(made, tmp_path, capsys):
    """The reported case (`\\x1b[2J\\x1b[31mPWN.json`) and a member named with each C0 (but NUL
    and '/'), C1 and bidi character: verify's text report has no raw one (BAD_SAMPLE and
    EXTRA_SAMPLE lines quote the key; was raw), and no forged line from a newline."""
    folder = Path(shutil.copytree(made, tmp_path / "b"))
    name = manifest_of(folder)["shards"][0]["name"]
    members = shard_members(folder / name)
    hostile = [c for c in HOSTILE if c not in ("\x00", "/") and not "\ud800" <= c <= "\udfff"]
    extra = ["\x1b[2J\x1b[31mPWN.json"] + [f"ID_{c}[2J{c}x.json" for c in hostile]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, data in members + [(e, b"{}") for e in extra]:
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    (folder / name).write_bytes(raw.getvalue())
    m = manifest_of(folder)
    m["shards"][0].update(bytes=(folder / name).stat().st_size, sha256=sha256_file(folder / name))
    rewrite_manifest(folder, m)
    assert prep_main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert not raw_control(out), raw_control(out)
    assert "BAD_SAMPLE" in out and "\\x1b[2J\\x1b[31mPWN" in out
    assert not any(line.startswith("[2J") for line in out.splitlines())


def test_info_shows_index_details_escaped(made, tmp_path, capsys):
    """An index whose error rows' details and reasons hold every hostile character (a DICOM file
    named `ESC[2J ESC[32mALL-GOOD ESC[0m`): `ich-prep info` prints them escaped (was raw)."""
    folder = Path(shutil.copytree(made, tmp_path / "b"))
    path = folder / "index.parquet"
    index = pd.read_parquet(path)
    bad = index.iloc[:1].copy()
    bad["status"], bad["shard"], bad["reason"] = "error", None, "unreadable\x1b[8m"
    bad["detail"] = "ID_\x1b[2J\x1b[32mALL-GOOD\x1b[0m.dcm: " + "".join(HOSTILE[1:]).replace(
        "\ud800", ""
    )
    bad["image_id"] = "ID_bad"
    index = pd.concat([index, bad], ignore_index=True)
    pq.write_table(pa.Table.from_pandas(index, preserve_index=False), path)
    m = json.loads((folder / "manifest.json").read_text())
    m["counts"].update(inputs=len(index), error=int((index["status"] == "error").sum()))
    m["index"].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (folder / "manifest.json").write_bytes(dumps(m))
    assert prep_main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[2J\\x1b[32mALL-GOOD" in out, out
    assert not raw_control(out), raw_control(out)


@pytest.mark.parametrize("c", ["\x1b", "\x07", "\r", "\x9b", "\u202e", "\u2066", "\x08"], ids=repr)
def test_error_lines_of_both_clis_escape_paths_and_flag_values(tmp_path, capsys, c):
    """A path or flag value with a control or bidi character, echoed in the one error line of
    ich-prep (UserError, argparse) and ich-train (a missing build): escaped."""
    bad = str(tmp_path / f"no{c}]0;PWN{c}where")
    runs = [
        (prep_main, ["info", bad]),
        (prep_main, ["build", "--dicom-dir", bad, "--out", str(tmp_path / "o")]),
        (prep_main, ["build", "--dicom-dir", bad, "--out", "o", "--encoding", f"x{c}"]),
        (train_main, ["evaluate", "--checkpoint", bad, "--shards", bad, "--fold", "0"]),
        (train_main, ["fit", "--shards", bad, "--out", str(tmp_path / "run"), "--device", "cpu"]),
    ]
    for main, argv in runs:
        assert main(argv) == 2, argv
        cap = capsys.readouterr()
        assert cap.err.count("\n") == 1 and not raw_control(cap.err + cap.out), repr(cap.err)


def test_every_print_of_both_packages_goes_through_echo():
    """By construction: no `print` (called or passed, as `say=print`) in ich_prep or ich_train
    outside terminal.py, so every line a CLI writes is echo's."""
    found = []
    for path in sorted([*ROOT.glob("ich_prep/*.py"), *ROOT.glob("ich_train/*.py")]):
        if path.name == "terminal.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id == "print":
                found.append(f"{path.name}:{node.lineno}")
    assert not found, found


def test_the_warning_hooks_last_only_while_a_cli_runs():
    """main() also runs in-process (tests, other programs): its warning and last-resort hooks
    are put back when it returns, so a later warning of the host program is its own again."""
    import logging
    import warnings

    from ich_prep.cli import main as prep
    from ich_train.cli import main as train

    before = warnings.showwarning, logging.lastResort
    for main in (prep, train):
        assert main(["info", "/nonexistent/build"]) == 2
        assert (warnings.showwarning, logging.lastResort) == before
