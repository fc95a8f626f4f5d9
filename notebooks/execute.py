"""Run the notebooks top to bottom and save them with their outputs.

The committed notebooks carry the outputs of a full-setting run, so a reader sees the tables
and plots without running anything. This script makes that run: it executes each notebook in
a fresh `python3` kernel, in this directory, with `KERASMGPU_NOTEBOOK_QUICK` removed from the
environment (the full setting), and writes the outputs back into the file. A failing cell
stops the run and leaves that notebook unchanged.

CI does not use this script: it runs the notebooks without saving them, in the quick setting,
through pytest and nbmake (`KERASMGPU_NOTEBOOK_QUICK=1 python -m pytest --nbmake notebooks`).

Usage:

```
python notebooks/execute.py                      # every notebook, full setting
python notebooks/execute.py 02_cifar10_convnet   # only the notebooks whose names match
python notebooks/execute.py --quick --dry-run    # quick setting, outputs not saved
```
"""

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent
QUICK_VARIABLE = "KERASMGPU_NOTEBOOK_QUICK"
MAX_BYTES = 1_000_000
CELL_TIMEOUT_SECONDS = 1800


def notebooks(patterns):
    """The notebooks in this directory whose names contain one of `patterns` (all if none)."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9]*.ipynb"))
    selected = [path for path in found if not patterns or any(p in path.name for p in patterns)]
    if not selected:
        names = ", ".join(path.name for path in found)
        raise SystemExit(f"No notebook matches {patterns}. Notebooks: {names}")
    return selected


def execute(path, quick=False, save=True):
    """Execute one notebook in a fresh kernel; write its outputs back unless `save` is False.

    Returns:
        The seconds the run took.
    """
    notebook = nbformat.read(path, as_version=4)
    # The kernel inherits this process's environment.
    if quick:
        os.environ[QUICK_VARIABLE] = "1"
    else:
        os.environ.pop(QUICK_VARIABLE, None)
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_SECONDS, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}, record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if save:
        nbformat.write(notebook, path)
        size = path.stat().st_size
        if size > MAX_BYTES:
            print(f"warning: {path.name} is {size / 1e6:.2f} MB (more than 1 MB)", file=sys.stderr)
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose names contain these")
    parser.add_argument("--quick", action="store_true",
                        help=f"the quick setting ({QUICK_VARIABLE}=1), as in CI")
    parser.add_argument("--dry-run", action="store_true", help="execute without saving")
    args = parser.parse_args(argv)
    for path in notebooks(args.names):
        print(f"{path.name} ...", flush=True)
        seconds = execute(path, quick=args.quick, save=not args.dry_run)
        size = f", {path.stat().st_size / 1e3:.0f} kB" if not args.dry_run else ""
        print(f"{path.name}: {seconds:.0f} s{size}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
