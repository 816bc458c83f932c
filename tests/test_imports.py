"""The package's import graph (#31): no cycle, counting function-local imports; function-local imports of
shapefirst's own modules only in the command line (which keeps `shapefirst --help` from importing torch and
diffusers); world/ imports no test fixtures and no private names."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "shapefirst"
LAZY_OK = {"cli.py"}  # imports what a command needs when it runs: torch and diffusers are heavy


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: set[str] = set()


def _imports(path: Path):
    """(target module, node, inside a function) for every import of a shapefirst module in `path`."""
    tree, name = ast.parse(path.read_text(encoding="utf-8")), _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import world` imports the module shapefirst.world (its parent package is imported first anyway)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for t in names:
            if t.startswith("shapefirst"):
                yield t, node, id(node) in inside


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PKG.rglob("*.py")}
    MODULES.update(files)
    return {m: {t for t, _, _ in _imports(p) if t in files and t != m} for m, p in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_counting_function_local_imports():
    assert _cycles(_graph()) == []


def test_function_local_imports_of_own_modules_only_in_the_cli():
    MODULES.update(_module(p) for p in PKG.rglob("*.py"))
    found = [f"{p.relative_to(PKG)}:{node.lineno} {t}" for p in PKG.rglob("*.py") if p.name not in LAZY_OK
             for t, node, local in _imports(p) if local]
    assert found == [], found


def test_world_imports_no_test_fixtures_and_no_private_names():
    MODULES.update(_module(p) for p in PKG.rglob("*.py"))
    bad = []
    for p in (PKG / "world").rglob("*.py"):
        for t, node, _ in _imports(p):
            private = [a.name for a in getattr(node, "names", []) if a.name.startswith("_")]
            if t.startswith("shapefirst.tiny") or private:
                bad.append(f"{p.name}:{node.lineno} {t} {private}")
    assert bad == [], bad
