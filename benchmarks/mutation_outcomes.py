"""Every damaged file's outcome, to compare two versions of the DICOM reader (same outcome = same
error reason and detail, or the same header and the same pixels).

Damaged copies of the real RSNA samples (each of the 109 files, --per-file copies, made by
tests/test_fuzz.py's `mutate`: 1-8 random bytes changed in the header or the tail, or a cut) and
of test_fuzz's six synthetic encodings (explicit, implicit, 12-bit, RLE, deflated, big-endian).
For each: read_header, then read_slice with that header and without; the outcome is the error
reason and detail, or a hash of the header dict and of both pixel arrays.

    python benchmarks/mutation_outcomes.py --out before.json          # at one commit
    python benchmarks/mutation_outcomes.py --out after.json           # at another
    python benchmarks/mutation_outcomes.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ich_prep.read_dicom import ImageError, read_header, read_slice  # noqa: E402
from tests.conftest import REAL_SAMPLES  # noqa: E402
from tests.test_fuzz import SEED, _bases, write_mutants  # noqa: E402


def outcome(path: Path) -> str:
    """'error <reason>: <detail>' or 'ok <hash of header and pixels>'."""
    try:
        h = read_header(path)
        digest = hashlib.sha256(json.dumps(h, sort_keys=True, default=repr).encode())
        for header in (h, None):
            stored, h2 = read_slice(path, header)
            digest.update(np.ascontiguousarray(stored).tobytes() + str(stored.dtype).encode())
            digest.update(json.dumps(h2, sort_keys=True, default=repr).encode())
    except ImageError as e:
        return f"error {e.reason}: {e.detail.replace(str(path), '<path>')}"
    return f"ok {digest.hexdigest()[:16]}"


def outcomes(per_file: int, per_synthetic: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        real = {f"r{i:03d}": p.read_bytes() for i, p in enumerate(sorted(REAL_SAMPLES.rglob("*.dcm")))}  # fmt: skip
        what = write_mutants(real, root / "real", per_file, SEED + 10)
        out = {f"real/{n}": outcome(root / "real" / n) for n in what}
        for i, p in enumerate(sorted(REAL_SAMPLES.rglob("*.dcm"))):  # the undamaged files too
            out[f"orig/{i:03d}"] = outcome(p)
        synth = _bases(root / "base")
        what = write_mutants(synth, root / "synth", per_synthetic, SEED + 11)
        out.update({f"synth/{n}": outcome(root / "synth" / n) for n in what})
    return out


def compare(a: dict[str, str], b: dict[str, str]) -> int:
    assert a.keys() == b.keys(), "different file sets: same --per-file and seed needed"
    kinds = Counter(v.split(":")[0].split(" ")[0] + (" " + v.split(" ")[1].rstrip(":") if v.startswith("error") else "") for v in a.values())  # fmt: skip
    print(
        f"{len(a)} files; outcomes in A: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    )
    reason = [k for k in a if a[k].split(":")[0] != b[k].split(":")[0]]
    detail = [k for k in a if a[k] != b[k] and k not in reason]
    print(f"different outcome (ok/hash or error reason): {len(reason)}; same reason, other detail: {len(detail)}")  # fmt: skip
    for k in (reason + detail)[:10]:
        print(f"  {k}\n    A {a[k][:160]}\n    B {b[k][:160]}")
    return 1 if reason or detail else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", help="write the outcomes here (JSON)")
    p.add_argument("--per-file", type=int, default=10, help="damaged copies of each real file")
    p.add_argument("--per-synthetic", type=int, default=80, help="of each synthetic encoding")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*(json.loads(Path(f).read_text()) for f in args.compare))
    warnings.simplefilter("ignore")
    res = outcomes(args.per_file, args.per_synthetic)
    Path(args.out).write_text(json.dumps(res, indent=0, sort_keys=True))
    print(f"{len(res)} outcomes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
