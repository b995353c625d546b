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


def test_build_workers_and_help_never_import_the_fold_splitter():
    """A build worker imports ich_prep.build (the module of the tasks it unpickles) and `ich-prep
    --help` imports the CLI: neither loads iterstrat -> scikit-learn -> scipy (~1.4 s of CPU per
    process), which only split.assign_folds needs, in the build process, once."""
    code = (
        "import sys\n"
        "import ich_prep.build, ich_prep.read_dicom, ich_prep.transform, ich_prep.shards\n"
        "from ich_prep.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(k for k in ('iterstrat', 'sklearn', 'scipy') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
