"""The `kerasmgpu` command line: one subcommand per module.

Each command module exposes `add_parser(subparsers)`, which adds its subparser and sets
`run=<function taking the parsed args>` as a default. `main` builds the parser from the
modules listed in `COMMAND_MODULES`, imported only when the parser is built, so adding a
command is one line here and one function in its module.

Errors in what the user asked for (a flag value, a model name, a device count) are raised
as `UsageError` and reported as `kerasmgpu <command>: error: ...` with exit status 2, the
way argparse reports a malformed flag.
"""

import argparse
import importlib
import os
import sys
import tempfile

from kerasmgpu.options import UsageError

COMMAND_MODULES = (
    "kerasmgpu.tools.bench",
    "kerasmgpu.tools.predict_scaling",
    "kerasmgpu.cluster.launch",
)


def build_parser():
    """The `kerasmgpu` argument parser with every command module's subcommand.

    Returns:
        An `argparse.ArgumentParser`.

    Example:

    ```python
    args = build_parser().parse_args(["bench", "--devices", "1,2"])
    ```
    """
    parser = argparse.ArgumentParser(
        prog="kerasmgpu",
        description="kerasmgpu: multi_gpu_model for Keras 3 (benchmarks and tools).",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="show TensorFlow's own log lines (hidden by default)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None):
    """Run the `kerasmgpu` command line.

    Args:
        argv: the arguments (without the program name); default `sys.argv[1:]`.

    Returns:
        The exit status (0 on success). Usage errors exit with status 2 through
        `SystemExit`, as argparse does.

    Example:

    ```python
    from kerasmgpu.tools import cli
    cli.main(["bench", "--devices", "1,2", "--steps", "5"])
    ```
    """
    # Nothing here imports TensorFlow: `--help` and usage errors answer at once.
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    run = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    if not args.verbose:
        quiet_tensorflow()
        if getattr(args, "uses_tensorflow", False):
            start_tensorflow_quietly()
    try:
        return run(args) or 0
    except UsageError as error:
        args.command_parser.error(str(error))


def quiet_tensorflow():
    """Keep TensorFlow's start-up lines (CUDA, oneDNN, absl) out of a command's output.

    Why here: they are printed when TensorFlow is first imported, which a command does
    only once its arguments are parsed; `-v` keeps them. A level the user set is kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")


def start_tensorflow_quietly():
    """Import TensorFlow and find its devices with the process's standard error set aside.

    Why: TensorFlow's C++ start-up lines (CUDA stubs, cuInit, absl's "All log messages
    before absl::InitializeLog()") are written to file descriptor 2 before any log level
    applies. They are kept in a temporary file and shown only if starting fails. Only
    commands that run TensorFlow in this process call it (`uses_tensorflow=True`).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as aside:
        os.dup2(aside.fileno(), 2)
        try:
            import tensorflow as tf

            import kerasmgpu

            # The simulated devices and cluster the environment asks for, before the
            # command's first tensor fixes TensorFlow's devices (the package defers this
            # in the command-line process, so that --help never starts TensorFlow).
            kerasmgpu._apply_environment()
            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            aside.seek(0)
            sys.stderr.write(aside.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


if __name__ == "__main__":
    sys.exit(main())
