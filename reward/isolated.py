"""Reward functions run in a child process, so a call that overruns its timeout can be stopped.

A thread cannot be stopped from outside in Python, and a timeout that waits in another thread
never even runs while the function holds the GIL in C code (a regular expression backtracking
catastrophically). A process can always be killed: `FunctionProcess` keeps one child running
the configured functions, sends it one call at a time over a pipe, and on a timeout kills it
and starts a fresh one for the next call.

Both the child (``python -m reward.isolated``) and the parent's side live here, so the
protocol is read in one place. Messages, each one pickled ``multiprocessing`` frame:

- parent -> child, once: ``(sys_path, function_specs)``; child -> parent: ``("ready",)`` or
  ``("failed", message)`` when a spec does not resolve;
- parent -> child, per call: ``(function_index, (prompt, response, answer))``; child -> parent:
  an `Outcome` tuple (see `run_call`).
"""

from __future__ import annotations

import ctypes
import numbers
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

Outcome = tuple
"""What one call came to: ``("value", float)``, ``("not_a_number", type_name)``,
``("raised", type_name, message)``, ``("timed_out",)`` or ``("crashed", exit_code)``."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def run_call(fn: Callable, args: tuple) -> Outcome:
    """Call ``fn(*args)`` and classify the result; shared by the thread and the process path so
    both report the same outcomes. Only a float crosses the pipe, never a user object."""
    try:
        value = fn(*args)
        if not isinstance(value, numbers.Real):
            return ("not_a_number", type(value).__name__)
        return ("value", float(value))  # a Real's own __float__ is user code too
    except BaseException as err:  # noqa: BLE001 - whatever user code raised fails one sample
        try:
            message = str(err)
        except BaseException:  # noqa: BLE001 - an exception whose __str__ raises as well
            message = "<unprintable>"
        return ("raised", type(err).__name__, message)


class FunctionProcess:
    """The parent's handle on a child process running the given reward functions.

    Example::

        functions = FunctionProcess(["exact_match", "my_rewards:score"])
        functions.call(1, ("12+30=", "42", "42"), timeout_s=5.0)   # -> ("value", 1.0)
    """

    def __init__(self, specs: Sequence[str], *, start_timeout_s: float = 120.0) -> None:
        self._specs = list(specs)
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self.starts = 0
        """Child processes started so far (1 + the restarts after timeouts and crashes)."""
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        # Only to find `reward.isolated` itself; the child then takes the parent's sys.path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "reward.isolated", str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.starts += 1
        # Connection objects own their descriptor, so give them copies and drop Popen's.
        self._to_child = Connection(os.dup(self._proc.stdin.fileno()), readable=False)
        self._from_child = Connection(os.dup(self._proc.stdout.fileno()), writable=False)
        self._proc.stdin.close()
        self._proc.stdout.close()
        reply = self._exchange(([p for p in sys.path if isinstance(p, str)], self._specs), self._start_timeout_s)
        if reply[0] == "failed":
            self.close()
            raise ValueError(reply[1])
        if reply[0] != "ready":
            self.close()
            what = "did not start" if reply[0] == "timed_out" else f"exited with code {reply[1]} while starting"
            raise RuntimeError(f"the reward-function process {what} (within {self._start_timeout_s:g} s)")

    def call(self, index: int, args: tuple, timeout_s: float) -> Outcome:
        """Run function ``index`` on ``args`` in the child; a call that overruns or kills the
        child comes back as ``("timed_out",)`` or ``("crashed", code)``, and the next call gets
        a fresh child."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()  # died between calls (killed from outside): not this sample's fault
            self._start()
        outcome = self._exchange((index, args), timeout_s)
        if outcome[0] in ("timed_out", "crashed"):
            self.close()
        return outcome

    def _exchange(self, message: object, timeout_s: float) -> Outcome:
        try:
            self._to_child.send(message)
            if not self._from_child.poll(timeout_s):
                return ("timed_out",)
            return self._from_child.recv()
        except (EOFError, OSError):  # the child died: a broken pipe or a closed one
            self._proc.kill()
            return ("crashed", self._proc.wait())

    def close(self) -> None:
        """Kill the child (it may be stuck in user code) and release the pipes."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        for conn in (self._to_child, self._from_child):
            if conn is not None:
                conn.close()
        self._to_child = self._from_child = None


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux kill this process when the reward worker exits, even mid-call in user code
    (which would never read the end of its input). Elsewhere, the closed pipe ends it between calls."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent was gone before the line above took effect
        os._exit(0)


def _serve(parent_pid: int) -> None:
    from reward.rules import resolve_reward_function

    _die_with_parent(parent_pid)
    # The protocol keeps the original stdin/stdout; a user function's print() goes to stderr
    # (the worker's log) instead of corrupting it.
    from_parent = Connection(os.dup(0), writable=False)
    to_parent = Connection(os.dup(1), readable=False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)

    sys_path, specs = from_parent.recv()
    sys.path[:] = sys_path
    try:
        functions = [resolve_reward_function(spec) for spec in specs]
    except ValueError as err:
        to_parent.send(("failed", str(err)))
        return
    to_parent.send(("ready",))
    while True:
        try:
            index, args = from_parent.recv()
        except EOFError:  # the worker closed the pipe: it is done with us
            return
        to_parent.send(run_call(functions[index], args))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
