"""The layers point one way: services use shared/, never each other; shared/ uses no service;
the operator's tools (shared/tools/) are used by nothing below them.

Read from the imports of every module (``ast``), so a new import that breaks the layering
fails here, with the file and line, before anyone has to untangle it.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# package -> folder, as pyproject.toml's package-dir maps them
SERVICES = {"trainer": "trainer", "data_pipeline": "data-pipeline", "evaluator": "evaluator",
            "rl_reward": "rl-reward", "checkpoint": "checkpoint"}


def imported(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``, a module of ``package``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's own package
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                out += [(node.lineno, module)] if node.module else [(node.lineno, f"{module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tuneloop" and parts[1] in SERVICES else None


def modules():
    for path in sorted((REPO / "shared").rglob("*.py")):
        rel = path.relative_to(REPO / "shared").with_suffix("")
        package = ".".join(["tuneloop", *rel.parts[:-1]])
        yield path, package, None
    for name, folder in SERVICES.items():
        for path in sorted((REPO / "services" / folder).rglob("*.py")):
            yield path, f"tuneloop.{name}", name


def test_no_service_imports_another_and_shared_imports_none():
    wrong = []
    for path, package, own in modules():
        for line, module in imported(path, package):
            other = service_of(module)
            if other and other != own:
                who = f"service {own}" if own else "shared/"
                wrong.append(f"{path.relative_to(REPO)}:{line}: {who} imports {module}")
    assert not wrong, "layering broken:\n" + "\n".join(wrong)


def test_neither_a_service_nor_the_core_imports_the_operators_tools():
    """shared/tools/ (tuneloop.tools: the CLI and what it runs) sits on top: a service, or a
    core module of shared/ that services import, never imports it."""
    wrong = []
    for path, package, own in modules():
        if package.startswith("tuneloop.tools") or path == REPO / "shared" / "__main__.py":  # `python -m tuneloop`: the CLI
            continue
        for line, module in imported(path, package):
            if module and (module == "tuneloop.tools" or module.startswith("tuneloop.tools.")):
                who = f"service {own}" if own else "shared/ (core)"
                wrong.append(f"{path.relative_to(REPO)}:{line}: {who} imports {module}")
    assert not wrong, "layering broken:\n" + "\n".join(wrong)


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    """The rule above would pass on a tree it cannot read: show it reads both kinds."""
    f = tmp_path / "m.py"
    f.write_text("from ..trainer import recipe\nimport tuneloop.checkpoint.export\nfrom . import bus\n")
    got = [m for _, m in imported(f, "tuneloop.sweep")]
    assert got == ["tuneloop.trainer", "tuneloop.checkpoint.export", "tuneloop.sweep.bus"]
    assert [service_of(m) for m in got] == ["trainer", "checkpoint", None]
