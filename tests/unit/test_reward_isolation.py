"""Reward functions in a child process: what only a process can do (kill a call holding the
GIL, survive a function that ends its process) and what it must not change (results, errors)."""

from __future__ import annotations

import gc
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import reward.isolated as isolated
from reward.isolated import SHOWN_LINES, FunctionProcess, OutputLimit, run_call
from reward.types import ScoreRequest
from reward.worker import RewardFunctionSpec, RewardWorker


def requests_for(*responses: str) -> list[ScoreRequest]:
    return [ScoreRequest(prompt="q: ", response=r, answer="42") for r in responses]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child not yet reaped is a zombie: gone for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


def test_a_call_holding_the_gil_is_killed_at_its_timeout(user_rewards):
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:backtrack")], timeout_s=2.0)
    # The regex would run for longer than the universe is old (the test would hang until
    # pytest's timeout); in a thread of this process the timeout could not even be noticed.
    results = worker.score(requests_for("a", "hang", "b"))
    assert [r.reward for r in (results[0], results[2])] == [1.0, 1.0]
    assert results[1].error == f"reward function '{user_rewards}:backtrack' timed out after 2 s"
    assert worker.stats() == {"scored": 2, "failures": 1, "timeouts": 1}
    worker.close()


def test_a_function_that_ends_its_process_fails_only_its_sample(user_rewards):
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:exits")])
    results = worker.score(requests_for("a", "exit", "b"))
    assert [r.reward for r in (results[0], results[2])] == [1.0, 1.0]
    assert math.isnan(results[1].reward)
    assert results[1].error == f"reward function '{user_rewards}:exits' ended its process (it exited with code 7)"
    assert worker.stats()["timeouts"] == 0
    worker.close()


def test_prints_of_a_function_do_not_disturb_the_protocol(user_rewards, capfd):
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:chatty")])
    assert [r.reward for r in worker.score(requests_for("abc", "de"))] == [3.0, 2.0]
    worker.close()
    assert "scoring abc" in capfd.readouterr().err


def test_a_worker_shows_the_first_lines_its_functions_print_and_counts_the_rest(user_rewards, capfd):
    # Ray forwards a worker's output to the driver's console: a print per sample buried it.
    worker = RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:chatty")])
    responses = [f"r{i}" for i in range(SHOWN_LINES + 5)]
    assert [r.reward for r in worker.score(requests_for(*responses))] == [float(len(r)) for r in responses]
    worker.close()
    err = capfd.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("scoring")] == \
        [f"scoring {r}" for r in responses[:SHOWN_LINES]]
    assert f"reward functions printed more than {SHOWN_LINES} line(s) in this worker" in err
    assert "reward functions printed 5 more line(s), not shown" in err  # the count comes at the latest on close


def test_output_limit_passes_the_first_lines_then_counts_at_most_once_per_interval():
    limit = OutputLimit(shown=2, note_every_s=60.0)
    assert limit.feed(b"a\n", now=0.0) == [b"a\n"]
    assert limit.feed(b"b\n", now=0.0) == [b"b\n"]
    assert limit.flush() == []
    assert limit.feed(b"c\n", now=1.0) == [b"rlrelay: reward functions printed more than 2 line(s) in this worker; "
                                           b"the rest are counted, not shown\n"]
    assert limit.feed(b"d\n", now=30.0) == []
    assert limit.feed(b"e\n", now=61.0) == [b"rlrelay: reward functions printed 3 more line(s), not shown\n"]
    assert limit.feed(b"f\n", now=62.0) == []
    assert limit.flush() == [b"rlrelay: reward functions printed 1 more line(s), not shown\n"]
    assert limit.flush() == []


def test_the_output_relay_drains_the_child_when_stderr_takes_no_more(monkeypatch):
    # A relay that raised on a closed stderr closed the child's pipe: every later print of the
    # child failed its call with BrokenPipeError (a printing eval judge then judged nothing).
    tries = []

    def closed_stderr(fd, data):
        if fd != 2:
            return os.write(fd, data)
        tries.append(data)
        raise BrokenPipeError(32, "Broken pipe")

    read, write = os.pipe()
    os.write(write, b"".join(f"line {i}\n".encode() for i in range(5)))
    os.close(write)
    monkeypatch.setattr(isolated.os, "write", closed_stderr)
    isolated._relay(os.fdopen(read, "rb"), OutputLimit(shown=10, note_every_s=60.0))
    assert tries == [b"line 0\n"]  # tried once, then dropped, and the pipe read to its end


def test_a_child_that_outlives_sigkill_is_left_behind_not_waited_for(caplog):
    # A process in uninterruptible sleep (a hung network mount) ignores SIGKILL until its I/O
    # ends; waiting for it without a bound held the worker (or the driver's eval judge) as long.
    class Unkillable:
        pid = 2 ** 22 + 1  # no such process group: killpg finds nothing

        def kill(self):
            pass

        def wait(self, timeout=None):
            assert timeout is not None, "waited without a bound"
            raise subprocess.TimeoutExpired("child", timeout)

    closed = []
    connection = type("Conn", (), {"close": lambda self: closed.append(True)})()
    isolated._stop_child(Unkillable(), connection)
    assert closed == [True]
    assert f"reward function process {Unkillable.pid} still runs 10 s after SIGKILL; left behind" in caplog.text


def test_function_errors_are_those_of_the_thread_path(user_rewards):
    for isolation in ("process", "thread"):
        with pytest.raises(ValueError, match=f"'{user_rewards}:missing'.*has no attribute 'missing'"):
            RewardWorker([RewardFunctionSpec(name=f"{user_rewards}:missing")], isolation=isolation)
    with pytest.raises(ValueError, match="isolation must be one of process, thread, got 'fork'"):
        RewardWorker([RewardFunctionSpec(name="exact_match")], isolation="fork")


def test_a_child_killed_between_calls_is_replaced_without_failing_a_sample(user_rewards):
    functions = FunctionProcess([f"{user_rewards}:pid"])
    (kind, first_pid) = functions.call(0, ("q", "a", None), timeout_s=10.0)
    assert kind == "value" and int(first_pid) != os.getpid()
    os.kill(int(first_pid), 9)
    time.sleep(0.2)
    (kind, second_pid) = functions.call(0, ("q", "a", None), timeout_s=10.0)
    assert kind == "value" and second_pid != first_pid
    assert functions.starts == 2
    functions.close()
    assert not alive(int(second_pid))


def test_the_child_dies_with_the_worker_even_in_the_middle_of_a_call(user_rewards, tmp_path):
    # A worker process (what a Ray actor is) that dies while its child is stuck in C code:
    # nobody would ever read the child's pipe again, so the child must not outlive it.
    script = textwrap.dedent(f"""
        import os, sys, threading, time
        sys.path[:0] = {[str(tmp_path), os.getcwd()]!r}
        from reward.isolated import FunctionProcess
        functions = FunctionProcess(["{user_rewards}:pid", "{user_rewards}:backtrack"])
        print(int(functions.call(0, ("q", "a", None), timeout_s=10.0)[1]), flush=True)
        threading.Thread(target=functions.call, args=(1, ("q", "hang", None), 600.0), daemon=True).start()
        time.sleep(1.0)
        os._exit(0)
    """)
    # stderr to a file: a child that outlived the script would hold a captured pipe open.
    with open(tmp_path / "stderr", "w") as err:
        out = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True, timeout=60)
    assert out.returncode == 0, (tmp_path / "stderr").read_text()
    child = int(out.stdout.strip())
    deadline = time.monotonic() + 10.0
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


class _BadFloat(float):
    def __float__(self):
        raise OverflowError("no float for you")


class _BadMessage(Exception):
    def __str__(self):
        raise RuntimeError("nor a message")


def _raise_bad_message(*args):
    raise _BadMessage()


def test_run_call_reports_user_code_failing_after_the_call_returned():
    assert run_call(lambda *a: 2, ("q", "r", None)) == ("value", 2.0)
    assert run_call(lambda *a: _BadFloat(1.0), ("q", "r", None)) == ("raised", "OverflowError", "no float for you")
    assert run_call(_raise_bad_message, ("q", "r", None)) == ("raised", "_BadMessage", "<unprintable>")
    assert run_call(lambda *a: [1.0], ("q", "r", None)) == ("not_a_number", "list")


def test_numpy_scalars_count_as_numbers_arrays_do_not():
    import numpy as np

    assert run_call(lambda *a: np.bool_(True), ("q", "r", None)) == ("value", 1.0)  # np.bool_ is no numbers.Real
    assert run_call(lambda *a: np.float32(0.5), ("q", "r", None)) == ("value", 0.5)
    assert run_call(lambda *a: np.int64(3), ("q", "r", None)) == ("value", 3.0)
    assert run_call(lambda *a: np.array([1.0]), ("q", "r", None)) == ("not_a_number", "ndarray")
    assert run_call(lambda *a: np.str_("1"), ("q", "r", None)) == ("not_a_number", "str_")


def test_start_up_output_of_the_interpreter_does_not_reach_the_protocol(tmp_path, monkeypatch, capfd):
    # A sitecustomize (or .pth file) that prints runs before any code of ours in the child.
    (tmp_path / "sitecustomize.py").write_text("print('hello from site')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    functions = FunctionProcess(["exact_match"], start_timeout_s=30.0)
    assert functions.call(0, ("q", " 42 ", "42"), timeout_s=10.0) == ("value", 1.0)
    functions.close()
    assert "hello from site" in capfd.readouterr().err


def test_a_user_module_named_reward_does_not_shadow_ours(tmp_path, monkeypatch):
    (tmp_path / "reward.py").write_text("raise ImportError('the user module, not rlrelay')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    functions = FunctionProcess(["exact_match"], start_timeout_s=30.0)
    assert functions.call(0, ("q", "42", "42"), timeout_s=10.0) == ("value", 1.0)
    functions.close()


def test_an_interrupted_call_does_not_shift_later_replies(user_rewards):
    # Interrupted between sending a call and reading its reply, the reply would be read as
    # the next call's; the child must go instead.
    functions = FunctionProcess([f"{user_rewards}:length", f"{user_rewards}:slow"])

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            functions.call(1, ("q", "hang", None), timeout_s=20.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert functions.call(0, ("q", "abcd", None), timeout_s=10.0) == ("value", 4.0)
    assert functions.call(0, ("q", "abcdef", None), timeout_s=10.0) == ("value", 6.0)
    assert functions.starts == 2
    functions.close()


def test_the_child_outlives_the_thread_that_started_it(user_rewards):
    # Linux's parent-death signal follows the thread that started a child; a Ray actor's
    # task threads may come and go while the worker lives.
    made = []
    thread = threading.Thread(target=lambda: made.append(FunctionProcess([f"{user_rewards}:pid"])))
    thread.start()
    thread.join()
    time.sleep(0.3)
    (functions,) = made
    kind, pid = functions.call(0, ("q", "a", None), timeout_s=10.0)
    assert kind == "value" and functions.starts == 1
    functions.close()
    assert not alive(int(pid))


def test_what_a_timed_out_function_forked_is_killed_with_it(user_rewards, tmp_path):
    functions = FunctionProcess([f"{user_rewards}:forks"])
    pid_file = tmp_path / "grandchild"
    assert functions.call(0, ("q", "r", str(pid_file)), timeout_s=2.0) == ("timed_out",)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10.0
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild)
    functions.close()


def test_a_dropped_handle_takes_its_child_with_it(user_rewards):
    functions = FunctionProcess([f"{user_rewards}:pid"])
    pid = int(functions.call(0, ("q", "a", None), timeout_s=10.0)[1])
    del functions
    gc.collect()
    assert not alive(pid)
