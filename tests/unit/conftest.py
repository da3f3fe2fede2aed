"""Fixtures of the reward-worker tests: a user module of reward functions."""

from __future__ import annotations

import textwrap
import uuid

import pytest


@pytest.fixture
def user_rewards(tmp_path, monkeypatch) -> str:
    """A user module of reward functions on sys.path, under a fresh name."""
    name = f"user_rewards_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import os
            import re
            import time

            def length(prompt, response, answer):
                return float(len(response))

            def boom(prompt, response, answer):
                if response == "bad":
                    raise KeyError("no grader for this response")
                return 1.0

            def nonfinite(prompt, response, answer):
                return {"nan": float("nan"), "inf": float("inf")}.get(response, 2.0)

            def text(prompt, response, answer):
                return "1.0"

            def slow(prompt, response, answer):
                if response == "hang":
                    time.sleep(3600.0)  # for the test's purposes, for ever
                return 1.0

            def backtrack(prompt, response, answer):
                # (a+)+$ on "aaa...b" backtracks exponentially inside the C regex engine, which
                # holds the GIL throughout: no other thread of the process runs meanwhile.
                if response == "hang":
                    re.match(r"(a+)+$", "a" * 64 + "b")
                return 1.0

            def exits(prompt, response, answer):
                if response == "exit":
                    os._exit(7)
                return 1.0

            def chatty(prompt, response, answer):
                print("scoring", response)  # must not reach the worker's protocol pipe
                return float(len(response))

            def pid(prompt, response, answer):
                return float(os.getpid())

            def forks(prompt, response, answer):
                # Leaves a grandchild behind, writes its pid to the file named by `answer`, hangs.
                child = os.fork()
                if child == 0:
                    time.sleep(300.0)
                    os._exit(0)
                with open(answer, "w") as f:
                    f.write(str(child))
                time.sleep(300.0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def one_torch_thread():
    """For tests of tiny models: a second thread buys nothing, and when other processes hold
    the cores, OpenMP threads waiting on each other made each step ~100x slower (measured)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
