"""A set of interchangeable actors that survives their deaths: fan work out, detect dead or
hung members, re-dispatch their unfinished work, and start replacements.

Used by the rollout and reward pools. Guarantees, for one ``run``:
- every chunk's result is taken exactly once (a failed call's partial work is never seen:
  the call either returned whole or is re-run elsewhere, and rollouts are seeded per
  sample, so a re-run produces the same samples);
- a member that dies (Ray reports the actor dead), stops answering (a health ping gets no
  answer within ``health_timeout_s``) or overruns a chunk (``timeout_s``) is killed, its
  chunk goes back to the queue, and a replacement starts; a replacement is ``prepare``-d
  (rollout workers: loaded with the current weights) before it gets any work;
- nothing waits forever: every wait is bounded, and after ``max_restarts`` replacements
  in a run of the job the set gives up with an error naming what failed; a replacement may
  wait for cluster resources beyond ``start_timeout_s`` while others serve, but a set with
  no member able to work for ``start_timeout_s`` fails.

An exception raised *inside* a member's method (bad input, a bug) is not a death: it is
re-raised at once, naming the member, instead of being retried forever.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import (GetTimeoutError, NodeDiedError, OutOfMemoryError, RayActorError, RayTaskError,
                            WorkerCrashedError)

log = logging.getLogger("rlrelay")


DEATHS = (RayActorError, OutOfMemoryError, NodeDiedError, WorkerCrashedError)
"""What a call raises when the worker behind it is gone: the actor died or is unreachable
(``RayActorError`` and its ``ActorUnavailableError``), Ray's memory monitor killed it to save
its node (``OutOfMemoryError``, not a ``RayActorError``), its node or process died. Catch
``RayTaskError`` first: Ray makes a worker's own exception an instance of its cause's class,
and a worker that itself called a dead actor is not dead."""


OVERRUNS_PER_CHUNK = 2
"""Overruns of one chunk of work (on different members in turn) that fail the run."""


class WorkerFailure(RuntimeError):
    """A remote worker failed in a way that cannot be recovered; the message names it."""


class Abandoned(RuntimeError):
    """The set's work was abandoned (``ActorSet.abandon``): the job is ending on another error."""


def init_error(e: RayActorError) -> str:
    """The exception line of an actor's failed constructor, out of Ray's traceback text."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


@dataclass
class Member:
    """One live actor of the set."""

    id: int
    handle: Any
    ready: bool = False
    """Prepared (e.g. holds the current weights) and may take work."""
    draining: bool = False
    """Leaving: finishes its current chunk, gets no more, then is stopped."""
    busy_since: float | None = None
    last_probe: float = field(default_factory=time.monotonic)
    """When it last showed it was alive (a call returned, or a ping was answered) or was handed
    a call: a busy member is pinged ``health_interval_s`` after that, not at once."""
    probe: ray.ObjectRef | None = None
    """A health ping sent and not yet answered; it is judged by later passes of the loop,
    never waited on, so probing many members (or a node of hung ones) never stalls the loop."""
    probe_sent: float = 0.0


class ActorSet:
    """``size`` actors made by ``spawn(id)``; see the module docstring for the guarantees."""

    def __init__(self, name: str, spawn: Callable[[int], Any], prepare: Callable[[Any], ray.ObjectRef],
                 size: int, *, timeout_s: float, health_timeout_s: float = 30.0, health_interval_s: float = 10.0,
                 start_timeout_s: float = 600.0, max_restarts: int = 8,
                 awaiting_resources: Callable[[], bool] = lambda: False, timeout_key: str = "timeout_s") -> None:
        self.name = name
        self.spawn = spawn
        self.prepare = prepare
        self.timeout_s = timeout_s
        self.timeout_key = timeout_key
        """The config key of ``timeout_s``, named when work keeps overrunning it."""
        self.health_timeout_s = health_timeout_s
        self.health_interval_s = health_interval_s
        self.start_timeout_s = start_timeout_s
        self.awaiting_resources = awaiting_resources
        """True while the cluster lacks the free resources one more member needs."""
        self.max_restarts = max_restarts
        self.restarts = 0
        self.members: dict[int, Member] = {}
        self._joining: dict[ray.ObjectRef, tuple[int, float, int]] = {}  # ref -> (member, since, state)
        self._next_id = 0
        self.state = 0  # bumped by broadcast: a member prepared with older state prepares again
        self.target = size
        self._abandoned = False
        for _ in range(size):
            self._start()

    # -- membership --------------------------------------------------------------------------

    def label(self, member_id: int) -> str:
        return f"{self.name} {member_id}"

    def _start(self) -> int:
        mid = self._next_id
        self._next_id += 1
        self.members[mid] = Member(id=mid, handle=self.spawn(mid))
        self._prepare(mid, since=time.monotonic())
        return mid

    def _prepare(self, mid: int, since: float) -> None:
        self._joining[self.prepare(self.members[mid].handle)] = (mid, since, self.state)

    def _lost(self, mid: int, why: str) -> None:
        """A member is dead or hung: stop it for good and start a replacement."""
        member = self.members.pop(mid, None)
        if member is None:
            return
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # already gone
            pass
        self._joining = {ref: v for ref, v in self._joining.items() if v[0] != mid}
        if member.draining:
            log.info("%s left (%s)", self.label(mid), why)
            return
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise WorkerFailure(f"{self.label(mid)} {why}; {self.restarts - 1} replacements already started "
                                f"in this job (limit {self.max_restarts}): giving up")
        new = self._start()
        log.warning("%s %s: its work is re-dispatched; replacement %s is starting", self.label(mid), why,
                    self.label(new))

    def abandon(self) -> None:
        """Make the ``run`` or ``broadcast`` in progress (on another thread) and any later one
        raise ``Abandoned`` within a second, instead of finishing work nobody will take: the
        batch an asynchronous driver generates while it fails on another error."""
        self._abandoned = True

    def _check_abandoned(self) -> None:
        if self._abandoned:
            raise Abandoned(f"the {self.name}s' work was abandoned: the job is ending")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every member is prepared (start-up of the job, or after a resize)."""
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while self._joining:
            if time.monotonic() > deadline:
                names = ", ".join(self.label(v[0]) for v in self._joining.values())
                raise WorkerFailure(f"{names} did not start within {timeout_s or self.start_timeout_s:.0f} s")
            self._poll_joins(timeout=min(1.0, max(0.0, deadline - time.monotonic())), fail_fast=True)

    def _poll_joins(self, timeout: float, fail_fast: bool = False) -> None:
        """Mark members whose preparation finished ready. One that could not start fails the job
        when ``fail_fast`` (the job's start-up: nothing has run yet and a replacement would fail
        the same); later (a scale-up, a replacement) it is dropped and the job goes on."""
        if not self._joining:
            return
        ready, _ = ray.wait(list(self._joining), num_returns=len(self._joining), timeout=timeout)
        for ref in ready:
            mid, since, state = self._joining.pop(ref)
            try:
                ray.get(ref)
            except RayTaskError as e:  # first: its cause may be of a DEATHS type, raised by its own code
                if mid in self.members and state != self.state:
                    # Prepared with state a broadcast has since replaced (a joiner that waited
                    # for room while two weight pushes went by finds its shared-memory slot
                    # rewritten): judge it on the current state.
                    self._prepare(mid, since)
                    continue
                self._failed_start(mid, repr(e.cause), fail_fast, e)
                continue
            except DEATHS as e:
                if isinstance(e, RayActorError) and e.actor_init_failed:
                    # Its constructor raised (a misspelled reward function, a model that does not
                    # load): a replacement would raise the same, so stop here and say why.
                    self._failed_start(mid, init_error(e), fail_fast, e)
                    continue
                self._lost(mid, f"died while starting ({type(e).__name__})")
                continue
            if mid not in self.members:
                continue
            if state != self.state:  # a broadcast happened meanwhile: catch up before serving
                self._prepare(mid, since)
            else:
                self.members[mid].ready = True
        now = time.monotonic()
        for ref, (mid, since, state) in list(self._joining.items()):
            if now - since > self.start_timeout_s:
                if self.awaiting_resources():
                    # Not hung: the cluster has no room for it yet (an autoscaling cluster is
                    # adding a node). Keep waiting; the pool serves with the members it has.
                    self._joining[ref] = (mid, now, state)
                    log.warning("%s still waits for cluster resources after %.0f s", self.label(mid),
                                self.start_timeout_s)
                    continue
                self._joining.pop(ref)
                self._lost(mid, f"did not start within {self.start_timeout_s:.0f} s")

    def _failed_start(self, mid: int, why: str, fail_fast: bool, cause: BaseException) -> None:
        if fail_fast or mid not in self.members:
            raise WorkerFailure(f"{self.label(mid)} could not start: {why}") from cause
        member = self.members.pop(mid)
        try:
            ray.kill(member.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if not member.draining:
            self.target = max(0, self.target - 1)  # what the pool holds now, for the next resize
        if not any(not m.draining for m in self.members.values()):
            # Nothing left to serve: the job stops here, with the reason rather than "no worker".
            raise WorkerFailure(f"{self.label(mid)} could not start: {why}; no other {self.name} is left") from cause
        # Counted like a restart, so that an autoscaler growing onto a node where workers
        # cannot start gives up after max_restarts tries instead of trying for ever.
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise WorkerFailure(f"{self.label(mid)} could not start: {why}; {self.restarts - 1} workers already "
                                f"replaced or failed to start in this job (limit {self.max_restarts}): giving up") from cause
        log.warning("%s could not start (%s); the pool goes on with %d (counted as a restart, %d of %d)",
                    self.label(mid), why, self.target, self.restarts, self.max_restarts)

    def resize(self, size: int) -> None:
        """Grow now (new members join once prepared); shrink by draining the newest members."""
        self.target = size
        active = [m for m in self.members.values() if not m.draining]
        for _ in range(size - len(active)):
            self._start()
        for member in sorted(active, key=lambda m: -m.id)[:max(0, len(active) - size)]:
            member.draining = True
            if member.busy_since is None:
                self._retire(member)

    def _retire(self, member: Member) -> None:
        self.members.pop(member.id, None)
        self._joining = {ref: v for ref, v in self._joining.items() if v[0] != member.id}
        ray.kill(member.handle, no_restart=True)
        log.info("%s left the pool", self.label(member.id))

    # -- work --------------------------------------------------------------------------------

    def run(self, chunks: Sequence[Any], call: Callable[[Any, Any], ray.ObjectRef],
            timeout_s: float | None = None) -> list[Any]:
        """``call(handle, chunk)`` for every chunk on some member; results in chunk order.
        ``timeout_s`` overrides the set's per-chunk timeout for this run."""
        timeout_s = timeout_s or self.timeout_s
        queue = deque(range(len(chunks)))
        overruns: dict[int, int] = {}

        def requeue(chunk: int, overran: bool) -> None:
            if overran:
                overruns[chunk] = overruns.get(chunk, 0) + 1
                if overruns[chunk] >= OVERRUNS_PER_CHUNK:
                    # Not the workers: this work takes longer than the timeout (or hangs any
                    # worker); retrying it would only spend the job's restarts.
                    raise WorkerFailure(
                        f"the same share of the work ({self.name} call {chunk + 1} of {len(chunks)}) overran its "
                        f"{timeout_s:.0f} s timeout on {overruns[chunk]} {self.name}s in turn: it needs longer "
                        f"({self.timeout_key} sets it), or it hangs every worker it goes to")
            queue.appendleft(chunk)

        results: dict[int, Any] = {}
        inflight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (member, chunk)
        stalled_since = None  # since when no member could take work
        while len(results) < len(chunks):
            self._check_abandoned()
            self._poll_joins(timeout=0)
            for member in self.members.values():
                if queue and member.ready and not member.draining and member.busy_since is None:
                    chunk = queue.popleft()
                    inflight[call(member.handle, chunks[chunk])] = (member.id, chunk)
                    member.busy_since = member.last_probe = time.monotonic()
            if not inflight and not self._joining:
                raise WorkerFailure(f"no {self.name} is alive to take the remaining work")
            if inflight:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > self.start_timeout_s:
                # Only replacements that wait for cluster resources are left (their own start
                # clocks pause while they wait): bounded too, so a cluster that lost its
                # rollout nodes for good does not hold the run for ever.
                raise WorkerFailure(f"no {self.name} could take work for {self.start_timeout_s:.0f} s: "
                                    f"{len(self._joining)} waiting to start (ray status shows what the cluster lacks)")
            waitable = list(inflight) + list(self._joining)
            ready, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in inflight:
                    mid, chunk = inflight.pop(ref)
                    ok, value = self._collect(ref, mid)
                    if ok:
                        results[chunk] = value
                    else:
                        queue.appendleft(chunk)
            self._check_health(inflight, requeue=requeue, timeout_s=timeout_s)
        self._poll_joins(timeout=0)
        return [results[i] for i in range(len(chunks))]

    def _collect(self, ref: ray.ObjectRef, mid: int) -> tuple[bool, Any]:
        """``(True, result)`` if the call succeeded, ``(False, None)`` if its member died (it is
        replaced); a member whose method raised fails the run. The result is fetched once
        (a second ``ray.get`` of a large result deserialises it again)."""
        member = self.members.get(mid)
        try:
            value = ray.get(ref, timeout=self.health_timeout_s)  # the call has returned: fetching is quick
        except RayTaskError as e:  # first: its cause may be of a DEATHS type, raised by its own code
            raise WorkerFailure(f"{self.label(mid)} failed: {e.cause!r}") from e
        except DEATHS as e:
            self._lost(mid, f"died ({type(e).__name__})")
            return False, None
        if member is not None:
            member.busy_since = None
            member.last_probe = time.monotonic()
            member.probe = None  # it answered with its result
            if member.draining:
                self._retire(member)
        return True, value

    def _check_health(self, inflight: dict, requeue: Callable[[int, bool], None] | None, timeout_s: float) -> None:
        """Members busy for long get a ping (they serve pings concurrently with work); one that
        overruns its chunk, whose ping goes unanswered for ``health_timeout_s``, or whose ping
        finds it dead is lost. Pings are sent and judged without blocking: every due member is
        pinged at once, and the loop goes on collecting and dispatching while they are out."""
        now = time.monotonic()
        probes = [m.probe for m in self.members.values() if m.probe is not None]
        answered = set(ray.wait(probes, num_returns=len(probes), timeout=0)[0]) if probes else set()
        for ref, (mid, chunk) in list(inflight.items()):
            member = self.members.get(mid)
            if member is None:
                continue
            why = None
            overran = now - member.busy_since > timeout_s
            if overran:
                why = f"overran its {timeout_s:.0f} s timeout"
            elif member.probe in answered:
                why = self._probe_answer(member, now)
            elif member.probe is not None:
                if now - member.probe_sent > self.health_timeout_s:
                    why = f"did not answer a health ping within {self.health_timeout_s:.0f} s"
            elif now - member.last_probe > self.health_interval_s:
                member.probe, member.probe_sent = member.handle.ping.remote(), now
            if why is not None:
                inflight.pop(ref)
                if requeue is not None:
                    requeue(chunk, overran)
                self._lost(mid, why)

    def _probe_answer(self, member: Member, now: float) -> str | None:
        """None if the member's answered ping shows it alive, else why it is lost."""
        probe, member.probe = member.probe, None
        try:
            ray.get(probe, timeout=self.health_timeout_s)  # answered: fetching is quick
        except RayTaskError:  # ping raised: a bug, not a death
            raise
        except (GetTimeoutError, *DEATHS) as e:
            return f"died ({type(e).__name__}, seen by a health ping)"
        member.last_probe = now
        return None

    def broadcast(self, call: Callable[[Any], ray.ObjectRef]) -> list[Any]:
        """``call(handle)`` once on every ready member (e.g. a weight push). A member that dies
        is replaced, and ``prepare`` brings its replacement to the same state (the caller
        updates what ``prepare`` sends first), so no re-dispatch is needed."""
        self.state += 1
        inflight: dict[ray.ObjectRef, tuple[int, int]] = {}
        for member in self.members.values():
            if member.ready:
                inflight[call(member.handle)] = (member.id, member.id)
                member.busy_since = member.last_probe = time.monotonic()
        results = []
        while inflight:
            self._check_abandoned()
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                mid, _ = inflight.pop(ref)
                ok, value = self._collect(ref, mid)
                if ok:
                    results.append(value)
            self._check_health(inflight, requeue=None, timeout_s=self.timeout_s)
            self._poll_joins(timeout=0)
        return results

    def handles(self) -> list[Any]:
        return [m.handle for m in self.members.values()]

    def shutdown(self) -> None:
        for member in list(self.members.values()):
            try:
                ray.kill(member.handle, no_restart=True)
            except Exception:
                pass
        self.members.clear()
        self._joining.clear()
