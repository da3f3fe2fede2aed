"""Reward functions run in a child process, so a call that overruns its timeout can be stopped.

A thread cannot be stopped from outside in Python, and a timeout that waits in another thread
never even runs while the function holds the GIL in C code (a regular expression backtracking
catastrophically). A process can always be killed: `FunctionProcess` keeps one child running
the configured functions, sends it one call at a time over a pipe, and on a timeout kills it
and starts a fresh one for the next call.

Both the child (`_serve`) and the parent's side live here, so the protocol is read in one
place. It runs over two pipes of its own, not the child's stdin/stdout, so nothing a user
function or the interpreter's start-up prints can reach it. What the child prints goes
through `OutputLimit` to the worker's stderr. Messages, each one pickled
``multiprocessing`` frame:

- parent -> child, once: ``(sys_path, function_specs)``; child -> parent: ``("ready",)`` or
  ``("failed", message)`` when a spec does not resolve;
- parent -> child, per call: ``(function_index, (prompt, response, answer))``; child -> parent:
  an `Outcome` tuple (see `run_call`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import numbers
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

Outcome = tuple
"""What one call came to: ``("value", float)``, ``("not_a_number", type_name)``,
``("raised", type_name, message)``, ``("timed_out",)``, ``("crashed", exit_code)`` (negative:
killed by that signal) or ``("not_started", message)`` (a replacement child failed to start)."""

log = logging.getLogger("rlrelay")

START_TIMEOUT_S = 120.0
"""Limit on the first start of the child (interpreter, then the user modules' imports)."""
RESTART_TIMEOUT_S = 30.0
"""Limit on starting a replacement after a timeout or a crash; the driver's wait on a batch
allows it once per call."""
REAP_TIMEOUT_S = 10.0
"""How long a killed child is waited for (a process in uninterruptible sleep outlives SIGKILL)."""
SHOWN_LINES = 20
"""Lines of reward-function output a worker passes on; the rest are only counted."""
NOTE_EVERY_S = 60.0
"""Least time between two notes counting the lines not shown."""
_MAX_LINE = 65536
"""Longer lines are read (and counted) in pieces of this many bytes, so memory stays bounded."""

# The package root goes first on the child's path, so a user module named `reward` in the
# working directory cannot stand in for ours; then the child takes the parent's sys.path.
_BOOT = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
         "from reward.isolated import _serve; _serve(*map(int, sys.argv[1:]))")


def _numpy_scalar(value) -> bool:
    """A numpy bool, int or float scalar (``np.bool_`` is no ``numbers.Real``, unlike a Python
    bool); checked without importing numpy."""
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 \
        and getattr(getattr(value, "dtype", None), "kind", "") in ("b", "i", "u", "f")


def run_call(fn: Callable, args: tuple) -> Outcome:
    """Call ``fn(*args)`` and classify the result; shared by the thread and the process path so
    both report the same outcomes. Only a float crosses the pipe, never a user object."""
    try:
        value = fn(*args)
        if not (isinstance(value, numbers.Real) or _numpy_scalar(value)):
            return ("not_a_number", type(value).__name__)
        return ("value", float(value))  # a Real's own __float__ is user code too
    except BaseException as err:  # noqa: BLE001 - whatever user code raised fails one sample
        try:
            message = str(err)
        except BaseException:  # noqa: BLE001 - an exception whose __str__ raises as well
            message = "<unprintable>"
        return ("raised", type(err).__name__, message)


class OutputLimit:
    """Passes on the first ``shown`` lines of output, then counts the rest and says how many at
    most once every ``note_every_s`` seconds (and on `flush`). A ``print`` in a reward function
    runs for every sample, and Ray forwards a worker's output to the driver's console, where
    thousands of lines a step would bury the run's own messages. Thread-safe: the output of a
    replacement child may arrive while its predecessor's last lines are still being relayed.

    Example::

        limit = OutputLimit(shown=1, note_every_s=60.0)
        limit.feed(b"a\n", now=0.0)   # -> [b"a\n"]
        limit.feed(b"b\n", now=1.0)   # -> [b"rlrelay: reward functions printed more than 1 line(s) ..."]
        limit.feed(b"c\n", now=61.0)  # -> [b"rlrelay: reward functions printed 2 more line(s), not shown\n"]
    """

    def __init__(self, *, shown: int = SHOWN_LINES, note_every_s: float = NOTE_EVERY_S) -> None:
        self.shown = shown
        self.note_every_s = note_every_s
        self._passed = 0
        self._pending = 0
        """Lines not shown since the last note."""
        self._last_note: float | None = None
        self._lock = threading.Lock()

    def feed(self, line: bytes, now: float) -> list[bytes]:
        """What to write for one more line of output, printed at time ``now`` (seconds)."""
        with self._lock:
            if self._passed < self.shown:
                self._passed += 1
                return [line]
            self._pending += 1
            if self._last_note is None:
                self._last_note = now
                return [f"rlrelay: reward functions printed more than {self.shown} line(s) in this worker; "
                        f"the rest are counted, not shown\n".encode()]
            if now - self._last_note >= self.note_every_s:
                self._last_note = now
                return self._count()
            return []

    def flush(self) -> list[bytes]:
        """The count of lines not shown since the last note, if any."""
        with self._lock:
            return self._count() if self._pending else []

    def _count(self) -> list[bytes]:
        pending, self._pending = self._pending, 0
        return [f"rlrelay: reward functions printed {pending} more line(s), not shown\n".encode()]


def _relay(pipe, limit: OutputLimit) -> None:
    """Copy a child's output to this process's stderr (the worker's Ray log) through ``limit``,
    until every writer of the pipe is gone. Holds no reference to the `FunctionProcess`, so a
    dropped handle is still collected (and its child killed)."""
    writable = True
    with pipe:
        # Drained to the end even when stderr takes no more: a relay that stopped would close
        # the pipe, and the child's next print would fail the call it is in.
        while line := pipe.readline(_MAX_LINE):
            for text in limit.feed(line, time.monotonic()):
                writable = writable and _write_stderr(text)
    for text in limit.flush():
        writable = writable and _write_stderr(text)


def _write_stderr(data: bytes) -> bool:
    """Write to the file descriptor, where the child's output went when it inherited it;
    False when stderr takes no more (its reader is gone, a full disk), and the output is dropped."""
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        return False
    return True


class FunctionProcess:
    """The parent's handle on a child process running the given reward functions.

    Example::

        functions = FunctionProcess(["exact_match", "my_rewards:score"])
        functions.call(1, ("12+30=", "42", "42"), timeout_s=5.0)   # -> ("value", 1.0)
    """

    def __init__(self, specs: Sequence[str], *, start_timeout_s: float = START_TIMEOUT_S) -> None:
        self._specs = list(specs)
        self._proc: subprocess.Popen | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._stop = None
        self._relay: threading.Thread | None = None
        self._output = OutputLimit()
        """Shared by the successive children: a restart does not show the first lines again."""
        self.starts = 0
        """Child processes started so far (1 + the restarts after timeouts and crashes)."""
        self._start(start_timeout_s)

    def _start(self, timeout_s: float) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        try:
            # A session of its own: on a kill, the whole group goes, with anything the user
            # function forked. Its stdout and stderr come to us, to be relayed to the worker's
            # log through the output limit; unbuffered (-u), so what it printed just before a
            # timeout's kill is not lost in its buffer.
            self._proc = _spawn([sys.executable, "-u", "-c", _BOOT, str(to_child_r), str(from_child_w),
                                 str(os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                pass_fds=(to_child_r, from_child_w), start_new_session=True)
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.starts += 1
        self._relay = threading.Thread(target=_relay, args=(self._proc.stdout, self._output),
                                       name="reward-output", daemon=True)
        self._relay.start()
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        # Also when the worker drops us without close(): no child outlives its handle.
        self._stop = weakref.finalize(self, _stop_child, self._proc, self._to_child, self._from_child)
        reply = self._exchange(([p for p in sys.path if isinstance(p, str)], self._specs), timeout_s)
        if reply[0] == "ready":
            return
        self.close()
        if reply[0] == "failed":
            raise ValueError(reply[1])
        if reply[0] == "timed_out":
            raise RuntimeError(f"the reward-function process did not start within {timeout_s:g} s")
        raise RuntimeError(f"the reward-function process {describe_exit(reply[1])} while starting")

    def call(self, index: int, args: tuple, timeout_s: float) -> Outcome:
        """Run function ``index`` on ``args`` in the child; a call that overruns or kills the
        child comes back as ``("timed_out",)`` or ``("crashed", code)``, and the next call gets
        a fresh child."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()  # gone since the last call (a timeout, or killed from outside)
            try:
                self._start(RESTART_TIMEOUT_S)
            except (ValueError, RuntimeError) as err:
                return ("not_started", str(err))
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
        except (EOFError, OSError):  # the child is ending: a broken pipe or a closed one
            proc = self._proc
            try:
                proc.wait(timeout=10.0)  # its own exit code, not our kill's
            except subprocess.TimeoutExpired:  # closed the pipe yet lives on: killed below
                pass
            self.close()
            return ("crashed", proc.returncode)
        except BaseException:
            # Interrupted between send and recv (KeyboardInterrupt, MemoryError): the reply
            # would be read as the next call's. This child is done.
            self.close()
            raise

    def close(self) -> None:
        """Kill the child (it may be stuck in user code) and release the pipes."""
        if self._stop is not None:
            self._stop()
        if self._relay is not None:
            # The group is dead, so the pipe ends at once; unless something the function started
            # left the session and holds it, which is not worth more than a second's wait.
            self._relay.join(timeout=1.0)
        self._proc = self._to_child = self._from_child = self._stop = self._relay = None


def describe_exit(code: int) -> str:
    """``exited with code 7`` or ``was killed by signal 9`` (Popen's negative codes)."""
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _stop_child(proc: subprocess.Popen, *connections: Connection) -> None:
    # The group outlives a reaped leader while anything it forked lives, and Linux does not
    # hand out its number meanwhile, so this never reaches another process's group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.kill()
    try:
        proc.wait(timeout=REAP_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # in uninterruptible I/O (a hung network mount): it dies when that ends
        log.warning("reward function process %d still runs %.0f s after SIGKILL; left behind", proc.pid,
                    REAP_TIMEOUT_S)
    for conn in connections:
        conn.close()


_spawner: tuple[int, queue.SimpleQueue] | None = None
_spawner_lock = threading.Lock()


def _spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` from one long-lived thread of this process. Linux sends the
    parent-death signal when the *thread* that started the child exits, and a caller's thread
    (a Ray actor's task thread, a test's) may exit while the child serves on."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner[0] != os.getpid():  # none yet, or we are a fork
            _spawner = (os.getpid(), queue.SimpleQueue())
            threading.Thread(target=_spawn_loop, args=(_spawner[1],), name="reward-spawner", daemon=True).start()
        requests = _spawner[1]
    future: concurrent.futures.Future = concurrent.futures.Future()
    requests.put((future, args, kwargs))
    return future.result()


def _spawn_loop(requests: queue.SimpleQueue) -> None:
    while True:
        future, args, kwargs = requests.get()
        try:
            future.set_result(subprocess.Popen(args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - the caller raises it
            future.set_exception(err)


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux kill this process when the reward worker exits, even mid-call in user code
    (which would never read the end of its input). Elsewhere, the closed pipe ends it between calls."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent was gone before the line above took effect
        os._exit(0)


def _serve(in_fd: int, out_fd: int, parent_pid: int) -> None:
    from reward.rules import resolve_reward_function

    _die_with_parent(parent_pid)
    from_parent = Connection(in_fd, writable=False)
    to_parent = Connection(out_fd, readable=False)
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

