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


def _imports(path, package_dir) -> set[str]:
    """The modules of ich_prep / ich_train that `path` imports, at the top or inside a function
    (a function-level import is still an arrow), but not under `if TYPE_CHECKING:`."""
    import ast

    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING") for n in ast.walk(node)}  # fmt: skip
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)  # `from ich_prep import card`: the module card, when it is one
            out |= {f"{node.module}.{a.name}" for a in node.names if (package_dir.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()}  # fmt: skip
    return {m for m in out if m.split(".")[0] in ("ich_prep", "ich_train") and "." in m}


def _cycles(package: str) -> list[list[str]]:
    """Every import cycle among the modules of `package`, each as the path that closes it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / package
    graph = {f"{package}.{p.stem}": _imports(p, root) for p in sorted(root.glob("*.py")) if p.stem != "__init__"}  # fmt: skip
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n])
            elif n in graph and n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle_among_ich_prep_modules():
    """No module of ich_prep imports, directly or through others, a module that imports it back
    (function-level imports count: they hid manifest <-> card)."""
    assert _cycles("ich_prep") == []


def test_no_import_cycle_between_the_trainer_config_and_context():
    """ich_train.config and ich_train.context: the config owns --context's range (MAX_CONTEXT),
    the context imports the config, never the reverse."""
    assert not [c for c in _cycles("ich_train") if "ich_train.config" in c and "ich_train.context" in c]  # fmt: skip
