"""A first SIGTERM/SIGINT asks the run to stop after its step; a second interrupts at once;
the previous handlers come back afterwards."""

import os
import signal

import pytest

from cluster.launch import stop_on_signal


class StandIn:
    """The two members of Controller that stop_on_signal uses."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.calls = 0

    def request_stop(self) -> None:
        self.calls += 1
        self.stop_requested = True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_requests_a_stop_and_a_second_interrupts(sig):
    before = signal.getsignal(sig)
    controller = StandIn()
    with stop_on_signal(controller):
        os.kill(os.getpid(), sig)
        assert controller.stop_requested and controller.calls == 1
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(sig).name):
            os.kill(os.getpid(), sig)
    assert controller.calls == 1
    assert signal.getsignal(sig) is before
