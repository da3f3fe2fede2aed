"""The job's control point: a named Ray actor through which other shells see and steer a
running job (``rlrelay status``, ``rlrelay scale``).

The driver publishes a ``JobStatus`` after every step and takes scale requests at step
boundaries; the CLI, in another process on the same cluster, finds the actor by name
(``rlrelay-control-<run.name>`` in the job's namespace).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster.argtypes import nonnegative_number, positive_int


def control_actor_name(run_name: str) -> str:
    return f"rlrelay-control-{run_name}"


def registry_dir() -> Path:
    """Where running jobs started on this machine note their Ray address (one JSON per job).

    ``--address auto`` would pick whichever Ray instance started last on the machine, which
    is not the job's when several run side by side (local instances of other jobs, tests)."""
    return Path(os.environ.get("RLRELAY_STATE_DIR", Path.home() / ".cache" / "rlrelay" / "jobs"))


def register_job(run_name: str, gcs_address: str, namespace: str) -> Path:
    path = registry_dir() / f"{run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_name": run_name, "address": gcs_address, "namespace": namespace,
                                "pid": os.getpid()}))
    return path


def _registered_jobs() -> dict[str, dict]:
    """Jobs in the registry whose driver process is still alive."""
    jobs = {}
    for path in registry_dir().glob("*.json"):
        try:
            entry = json.loads(path.read_text())
            os.kill(entry["pid"], 0)
        except (OSError, ValueError, KeyError):
            continue  # a job that ended without cleaning up (killed): ignored
        jobs[entry["run_name"]] = entry
    return jobs


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """One rollout worker as ``rlrelay status`` shows it.

    Example: ``WorkerInfo(id=3, node="10.0.0.7", state="serving", policy_version=12, tokens_per_s=740.0)``
    """

    id: int
    """The pool's id for the worker (replacements and new workers get fresh ids)."""
    node: str
    """IP address of the node the worker runs on."""
    state: str
    """``serving``, ``joining`` (starting or loading the current weights) or ``draining`` (leaving)."""
    policy_version: int
    """Weight version loaded in its engine (-1 while unknown)."""
    tokens_per_s: float
    """Response tokens per second of generate time since the worker started."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """A running job's state, published by the driver after every step.

    Example: ``JobStatus(run_name="demo", step=12, total_steps=30, policy_version=12, rollout_workers=(...),
    learner_ranks=1, desired_rollout_workers=2, metrics={"reward/mean": 0.6})``
    """

    run_name: str
    """``run.name`` of the job."""
    step: int
    """Training steps completed."""
    total_steps: int
    """Steps the job will run."""
    policy_version: int
    """Current policy version."""
    rollout_workers: tuple[WorkerInfo, ...]
    """The rollout pool's members."""
    learner_ranks: int
    """Learner world size."""
    desired_rollout_workers: int
    """Size the pool is being brought to."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """What one rollout worker reserves (``{"CPU": 0.5, "GPU": 1.0}``): ``rlrelay scale`` says
    how many new workers the cluster's free resources hold now."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Last step's key metrics."""


class JobControl:
    """State shared between the driver and the CLI; a plain class (Ray wraps it in ``cluster``)."""

    def __init__(self, run_name: str, autoscale_bounds: tuple[int, int] | None = None) -> None:
        self.run_name = run_name
        self.autoscale_bounds = autoscale_bounds
        """``(rollout.min_workers, rollout.max_workers)`` when the job autoscales."""
        self._scale_request: int | None = None
        self._status: JobStatus | None = None

    def request_scale(self, rollout_workers: int) -> None:
        if rollout_workers < 1:
            raise ValueError(f"the rollout pool needs at least 1 worker (asked for {rollout_workers})")
        if self.autoscale_bounds is not None:
            low, high = self.autoscale_bounds
            if not low <= rollout_workers <= high:
                # Taken, the autoscaler would move the pool back inside its bounds a step later.
                raise ValueError(f"job {self.run_name!r} autoscales its rollout pool within "
                                 f"[{low}, {high}] (rollout.min_workers, rollout.max_workers); "
                                 f"{rollout_workers} is outside them")
        self._scale_request = rollout_workers

    def take_scale_request(self) -> int | None:
        """The newest request not yet taken (older ones are superseded)."""
        request, self._scale_request = self._scale_request, None
        return request

    def publish(self, status: JobStatus) -> None:
        self._status = status

    def status(self) -> JobStatus | None:
        return self._status


# -- the CLI side: rlrelay status / rlrelay scale ----------------------------------------------

def register(sub) -> None:
    p = sub.add_parser("status", help="show a running job: workers, weight versions, step, metrics")
    _add_target_args(p)
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=status_command)

    p = sub.add_parser("scale", help="change the number of rollout workers of a running job")
    p.add_argument("--rollout", type=positive_int, required=True, metavar="N", help="rollout workers wanted")
    _add_target_args(p)
    p.add_argument("--wait", type=nonnegative_number, default=0.0, metavar="SECONDS",
                   help="wait up to SECONDS until N workers serve with the current weights")
    p.set_defaults(handler=scale_command)


def _add_target_args(p) -> None:
    p.add_argument("--job", metavar="NAME", help="the job's run.name (default: the only running job)")
    p.add_argument("--address", help="Ray cluster of the job (default: where the job started from this machine "
                                      "runs, as noted in ~/.cache/rlrelay/jobs; else RAY_ADDRESS)")
    p.add_argument("--namespace", default="rlrelay", help="Ray namespace of the job (ray.namespace)")


def _find_control(args):
    from cluster.security import InsecureClusterError, check_cluster_auth, client_auth_env

    address, namespace = args.address, args.namespace
    if address is None:
        local = _registered_jobs()
        entry = local.get(args.job) if args.job else (next(iter(local.values())) if len(local) == 1 else None)
        if entry is None and not args.job and len(local) > 1:
            raise SystemExit(f"rlrelay: several jobs run on this machine ({', '.join(sorted(local))}): "
                             f"name one with --job")
        if entry is not None:
            address, namespace = entry["address"], entry["namespace"]
            args.job = entry["run_name"]
        elif os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
        else:
            # Not `auto`: that is whichever Ray instance started last on this machine, maybe
            # another user's, and ray.init there prints pages before it finds no job.
            what = f"job {args.job!r}" if args.job else "job"
            raise SystemExit(f"rlrelay: no {what} started from this machine is running (none noted in "
                             f"{registry_dir()}): for a job on a cluster give --address HOST:PORT, or "
                             f"--address auto for the Ray instance on this machine")
    from cluster.config import ray_address_problem

    if address == "local":  # would start a fresh instance, holding no job, to look into
        raise SystemExit("rlrelay: --address local: status and scale look into a running cluster; give its "
                         "HOST:PORT, or auto for the Ray instance on this machine")
    if problem := ray_address_problem(address):
        raise SystemExit(f"rlrelay: --address {problem}")
    # Ray reads the auth mode once, at import: a token found here turns token mode on.
    os.environ.update(client_auth_env(os.environ))
    try:
        check_cluster_auth(address, allow_insecure=False, env=os.environ)
    except InsecureClusterError as e:
        raise SystemExit(f"rlrelay: refused: {e}") from None
    import ray

    from cluster.jobs import ClusterUnreachable, join_cluster

    try:
        join_cluster(address, namespace=namespace, logging_level="ERROR", log_to_driver=False)
    except ClusterUnreachable as e:
        raise SystemExit(f"rlrelay: {e}") from None
    args.namespace = namespace
    if args.job:
        name = control_actor_name(args.job)
    else:
        prefix = control_actor_name("")
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(prefix) and a["namespace"] == args.namespace]
        if len(names) != 1:
            found = ", ".join(n[len(prefix):] for n in names) or "none"
            raise SystemExit(f"rlrelay: name the job with --job (running jobs in namespace {args.namespace}: {found})")
        name = names[0]
        args.job = name[len(prefix):]
    try:
        return ray.get_actor(name, namespace=args.namespace)
    except ValueError:
        raise SystemExit(f"rlrelay: no running job {name[len(control_actor_name('')):]!r} in namespace "
                         f"{args.namespace!r}") from None


def _ask(args, ref):
    """The control actor's answer, or exit 1 saying the job ended or does not answer."""
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    try:
        return ray.get(ref, timeout=30)
    except ActorUnavailableError:  # its process died and Ray is starting it again
        raise SystemExit(f"rlrelay: job {args.job!r}: its control actor is restarting; try again in a "
                         f"few seconds") from None
    except RayActorError:
        raise SystemExit(f"rlrelay: job {args.job!r} has ended") from None
    except GetTimeoutError:
        raise SystemExit(f"rlrelay: job {args.job!r} did not answer within 30 s") from None


def status_command(args) -> int:
    import dataclasses

    control = _find_control(args)  # first: it settles the auth mode before ray is imported
    status = _ask(args, control.status.remote())
    if status is None:
        print("no status yet: the job has not finished a step since it started (or since its control actor "
              "restarted)")
        return 0
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=2))
        return 0
    print(f"job {status.run_name}: step {status.step}/{status.total_steps}, policy version {status.policy_version}, "
          f"{status.learner_ranks} learner rank(s), rollout workers {len(status.rollout_workers)} "
          f"(wanted {status.desired_rollout_workers})")
    print(f"  {'WORKER':>6}  {'NODE':<16} {'STATE':<9} {'VERSION':>7}  {'TOKENS/S':>9}")
    for w in status.rollout_workers:
        print(f"  {w.id:>6}  {w.node:<16} {w.state:<9} {w.policy_version:>7}  {w.tokens_per_s:>9.0f}")
    if status.metrics:
        print("  last step: " + "  ".join(f"{k} {v:.4g}" for k, v in status.metrics.items()))
    return 0


def room_warning(new_workers: int, bundle: dict[str, float], free: dict[str, float]) -> str | None:
    """What to say when the cluster's free resources hold fewer than ``new_workers`` more
    rollout workers of ``bundle`` each; None when they all fit (or the pool shrinks).

    The pool is not capped: a worker without room waits for it (an autoscaler adding a node,
    another job ending) while the others serve. On a fixed cluster it waits for ever, so say so
    before the user waits on it.

    Example: ``room_warning(4, {"CPU": 1.0}, {"CPU": 2.5})`` says 2 of the 4 fit now."""
    if new_workers <= 0:
        return None
    room = min((int(free.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items() if amount > 0),
               default=new_workers)
    if room >= new_workers:
        return None
    short = ", ".join(f"{name} {amount * new_workers:g} needed, {free.get(name, 0.0):g} free"
                      for name, amount in bundle.items() if free.get(name, 0.0) < amount * new_workers)
    return (f"the cluster has room for {room} of the {new_workers} new rollout worker(s) now ({short}); "
            f"the other {new_workers - room} wait for resources (shown as joining in `rlrelay status`) "
            f"until an autoscaler adds nodes or other work frees them")


def scale_command(args) -> int:
    import time

    control = _find_control(args)  # first: it settles the auth mode before ray is imported
    import ray

    from ray.exceptions import RayTaskError

    try:
        _ask(args, control.request_scale.remote(args.rollout))
    except RayTaskError as e:  # refused: the job's own words
        print(f"rlrelay: scale refused: {e.cause}", file=sys.stderr)
        return 2
    print(f"asked for {args.rollout} rollout worker(s); the job applies it at its next step")
    status = _ask(args, control.status.remote())
    if status is not None and status.worker_resources:
        warning = room_warning(args.rollout - len(status.rollout_workers), status.worker_resources,
                               ray.available_resources())
        if warning:
            print(f"rlrelay: warning: {warning}")
    deadline = time.monotonic() + args.wait
    while args.wait and time.monotonic() < deadline:
        status = _ask(args, control.status.remote())
        serving = [w for w in status.rollout_workers if w.state == "serving"] if status else []
        if len(serving) == args.rollout == len(status.rollout_workers) and \
                all(w.policy_version == status.policy_version for w in serving):
            print(f"{args.rollout} rollout worker(s) serving policy version {status.policy_version}")
            return 0
        time.sleep(1.0)
    if args.wait:
        print(f"rlrelay: the pool did not reach {args.rollout} serving workers within {args.wait:.0f} s")
        return 1
    return 0
