"""ich_prep stays light: no torch (and so no webdataset) in the compiler's processes."""

import subprocess
import sys


def test_ich_prep_never_imports_torch():
    """Importing every ich_prep module leaves torch and webdataset unimported (~500 MB per worker)."""
    code = (
        "import importlib, pkgutil, sys, ich_prep\n"
        "for m in pkgutil.iter_modules(ich_prep.__path__):\n"
        "    if m.name != '__main__':\n"
        "        importlib.import_module('ich_prep.' + m.name)\n"
        "print(sorted(k for k in ('torch', 'webdataset') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
