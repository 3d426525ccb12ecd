"""The module layout the README promises: no import cycle among the project's modules, no library module
importing the benchmarks or train_gpt.py, and run logs that carry every module train_gpt.py imports."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def project_imports(module: str) -> set:
    """The project modules (and the bench package) that module imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py")).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name.split(".")[0] for name in names if name.split(".")[0] in MODULES + ["bench"]}


def test_no_import_cycles():
    graph = {module: project_imports(module) - {"bench"} for module in MODULES}
    state = {}  # module -> "open" while its imports are walked, "done" after

    def walk(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if state.get(module) is None:
            state[module] = "open"
            for imported in sorted(graph[module]):
                walk(imported, path + [module])
            state[module] = "done"

    for module in MODULES:
        walk(module, [])
    assert graph["train_gpt"] >= {"generate", "gpt2_data", "parallax_kernels", "safeguards"}  # real edges


def test_library_modules_do_not_import_the_benchmarks():
    assert [module for module in MODULES if "bench" in project_imports(module)] == []


def test_library_modules_do_not_import_train_gpt():
    """train_gpt.py sits on top: what the modules below it need of it (the model) they take as an argument."""
    assert [module for module in MODULES if "train_gpt" in project_imports(module)] == []


def test_logs_carry_every_project_module_train_gpt_imports():
    """A run's log carries the code it ran: every project module train_gpt.py imports is in LOGGED_SOURCES."""
    import train_gpt

    imported = project_imports("train_gpt")
    assert {"muon", "safeguards", "generate", "gpt2_data", "parallax_kernels"} <= imported
    assert {f"{name}.py" for name in imported} <= set(train_gpt.LOGGED_SOURCES)
