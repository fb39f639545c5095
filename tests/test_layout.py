"""The layout stays as designed: each constant has one home (others import it), one AUC, one atomic-write primitive,
the demo generator a library module apart from the MIND set-up script."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import demo_corpus
import prepare_MIND_dataset as pm
from config import build_parser

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(ROOT.glob("*.py"))  # the project's modules (tests and bench scripts import them)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_layout_sees_the_modules():
    names = {p.name for p in MODULES}
    assert {"config.py", "demo_corpus.py", "scorer.py", "util.py", "MIND_corpus.py", "main.py"} <= names


def test_each_module_level_constant_is_defined_in_one_module():
    """An UPPER_CASE name assigned at module level in two modules is a constant with two homes (DATASETS was in
    config.py and prepare_MIND_dataset.py, CRITERIA in config.py and scorer.py): one defines it, others import it."""
    homes: dict[str, list[str]] = {}
    for path in MODULES:
        for node in _tree(path).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper():
                    homes.setdefault(target.id, []).append(path.name)
    twice = {name: where for name, where in homes.items() if len(where) > 1}
    assert not twice, f"constants defined in more than one module: {twice}"


def test_magic_sizes_are_named_once():
    """`1 << 24` (the user encoders' chunk size) was written four times; now CHUNK_ELEMENTS holds it."""
    text = {p.name: p.read_text(encoding="utf-8") for p in MODULES}
    assert sum(t.count("1 << 24") for t in text.values()) == 1
    # MINER, CATT, SUE, FIM and (issue 25) CAUM read it.
    assert text["userEncoders.py"].count("= CHUNK_ELEMENTS") == 5


def test_the_demo_sizes_have_one_home():
    """main.py's --demo_* defaults, prepare_MIND_dataset.py's and generate_demo's are demo_corpus.DEMO_SIZES."""
    main_defaults = {a.dest: a.default for a in build_parser()._actions}
    script = {a.dest: a.default for a in pm.build_parser()._actions}
    signature = inspect.signature(demo_corpus.generate_demo).parameters
    for name, flag in demo_corpus.DEMO_FLAG_NAMES.items():
        expected = demo_corpus.DEMO_SEED if name == "seed" else demo_corpus.DEMO_SIZES[name]
        assert main_defaults[flag] == expected, flag
        assert signature[name].default == expected, name
        assert script["seed" if name == "seed" else flag] == expected, flag


def test_one_auc_implementation():
    """The official per-impression AUC lives in scorer.py; the demo's oracle.json takes it from there (the demo
    generator had its own copy)."""
    defined = {(p.name, node.name) for p in MODULES for node in ast.walk(_tree(p))
               if isinstance(node, ast.FunctionDef) and "auc" in node.name.lower()}
    assert defined == {("scorer.py", "_row_auc"), ("demo_corpus.py", "_mean_auc")}
    assert "per_impression_metrics(" in inspect.getsource(demo_corpus._mean_auc)


def test_one_atomic_file_write_primitive():
    """Temporary file + rename is written once (util.atomic_write); checkpoints, zips, npz records and text files
    are its clients."""
    users = [p.name for p in MODULES if "mkstemp(" in p.read_text(encoding="utf-8")]
    assert users == ["util.py"]
    import checkpoints

    assert "util.atomic_write(" in inspect.getsource(checkpoints.atomic_torch_save)


def test_no_module_imports_the_set_up_script():
    """prepare_MIND_dataset.py is a script (download, protocols, its CLI); main.py and the library modules import
    the demo generator from demo_corpus.py, never the script."""
    importers = []
    for path in MODULES:
        if path.name == "prepare_MIND_dataset.py":
            continue
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(
                node, ast.ImportFrom) else []
            if "prepare_MIND_dataset" in names:
                importers.append(path.name)
    assert importers == []


MAX_FUNCTION_LINES = 100
PRODUCT_MODULES = [*MODULES, *sorted(ROOT.glob("news_data/*.py"))]  # the dataset package is product code too


def _functions(tree: ast.AST, prefix: str):
    """(qualified name, lines from `def` to the last line) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}.{node.name}", node.end_lineno - node.lineno + 1
            yield from _functions(node, f"{prefix}.{node.name}")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}.{node.name}")
        else:
            yield from _functions(node, prefix)


def test_no_function_is_longer_than_100_lines():
    """A product function of 238 lines (generate_demo) or 136 (build_behaviors) does several things; each gets a
    name of its own. Counted from `def` to its last line, docstring and nested functions included."""
    long = {name: n for path in PRODUCT_MODULES for name, n in _functions(_tree(path), path.stem)
            if n > MAX_FUNCTION_LINES}
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert any(n > 50 for path in PRODUCT_MODULES for _, n in _functions(_tree(path), path.stem))  # sees bodies
    assert any(p.parent.name == "news_data" for p in PRODUCT_MODULES)
