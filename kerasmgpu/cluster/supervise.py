"""Supervising the worker processes of `kerasmgpu launch`: start, stream, stop, restart.

Each worker's standard output and error are copied line by line, prefixed
`[worker i] `, by one thread per pipe, whole lines at a time. When a worker fails, the
others get a grace period to finish (their collectives normally time out and fail on
their own), then are stopped: SIGTERM to the worker's process group, then SIGKILL after
`STOP_TIMEOUT_SECONDS`. Ctrl-C or SIGTERM to the launcher stops every worker the same way.

With restarts left (`--max-restarts`), a failure stops the other workers at once (without
the failed one they can only wait for it) and `run_with_restarts` starts them all again;
each restart is logged with its cause, and giving up names the last failure.
"""

import os
import signal
import subprocess
import threading
import time

STOP_TIMEOUT_SECONDS = 5.0  # between SIGTERM and SIGKILL
_POLL_SECONDS = 0.05
_READER_JOIN_SECONDS = 2.0


class Output:
    """Writes whole lines to the two streams, one writer at a time."""

    def __init__(self, stream, error_stream):
        self.stream = stream
        self.error_stream = error_stream
        self._lock = threading.Lock()

    def write(self, target, text):
        with self._lock:
            try:
                target.write(text)
                target.flush()
            except (OSError, ValueError):
                # A closed or broken stream (e.g. output piped to `head`) must not stop the
                # readers: the workers would block on a full pipe.
                pass

    def note(self, message):
        self.write(self.error_stream, f"kerasmgpu launch: {message}\n")


class Worker:
    """One worker process and the threads copying its output."""

    def __init__(self, index, process, readers):
        self.index = index
        self.process = process
        self.readers = readers

    @classmethod
    def start(cls, index, command, env, output):
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Its own process group: stopping the worker also stops what it started, and
            # Ctrl-C at the terminal reaches only the launcher, which stops workers in order.
            start_new_session=True,
        )
        prefix = f"[worker {index}] "
        readers = [
            threading.Thread(target=_copy_lines, args=(pipe, prefix, target, output),
                             name=f"worker-{index}-{name}", daemon=True)
            for pipe, target, name in ((process.stdout, output.stream, "stdout"),
                                       (process.stderr, output.error_stream, "stderr"))
        ]
        for reader in readers:
            reader.start()
        return cls(index, process, readers)

    def running(self):
        return self.process.poll() is None

    def signal(self, signum):
        if not self.running():
            return
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.process.pid, signum)
            else:
                self.process.send_signal(signum)
        except ProcessLookupError:
            pass

    def join_readers(self):
        # A grandchild that outlives the worker may keep its pipes open: do not wait on it.
        for reader in self.readers:
            reader.join(_READER_JOIN_SECONDS)


def _copy_lines(pipe, prefix, target, output):
    with pipe:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", errors="replace")
            if not text.endswith("\n"):
                text += "\n"
            output.write(target, prefix + text)


def run_with_restarts(start, max_restarts, grace_seconds, output, hint=None,
                      before_restart=None):
    """Run the workers `start` starts; after a failure, stop them all and start again.

    Args:
        start: `start(restart)` starts every worker (`restart` counts from 0) and returns
            the list of `Worker`s.
        max_restarts: how many times to start again after a failure (0: never).
        grace_seconds: once no restart is left, how long the other workers may run after
            the first failure.
        output: the `Output` for the launcher's messages.
        hint: a line to add when giving up.
        before_restart: called with no argument once this node's workers are stopped,
            before they start again (on several nodes: wait for the others' to stop).

    Returns:
        0 once every worker exits 0; else the exit status of the last failure
        (see `exit_status`).
    """
    restart = 0
    while True:
        workers = start(restart)
        restarting = restart < max_restarts
        failure = watch(workers, 0.0 if restarting else grace_seconds, output,
                        restarting=restarting)
        for worker in workers:
            worker.join_readers()
        if failure is None:
            return 0
        code = failure.process.returncode
        if not restarting:
            break
        restart += 1
        output.note(f"restart {restart} of {max_restarts}: worker {failure.index} "
                    f"{describe_exit(code)}; starting every worker again (training "
                    "resumes from the last keras.callbacks.BackupAndRestore backup)")
        if before_restart is not None:
            before_restart()
    after = f" after {max_restarts} restart(s)" if max_restarts else ""
    output.note(f"failed{after}: worker {failure.index} {describe_exit(code)}")
    if hint:
        output.note(hint)
    return exit_status(code)


def watch(workers, grace_seconds, output, restarting=False):
    """Wait for the workers; after the first failure, stop the rest once the grace is over.

    Args:
        workers: the `Worker`s.
        grace_seconds: how long the others may run on after the first failure.
        output: where the messages go.
        restarting: the workers will be started again: say so rather than count the grace.

    Returns:
        The first worker that failed, or None when every worker exited 0.
    """
    first_failure = None
    deadline = None
    reported = set()
    while True:
        for worker in workers:
            code = worker.process.poll()
            if code is None or code == 0 or worker.index in reported:
                continue
            reported.add(worker.index)
            if first_failure is None:
                first_failure = worker
                deadline = time.monotonic() + grace_seconds
                others = [w for w in workers if w.running()]
                if restarting:
                    wait = "; stopping the other workers to start again" if others else ""
                else:
                    wait = (f"; the other workers have {grace_seconds:g} s to finish"
                            if others else "")
                output.note(f"worker {worker.index} {describe_exit(code)}{wait}")
            else:
                output.note(f"worker {worker.index} {describe_exit(code)}")
        running = [worker for worker in workers if worker.running()]
        if not running:
            break
        if deadline is not None and time.monotonic() >= deadline:
            if not restarting:
                names = ", ".join(str(worker.index) for worker in running)
                output.note(
                    f"stopping worker(s) {names}: still running {grace_seconds:g} s after "
                    f"worker {first_failure.index} failed"
                )
            stop(running)
            break
        time.sleep(_POLL_SECONDS)
    return first_failure


def exit_status(code):
    """A process's exit status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - code if code < 0 else code


def describe_exit(code):
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


def stop(workers, timeout=STOP_TIMEOUT_SECONDS):
    """SIGTERM the workers, then SIGKILL those still running after `timeout` seconds."""
    for worker in workers:
        worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for worker in workers:
        if worker.running():
            worker.signal(signal.SIGKILL)
            worker.process.wait()


class Terminated(Exception):
    """The launcher received SIGTERM (or SIGHUP)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


_HANDLED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def catch_termination():
    """Turn SIGTERM/SIGHUP into an exception (SIGINT already is one). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {signum: signal.getsignal(signum)
                for signum in (signal.SIGINT, *_HANDLED_SIGNALS)}
    for signum in _HANDLED_SIGNALS:
        signal.signal(signum, _raise_terminated)
    return previous


def ignore_termination():
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, *_HANDLED_SIGNALS):
            signal.signal(signum, signal.SIG_IGN)


def restore_handlers(previous):
    if previous is None:
        return
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


