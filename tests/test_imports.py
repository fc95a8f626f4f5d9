"""The package's import graph: no circle, and no module importing a layer above its own.

docs/architecture.md's rule: `options` at the very bottom; `devices`, `slicing`, `_compat`;
then `trainer`, `comm`, `cluster`, `batchnorm`, `distill`; then `parallel` and `split`;
then `tools` (and the package's public API, which only tools may import back). Nothing
in the library imports `zoo`. Imports are read with `ast` from the source, wherever they
are (module level or inside a function: a lazy import is still an import).
"""

import ast
import os
import resource
import subprocess
import sys

import pytest

import kerasmgpu

PACKAGE_DIR = os.path.dirname(os.path.abspath(kerasmgpu.__file__))
ROOT = os.path.dirname(PACKAGE_DIR)

# The first part of a module's name after "kerasmgpu." -> its layer (higher is above).
LAYERS = {
    "options": 0,
    "_compat": 1, "devices": 1, "slicing": 1,
    "trainer": 2, "comm": 2, "cluster": 2, "batchnorm": 2, "distill": 2,
    "custom_steps": 2,  # a template's own step, its model calls sliced (issue #20)
    "tower": 2,  # one replica program (issue #21), beside the trainer
    "parallel": 3, "split": 3,
    "pool": 3,  # many models at once (issue #24), beside parallel
    "tools": 4, "bench": 4, "__main__": 4,
}
API_LAYER = 4  # `import kerasmgpu` itself: the public API, above the library


def _module_name(path):
    relative = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    if relative[-1] == "__init__":
        relative = relative[:-1]
    return ".".join(relative)


def _is_module(name):
    path = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _imports(path, name):
    """The kerasmgpu (and zoo) modules a file imports, each once."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return {m for m in found if m.split(".")[0] in ("kerasmgpu", "zoo")}


def _graph():
    graph = {}
    for directory, _, files in os.walk(PACKAGE_DIR):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                name = _module_name(path)
                graph[name] = _imports(path, name) - {name}
    return graph


def _layer(name):
    parts = name.split(".")
    return API_LAYER if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    unplaced = sorted(
        name for name in _graph() if name != "kerasmgpu" and name.split(".")[1] not in LAYERS
    )
    assert not unplaced, f"add these to LAYERS and docs/architecture.md: {unplaced}"


def test_no_module_imports_a_layer_above_its_own_or_the_zoo():
    upward = []
    for name, imported in _graph().items():
        if name == "kerasmgpu":
            continue  # the public API re-exports from every layer
        for target in imported:
            if target.split(".")[0] == "zoo" or _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports against docs/architecture.md's order:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    graph = _graph()
    # A submodule import also runs its packages' __init__: those are edges too, except
    # to the top package, whose names are loaded lazily.
    edges = {
        name: {
            ".".join(target.split(".")[:i])
            for target in targets for i in range(2, len(target.split(".")) + 1)
        } & set(graph)
        for name, targets in graph.items() if name != "kerasmgpu"
    }
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if target == node or target.startswith(node + "."):
                continue  # a package importing its own submodules
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_graph_check_sees_an_upward_import(tmp_path):
    # The check can fail: a library module importing tools is reported.
    path = tmp_path / "kerasmgpu" / "devices.py"
    path.parent.mkdir()
    path.write_text("from kerasmgpu.tools import cli\nimport zoo\n")
    assert _imports(str(path), "kerasmgpu.devices") == {"kerasmgpu.tools.cli", "zoo"}
    assert _layer("kerasmgpu.tools.cli") > _layer("kerasmgpu.devices")


CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "kerasmgpu")


def _timed(command, environment):
    """Run `command`; return the result and the CPU seconds it used (user + system).

    CPU time, not wall time: on this shared 2-core machine the wall time of the same
    command varies several-fold with the load, its CPU time hardly.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.parametrize("args", [("--help",), ("bench", "--help"), ("launch", "--help"),
                                  ("predict-scaling", "--help")])
def test_command_line_help_answers_at_once_without_tensorflow(args, tmp_path):
    # KERASMGPU_SIMULATED_DEVICES is set (as on a CPU box): the command still parses its
    # arguments before any TensorFlow import.
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    environment.update(PYTHONPATH=ROOT, KERASMGPU_SIMULATED_DEVICES="2")
    # What `python -m kerasmgpu ...` loaded, reported at exit by a sitecustomize hook.
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, sys\n"
        "atexit.register(lambda: print('LOADED', sorted(m for m in ('tensorflow', 'keras', "
        "'jax') if m in sys.modules), file=sys.stderr))\n"
    )
    watched, _ = _timed([sys.executable, "-m", "kerasmgpu", *args],
                        dict(environment, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert "LOADED []" in watched.stderr.splitlines(), watched.stderr[-2000:]

    _, baseline = _timed([sys.executable, "-c", "pass"], environment)
    command = [CONSOLE_SCRIPT] if os.path.exists(CONSOLE_SCRIPT) else [
        sys.executable, "-m", "kerasmgpu"]
    result, seconds = _timed([*command, *args], environment)
    assert "usage: kerasmgpu" in result.stdout, result.stderr[-2000:]
    assert result.stderr == "", result.stderr[-2000:]  # no TensorFlow or absl lines
    # Beyond the interpreter's own start-up (measured now); importing TensorFlow alone
    # takes 3-9 s of CPU on this machine.
    assert seconds - baseline < 1.0, f"{' '.join(args)}: {seconds:.2f} s ({baseline:.2f} s bare)"
