"""The package's layering: core/ imports nothing above it; the domain packages (detect, classify, sensing) stand on
core/ and never import one another; reproduce/ stands on them; cli/ on everything."""

import ast
from pathlib import Path

import sos_detect

ROOT = Path(sos_detect.__file__).parent
LEVELS = {"core": 0, "detect": 1, "classify": 1, "sensing": 1, "reproduce": 2, "cli": 3}


def imports() -> list[tuple[str, str, str]]:
    """(file, importing package, imported package) for every `sos_detect.X…` import, at any depth of the file."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        package = path.relative_to(ROOT).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "sos_detect" and len(parts) > 1:
                    edges.append((str(path.relative_to(ROOT)), package, parts[1]))
    return edges


def test_every_module_lives_in_a_layer():
    assert {p.relative_to(ROOT).parts[0] for p in ROOT.rglob("*.py")} == {*LEVELS, "__init__.py"}


def test_no_import_runs_up_or_sideways():
    bad = [
        f"{file}: imports sos_detect.{dep}"
        for file, package, dep in imports()
        if dep != package and (LEVELS[dep] > LEVELS[package] or (LEVELS[dep] == LEVELS[package] == 1))
    ]
    assert not bad, bad
    assert {dep for _, package, dep in imports() if package == "core"} == {"core"}


def test_head_kinds_of_the_option_table_are_the_heads_kinds():
    from sos_detect.core.options import HEAD_KINDS
    from sos_detect.detect.heads import TASK_KINDS

    assert ("box", "cls", *TASK_KINDS.values()) == HEAD_KINDS
