"""Launching a training job: resolve assets, start or join Ray, build the pools, run the loop.

Everything the controller uses is built here and passed in; nothing is global.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cluster.checkpoints import CheckpointManager, check_resumable, read_checkpoint, resolve_resume, run_signature
from cluster.collect import Collector
from cluster.config import Config, ConfigError, to_dict
from cluster.control import JobControl, control_actor_name, register_job
from cluster.controller import Controller, RunSummary
from cluster.data import PromptSampler, data_fingerprint, drop_too_long, load_prompts
from cluster.job_spec import job_env_vars
from cluster.jobs import join_cluster
from cluster.preflight import check_eval_judge, check_model_dir, check_reward_config, check_writable
from cluster.run_dir import (clear_earlier_run, completed_run, exclusive, is_own_checkpoint, missing_dirs,
                             remove_if_unused)
from cluster.security import check_cluster_auth, require_token_auth
from learner.schedule import run_schedules, warmup_warning

log = logging.getLogger("rlrelay")

# Quiet, single-threaded tokenizers and vLLM at warning level in every worker: the actors'
# logs stream to the driver's console.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING",
              "VLLM_CONFIGURE_LOGGING": "1"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedPaths:
    """Where the model and data of a run come from, after filling in the demo's defaults."""

    model_path: str
    train_path: str
    eval_path: str | None


def resolve_paths(cfg: Config) -> ResolvedPaths:
    """Use the configured paths; build (or reuse) the demo's assets for whatever is unset."""
    model, train, evals = cfg.model.path, cfg.data.train_path, cfg.data.eval_path
    if model is None or train is None:
        from cluster.demo import prepare_demo_assets

        assets = prepare_demo_assets(cfg.demo, Path(cfg.run.cache_dir), log=log.info)
        model = model or str(assets.model_dir)
        if train is None:
            train = str(assets.train_path)
            evals = evals or str(assets.eval_path)
    return ResolvedPaths(model_path=model, train_path=train, eval_path=evals)


@contextmanager
def stop_on_signal(controller: Controller) -> Iterator[None]:
    """While the loop runs, a first SIGTERM or SIGINT (Ctrl-C, a scheduler's preemption) asks
    the controller to stop after the step in progress, with a checkpoint; a second one
    interrupts at once (KeyboardInterrupt), as without this."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread; a run driven elsewhere keeps its own
        return

    def handler(signum, frame) -> None:
        if controller.stop_requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        log.warning("%s: stopping after the step in progress (again to interrupt at once)",
                    signal.Signals(signum).name)
        controller.request_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def worker_runtime_env(env: Mapping[str, str], cwd: str) -> dict:
    """The runtime env ``ray.init`` gives every worker: WORKER_ENV, and the driver's working
    directory ``cwd`` on the import path, so user reward functions named ``my_rewards:score``
    resolve in the reward actors as they do here.

    In a Ray job (``rlrelay submit``, ``ray job submit``, a KubeRay RayJob), ``ray.init`` merges
    this with the job's own runtime env and fails on any variable set in both, even to the same
    value: a variable the job sets is left out, and the job's value holds. For WORKER_ENV that is
    acceptable: those only set log levels and tokenizer threads. PYTHONPATH must still hold
    ``cwd``; Ray puts a job's working directory (the driver's ``cwd``) there first, so it does
    unless the job has none and sets PYTHONPATH without it: refused, naming the fix."""
    path = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH")) if p)
    env_vars = {**WORKER_ENV, "PYTHONPATH": path}
    from_job = job_env_vars(env)
    if "PYTHONPATH" in from_job:
        # The driver's own PYTHONPATH is what the workers get: the job's, after Ray's additions.
        on_path = {os.path.realpath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p}
        if os.path.realpath(cwd) not in on_path:
            raise ConfigError(f"the Ray job's runtime env sets PYTHONPATH={from_job['PYTHONPATH']!r} without the "
                              f"driver's working directory {cwd}, and Ray refuses to set it again for the "
                              f"workers: add {cwd} to the job's PYTHONPATH, or leave PYTHONPATH out of it")
    return {"env_vars": {k: v for k, v in env_vars.items() if k not in from_job}}


def init_ray(cfg: Config) -> None:
    """Start a fresh local Ray instance, or join the configured cluster."""
    import ray

    address = cfg.ray.target(os.environ)
    runtime_env = worker_runtime_env(os.environ, os.getcwd())
    # Refused before anything starts: a cluster that would run without token authentication
    # (README, "Security and threat model").
    check_cluster_auth(address, allow_insecure=cfg.ray.allow_insecure, env=os.environ)
    if address == "local":
        # The local instance's processes (GCS, raylet, workers) are the driver's children, in
        # its process group: a SIGTERM to the group (timeout(1), SLURM, systemd) killed them
        # with the driver's own, so the run it asked to stop could not finish its step or
        # checkpoint. They start with SIGTERM blocked (a signal mask is inherited); the driver
        # handles it, and ray.shutdown ends them (SIGKILL after 1 s: ~4 s more at shutdown).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            # Advertise loopback only; Ray's own servers still listen on every interface
            # (DESIGN), so token authentication, checked right after start-up, is the real
            # protection.
            ray.init(address="local", num_cpus=cfg.ray.num_cpus or os.cpu_count(), namespace=cfg.ray.namespace,
                     include_dashboard=False, runtime_env=runtime_env, log_to_driver=True,
                     _node_ip_address="127.0.0.1")
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        require_token_auth(allow_insecure=cfg.ray.allow_insecure)
    else:
        join_cluster(address, namespace=cfg.ray.namespace, runtime_env=runtime_env)


def start_control(cfg: Config):
    """The job's named control actor; a second job with the same run name is refused."""
    import ray

    name = control_actor_name(cfg.run.name)
    try:
        ray.get_actor(name, namespace=cfg.ray.namespace)
    except ValueError:
        r = cfg.rollout
        # Restarted by Ray if its process dies: it holds only the last status (republished
        # every step) and a pending scale request, so nothing of the run is lost with it.
        return ray.remote(JobControl).options(name=name, namespace=cfg.ray.namespace, num_cpus=0, max_restarts=-1) \
            .remote(cfg.run.name, (r.min_workers, r.max_workers) if r.autoscale else None)
    raise ConfigError(f"a job named {cfg.run.name!r} is already running in Ray namespace {cfg.ray.namespace!r}: "
                      f"set run.name to another name")


def train(cfg: Config, resume: str | None = None) -> RunSummary:
    """Run one training job to completion and write its summary.

    ``resume``: ``auto`` continues from the run's latest complete checkpoint (or starts fresh
    if there is none), a path continues from that checkpoint, None starts fresh."""
    # Refused before anything is written or built (init_ray checks again for the benches).
    check_cluster_auth(cfg.ray.target(os.environ), allow_insecure=cfg.ray.allow_insecure, env=os.environ)
    worker_runtime_env(os.environ, os.getcwd())  # a Ray job's PYTHONPATH it cannot work with, likewise
    # The reward workers get the driver's working directory on their import path (init_ray);
    # the driver's own check of `module:function` rewards must see the same modules, also when
    # it runs as the `rlrelay` console script, whose sys.path starts at the script's directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    run_dir = cfg.run.path
    checkpoint_root = Path(cfg.trainer.checkpoint_dir or run_dir / "checkpoints")
    made = missing_dirs(checkpoint_root) + missing_dirs(run_dir)
    try:
        # Found at the end of training, an unwritable directory lost the whole run.
        check_writable(run_dir, "run.dir")
        check_writable(checkpoint_root, "trainer.checkpoint_dir")
    except ConfigError:
        remove_if_unused(made, run_dir, locked=False)
        raise
    with exclusive(run_dir, made):
        return _train(cfg, resume, run_dir, CheckpointManager(checkpoint_root, keep_last=cfg.trainer.keep_last))


def _train(cfg: Config, resume: str | None, run_dir: Path, checkpoints: CheckpointManager) -> RunSummary:
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from actors.rollout_worker import encode_prompt
    from cluster.learner_group import LearnerGroup
    from cluster.pools import RewardPool, RolloutPool
    from cluster.tracking import Tracker

    resume_from = resolve_resume(resume, checkpoints)  # first: a bad --resume is named at once
    resumed = read_checkpoint(resume_from)[0] if resume_from else None
    if resumed is not None and resumed.step > cfg.trainer.steps:
        # Resumed, the run would end at once and write its step-`trainer.steps` checkpoint
        # from these later weights, replacing the real one.
        raise ConfigError(f"--resume: checkpoint {resume_from} is at step {resumed.step}, past trainer.steps="
                          f"{cfg.trainer.steps}: raise trainer.steps, or resume an earlier checkpoint")
    if resumed is not None and resumed.step == cfg.trainer.steps and is_own_checkpoint(resume_from, checkpoints):
        done = completed_run(run_dir, cfg.trainer.steps)
        if done is not None:
            # Resumed, it would redo its end and log the final evaluation a second time.
            log.warning("the run in %s has already completed its %d steps (summary.json); nothing to do: raise "
                        "trainer.steps to train on", run_dir, cfg.trainer.steps)
            return done
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path)  # before the demo's data is built for it (a minute)
    paths = resolve_paths(cfg)
    if resumed is not None and Path(paths.model_path, "config.json").is_file():
        check_resumable(resumed, run_signature(cfg.algorithm.uses_critic, paths.model_path), resume_from)
    train_prompts = load_prompts(paths.train_path)
    eval_prompts = load_prompts(paths.eval_path) if paths.eval_path else []
    if cfg.data.eval_limit:
        eval_prompts = eval_prompts[:cfg.data.eval_limit]
    if any(p.answer is None for p in eval_prompts):
        raise ConfigError(f"data.eval_path {paths.eval_path}: every eval prompt needs an 'answer' "
                          f"(accuracy is exact match against it)")
    model_path = str(paths.model_path)
    check_model_dir(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(paths.model_path, local_files_only=True)
        vocab_size = AutoConfig.from_pretrained(paths.model_path, local_files_only=True).get_text_config().vocab_size
    except (OSError, ValueError) as e:  # not a model directory
        raise ConfigError(f"model.path {model_path!r}: cannot load a tokenizer and config from it: "
                          f"{str(e).splitlines()[0]}") from None
    if len(tokenizer) > vocab_size:  # ids past the embedding table: garbage in vLLM, an IndexError in training
        raise ConfigError(f"model.path {model_path!r}: its tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary only {vocab_size}: the tokenizer is not this model's")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError(f"the tokenizer of {paths.model_path} has neither a pad nor an eos token")

    # Prompt lengths are checked here, before any actor starts, with the engine's own encoding.
    limit = cfg.model.max_model_len - cfg.rollout.max_new_tokens
    skipped = {}
    for name, prompts in (("train", train_prompts), ("eval", eval_prompts)):
        kept, skipped[name] = drop_too_long(prompts, lambda p: encode_prompt(tokenizer, p, paths.model_path), limit,
                                            cfg.data.too_long, f"data.{name}_path {getattr(paths, name + '_path')}",
                                            unknown_id=tokenizer.unk_token_id)
        prompts[:] = kept
        if skipped[name]:
            log.warning("skipped %d %s prompt(s) longer than %d tokens (data.too_long=skip)", skipped[name], name,
                        limit)
    check_reward_config(cfg, train_prompts, paths.train_path)
    check_eval_judge(cfg, eval_prompts, paths.eval_path)
    if cfg.rollout.prompts_per_step > len(train_prompts):
        raise ConfigError(f"rollout.prompts_per_step ({cfg.rollout.prompts_per_step}) exceeds the "
                          f"{len(train_prompts)} prompts of {paths.train_path} that fit")

    if resumed is not None and resumed.extra.get("data") not in (None, data_fingerprint(train_prompts)):
        saved = resumed.extra["data"]
        log.warning("--resume: the training set differs from the checkpoint's (%d prompts now, %d then, or other "
                    "contents): its data position (pass %d, prompt %d) now indexes another order, so prompts may be "
                    "repeated or skipped", len(train_prompts), saved["prompts"], resumed.sampler_epoch,
                    resumed.sampler_position)
    updates_per_step = cfg.algorithm.ppo_epochs * cfg.algorithm.minibatches
    schedules = run_schedules(cfg.learner, cfg.algorithm, cfg.trainer.steps * updates_per_step)
    for name, peak_key in (("policy", "learner.lr"), ("critic", "learner.critic_lr"))[:1 + cfg.algorithm.uses_critic]:
        # A warning, not an error: a short smoke test of a long job's config is a fair use.
        if (warning := warmup_warning(schedules[name], name, peak_key)) is not None:
            log.warning("%s", warning)
    own = resume_from is not None and is_own_checkpoint(Path(resume_from), checkpoints)
    if not own:
        # Continuing none of this run's own checkpoints (a fresh start, `--resume auto` that found
        # none, another run's checkpoint by path), it must not mix with what an earlier run left
        # here: the Tracker would empty its metrics.jsonl.
        clear_earlier_run(run_dir, checkpoints, overwrite=cfg.run.overwrite)
    elif (aside := checkpoints.set_aside_after(resumed.step)) is not None:
        log.warning("resuming from step %d, an earlier checkpoint of this run: its later checkpoints belong to the "
                    "abandoned timeline and were moved to %s", resumed.step, aside)
    (run_dir / "error.txt").unlink(missing_ok=True)  # an earlier attempt's failure, now stale
    resolved = replace(cfg, model=replace(cfg.model, path=paths.model_path),
                       data=replace(cfg.data, train_path=paths.train_path, eval_path=paths.eval_path))
    tracker = Tracker(run_dir, project=cfg.run.wandb_project, name=cfg.run.name, mode=cfg.run.wandb_mode,
                      config={**to_dict(resolved), "data/skipped_too_long": skipped}, tags=cfg.run.wandb_tags, total_steps=cfg.trainer.steps,
                      run_id=resumed.wandb_run_id if resumed and own else None,
                      resume_step=resumed.step if resumed else None)
    pools = []
    registered = None
    try:
        init_ray(cfg)
        control = start_control(cfg)
        registered = register_job(cfg.run.name, ray.get_runtime_context().gcs_address, cfg.ray.namespace)
        # All actors start at once (vLLM engines, learner ranks and reward workers load in
        # parallel); then each pool waits for its own.
        learner = LearnerGroup(cfg, paths.model_path, total_updates=cfg.trainer.steps * updates_per_step)
        pools.append(learner)
        rollout = RolloutPool(cfg, paths.model_path)
        pools.append(rollout)
        reward = RewardPool(cfg, cfg.reward.model.path if cfg.reward.model else None)
        pools.append(reward)
        started = time.perf_counter()
        for pool in pools:
            pool.ready()
        log.info("actors ready in %.1f s: %d learner rank(s), %d rollout worker(s), %d reward worker(s)",
                 time.perf_counter() - started, len(learner.ranks), len(rollout.actors.members),
                 len(reward.actors.members))
        learner.check_shared(checkpoints.root, "trainer.checkpoint_dir")
        if cfg.trainer.export_final:
            learner.check_shared(run_dir, "run.dir", ranks=1)  # rank 0 writes final_model/
        collector = Collector(cfg, PromptSampler(train_prompts, seed=cfg.run.seed), rollout, reward)
        controller = Controller(cfg, control=control, collector=collector, eval_prompts=eval_prompts,
                                learner=learner, tracker=tracker, checkpoints=checkpoints,
                                model_path=paths.model_path, pad_token_id=pad_id, resume_from=resume_from)
        with stop_on_signal(controller):
            summary = controller.run()
        tracker.finish(asdict(summary))
        return summary
    except BaseException:
        tracker.abort()
        raise
    finally:
        if registered is not None:
            registered.unlink(missing_ok=True)
        for pool in reversed(pools):
            pool.shutdown()
        if ray.is_initialized():
            ray.shutdown()
