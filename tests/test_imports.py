"""usfmae_lib's imports, read from the source with ast (nothing is imported or run).

- No import cycle among the package's modules: imports inside functions count too (they only put
  the cycle off until the call), and so does a subpackage's __init__.py, which runs before any of
  its modules is imported from outside it.
- No module of the package, and no notebook, uses another module's private names (`_name`):
  neither `from .mae import _name` nor `mae._name` where `mae` is bound to a usfmae_lib module (by
  any import, at the top of the file or inside a function). What one module needs from another is
  public there.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "usfmae_lib"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}  # module -> its file
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass(frozen=True)
class Import:
    target: str  # the usfmae_lib module the statement makes Python import
    line: int
    names: tuple  # the names taken from it ("" for the module itself)


@dataclass(frozen=True)
class Use:
    module: str  # the usfmae_lib module a private name is taken from
    name: str
    line: int


class _Reader(ast.NodeVisitor):
    """One file's imports of usfmae_lib modules, and the private names it takes from them.

    A name is a module where the innermost scope that binds it binds it by importing a usfmae_lib
    module; any other binding there (an assignment, an argument, a loop variable) hides it."""

    def __init__(self, path: Path, module: str | None):
        self.path, self.module = path, module
        self.is_package = path.name == "__init__.py"
        self.imports: list[Import] = []
        self.uses: list[Use] = []
        self.scopes: list[tuple] = []  # (is a class body, {name: module, or None: bound otherwise})

    # ------------------------------------------------------------------ resolving import statements
    def _base(self, node: ast.ImportFrom) -> str | None:
        if not node.level:
            return node.module
        if self.module is None:
            return None  # a relative import outside the package
        package = self.module if self.is_package else self.module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def _targets_of(self, module: str) -> list[str]:
        """module, and each package above it that Python runs first from outside it."""
        found = [module]
        parts = module.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            inside = self.module is not None and (self.module == package or self.module.startswith(package + "."))
            if package in FILES and not inside:
                found.append(package)
        return found

    def _bindings(self, node) -> dict:
        """{name: usfmae_lib module or None} that an import statement binds."""
        bound = {}
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name if alias.name in FILES else None
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top if top in FILES else None
        else:
            base = self._base(node)
            for alias in node.names:
                if alias.name == "*":
                    continue
                sub = f"{base}.{alias.name}"
                bound[alias.asname or alias.name] = sub if sub in FILES else None
        return bound

    def _record_import(self, node) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in FILES:  # import usfmae_lib.x.y: the longest module named
                    name = name.rpartition(".")[0]
                if name:
                    self.imports += [Import(t, node.lineno, ("",)) for t in self._targets_of(name)]
            return
        base = self._base(node)
        if base is None or base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            target, name = (sub, "") if sub in FILES else (base, alias.name)
            if target not in FILES:
                continue
            self.imports += [Import(t, node.lineno, (name,)) for t in self._targets_of(target)]
            if target != self.module and _private(alias.name):
                self.uses.append(Use(base, alias.name, node.lineno))

    # ------------------------------------------------------------------ scopes
    def _scope_bindings(self, body_nodes, args=None) -> dict:
        """What a scope binds: its imports of usfmae_lib modules, and every other name it binds."""
        bound = {}
        if args is not None:
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None:
                    bound[a.arg] = None
        stack = list(body_nodes)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update(self._bindings(node))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound[node.name] = None
                stack.extend(node.decorator_list)  # their bodies are scopes of their own
                continue
            elif isinstance(node, ast.Lambda):
                continue
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                bound.setdefault(node.id, None)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.setdefault(node.name, None)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                for name in node.names:
                    bound.pop(name, None)
            stack.extend(ast.iter_child_nodes(node))
        return bound

    def _lookup(self, name: str) -> str | None:
        for depth, (is_class, scope) in enumerate(reversed(self.scopes)):
            if is_class and depth:  # a class body's names are not seen from the functions inside it
                continue
            if name in scope:
                return scope[name]
        return None

    def _module_of(self, node) -> str | None:
        """The usfmae_lib module an expression names (`mae`, `usfmae_lib.mae`), or None."""
        if isinstance(node, ast.Name):
            return self._lookup(node.id)
        if isinstance(node, ast.Attribute):
            outer = self._module_of(node.value)
            if outer is not None and f"{outer}.{node.attr}" in FILES:
                return f"{outer}.{node.attr}"
        return None

    # ------------------------------------------------------------------ visiting
    def read(self, tree: ast.Module) -> "_Reader":
        self.scopes.append((False, self._scope_bindings(tree.body)))
        self.generic_visit(tree)
        return self

    def _visit_scope(self, node, body, args=None) -> None:
        for default in [*(args.defaults if args else []), *(args.kw_defaults if args else [])]:
            if default is not None:
                self.visit(default)
        self.scopes.append((isinstance(node, ast.ClassDef), self._scope_bindings(body, args)))
        for child in body:
            self.visit(child)
        self.scopes.pop()

    def visit_FunctionDef(self, node):
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._visit_scope(node, node.body, node.args)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        self._visit_scope(node, [node.body], node.args)

    def visit_ClassDef(self, node):
        for child in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(child)
        self._visit_scope(node, node.body)

    def visit_Import(self, node):
        self._record_import(node)

    visit_ImportFrom = visit_Import

    def visit_Attribute(self, node):
        module = self._module_of(node.value)
        if module is not None and module != self.module and f"{module}.{node.attr}" not in FILES \
                and _private(node.attr):
            self.uses.append(Use(module, node.attr, node.lineno))
        self.generic_visit(node)


def read(path: Path) -> _Reader:
    module = _module_name(path) if path.is_relative_to(ROOT / PACKAGE) else None
    return _Reader(path, module).read(ast.parse(path.read_text(), str(path)))


READERS = {module: read(path) for module, path in FILES.items()}


def import_graph() -> dict[str, dict[str, list[Import]]]:
    """{module: {module it imports: the import statements}}, within usfmae_lib."""
    graph = {module: {} for module in FILES}
    for module, reader in READERS.items():
        for imp in reader.imports:
            if imp.target != module:
                graph[module].setdefault(imp.target, []).append(imp)
    return graph


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def describe(component, graph) -> str:
    """The cycle's modules and, for each import between them, file:line and the names taken."""
    lines = [f"import cycle among {', '.join(component)}:"]
    for a in component:
        for b in component:
            for imp in graph[a].get(b, []):
                names = ", ".join(n for n in imp.names if n) or "(the module)"
                lines.append(f"  {FILES[a].relative_to(ROOT)}:{imp.line} -> {b}: {names}")
    return "\n".join(lines)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_reader_sees_what_the_package_imports():
    """The reader finds the imports it must: at the top, inside functions, relative and absolute."""
    graph = import_graph()
    assert "usfmae_lib.parameters" in graph["usfmae_lib.runner"]  # at the top
    assert "usfmae_lib.runner" in graph["usfmae_lib.curation"]  # inside a function: `from . import runner`
    assert "usfmae_lib.runner" in graph["usfmae_lib.preprocess.batch"]  # `from .. import runner`
    assert "usfmae_lib.preprocess" in graph["usfmae_lib.reconstruction"]  # a subpackage's __init__.py
    assert "usfmae_lib.preprocess.detectors" in graph["usfmae_lib.preprocess"]
    assert "usfmae_lib.preprocess" not in graph["usfmae_lib.preprocess.batch"]  # its own package: run already


def test_the_reader_finds_private_names(tmp_path):
    """Private names from another module, by import or as an attribute, in any scope; a local
    variable that shadows a module's name is no module."""
    source = (
        "from usfmae_lib import mae\n"
        "from usfmae_lib.mae import _one, public\n"
        "import usfmae_lib.store\n"
        "def f(mae=None):\n"
        "    return mae._not_a_module\n"  # an argument hides the module
        "def g():\n"
        "    from usfmae_lib import runner as r\n"
        "    r._two()\n"
        "    usfmae_lib.store._three\n"
        "    return mae.__name__, mae._four\n"
    )
    path = tmp_path / "nb.py"
    path.write_text(source)
    found = [(u.module, u.name, u.line) for u in read(path).uses]
    assert sorted(found) == [("usfmae_lib.mae", "_four", 10), ("usfmae_lib.mae", "_one", 2),
                             ("usfmae_lib.runner", "_two", 8), ("usfmae_lib.store", "_three", 9)]


def test_runner_and_study_import_each_other_no_more():
    graph = import_graph()
    assert "usfmae_lib.runner" not in graph["usfmae_lib.study"]
    assert "usfmae_lib.runner" not in graph["usfmae_lib.parameters"]
    assert "usfmae_lib.study" not in graph["usfmae_lib.parameters"]
    assert set(graph["usfmae_lib.parameters"]) <= {"usfmae_lib"}  # light: notebooks import it through study


@pytest.mark.parametrize("module", sorted(FILES))
def test_no_import_cycle(module):
    graph = import_graph()
    for component in cycles(graph):
        assert module not in component, describe(component, graph)


def _private_uses(path: Path) -> list[str]:
    reader = READERS.get(_module_name(path)) if path.is_relative_to(ROOT / PACKAGE) else read(path)
    return [f"{_rel(path)}:{u.line}: {u.module}.{u.name}" for u in reader.uses]


@pytest.mark.parametrize("file", [_rel(p) for p in FILES.values()])
def test_no_private_name_from_another_module(file):
    uses = _private_uses(ROOT / file)
    assert not uses, "private names of other modules (make them public there):\n" + "\n".join(uses)


@pytest.mark.parametrize("file", [_rel(p) for p in NOTEBOOKS])
def test_notebooks_use_no_private_name_of_the_library(file):
    uses = _private_uses(ROOT / file)
    assert not uses, "private names of usfmae_lib modules (make them public there):\n" + "\n".join(uses)
