"""User mistakes on the command line get one line naming the problem and a non-zero exit,
before any actor starts; none hangs. Found by adversarial QA, each a traceback or a hang before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from cluster import argtypes
from cluster.cli import main
from learner.tokenizer import build_char_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "deploy" / "jobs" / "demo.yaml")


def train_data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(80)))
    return path


def run_overrides(tmp_path: Path, *more: str) -> list[str]:
    return [f"data.train_path={train_data(tmp_path)}", f"run.dir={tmp_path / 'runs'}", "data.eval_path=null", *more]


def test_a_resume_path_that_is_no_checkpoint_is_a_config_error(tmp_path, capsys):
    assert main(["train", DEMO, *run_overrides(tmp_path), "--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: not a complete rlrelay checkpoint" in capsys.readouterr().err


def test_overrides_after_an_option_are_overrides(tmp_path, capsys):
    # `train CONFIG --resume auto key=value` (as the README writes it) used to stop at argparse's
    # "unrecognized arguments"; the override must reach the config, here to be refused by name.
    with pytest.raises(SystemExit) as refused:
        main(["train", DEMO, *run_overrides(tmp_path), "--resume", "auto", "trainer.steps=-1"])
    assert refused.value.code == 2
    assert "config error: trainer.steps must be >= 1 (got -1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # what is not key=value is still an error
        main(["train", DEMO, "--resume", "auto", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_exporting_what_is_no_checkpoint_is_named(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere is not a complete rlrelay checkpoint" in capsys.readouterr().err


def test_a_model_path_that_is_no_local_directory_is_not_looked_up_on_the_hub(tmp_path, capsys):
    # A relative name used to go to the model hub (a minute of waiting for the network here).
    assert main(["train", DEMO, *run_overrides(tmp_path, "model.path=my-policy-typo")]) == 2
    assert "model.path 'my-policy-typo' is not a directory" in capsys.readouterr().err


def test_a_model_directory_without_config_json_is_refused_before_ray_starts(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    assert main(["train", DEMO, *run_overrides(tmp_path, f"model.path={tmp_path / 'empty-model'}")]) == 2
    assert "empty-model' has no config.json: not a Hugging Face model directory" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path, capsys):
    model = tmp_path / "model"
    build_char_tokenizer("0123456789+=abcdefghijklmnopqrstuvwxyz", model)  # 42 tokens
    LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    assert main(["train", DEMO, *run_overrides(tmp_path, f"model.path={model}")]) == 2
    assert "its tokenizer has 42 tokens but the model's vocabulary only 16" in capsys.readouterr().err


def test_an_unreachable_cluster_address_fails_within_the_join_timeout():
    # Ray retries an address where nothing answers for many minutes; the command gives up.
    code = ("import cluster.jobs as jobs; jobs.JOIN_TIMEOUT_S = 3; from cluster.cli import main; "
            "raise SystemExit(main(['status', '--address', '127.0.0.1:1', '--job', 'x']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no Ray cluster answered at '127.0.0.1:1' within 3 s" in out.stderr


@pytest.mark.parametrize("argv, message", [
    (["bench", "scale", "--workers", "4,abc"], "argument --workers: expected an integer, got 'abc'"),
    (["bench", "scale", "--steps", "0"], "argument --steps: must be >= 1, got '0'"),
    (["bench", "rollout", "--repeats", "0"], "argument --repeats: must be >= 1"),
    (["bench", "learner", "--micro-tokens", "-5"], "argument --micro-tokens: must be >= 0"),
    (["plan", DEMO, "--gpu-memory-gib", "nan"], "argument --gpu-memory-gib: must be a finite number, got 'nan'"),
    (["scale", "--rollout", "0"], "argument --rollout: must be >= 1, got '0'"),
    (["scale", "--rollout", "2", "--wait", "-1"], "argument --wait: must be >= 0"),
    (["stop", "some-job", "--timeout", "nan"], "argument --timeout: must be a finite number, got 'nan'"),
    (["logs", "some-job", "--follow", "--timeout", "0"], "argument --timeout: must be > 0"),
    (["submit", DEMO, "--wait", "--timeout", "inf"], "argument --timeout: must be a finite number"),
])
def test_bad_numbers_on_the_command_line_are_refused_by_their_flag(argv, message, capsys):
    # Each used to fail minutes later in the bench (or the job) with a traceback.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_argument_types_accept_what_they_should():
    assert argtypes.positive_ints(" 4, 8,16 ") == [4, 8, 16]
    assert argtypes.count("0") == 0 and argtypes.nonnegative_number("0.0") == 0.0
    assert argtypes.positive_number("1e-3") == 0.001


def test_a_driver_that_joined_a_cluster_exits_cleanly_on_sigterm():
    # ray.init sets SIGTERM -> SystemExit only on the main thread; join_cluster runs it on
    # another (to bound it), so it sets the handler itself: a stopped job still runs its
    # clean-up (finally blocks, atexit: the pools' shutdown) instead of dying at once.
    code = ("import os, signal, time, atexit, cluster.jobs as jobs\n"
            "jobs.JOIN_TIMEOUT_S = 2\n"
            "try:\n    jobs.join_cluster('127.0.0.1:1')\nexcept jobs.ClusterUnreachable:\n    pass\n"
            "atexit.register(print, 'cleaned up', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(60)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 15 and "cleaned up" in out.stdout, (out.returncode, out.stderr[-2000:])
    assert "SIGTERM handler is not set" not in out.stderr


def test_resuming_a_checkpoint_past_trainer_steps_is_refused(tmp_path, capsys):
    # Resumed, such a run ended at once and wrote its step-2 checkpoint from step-4 weights,
    # replacing the real one.
    import dataclasses

    from cluster.checkpoints import DriverState

    ckpt = tmp_path / "step-000004"
    (ckpt / "learner").mkdir(parents=True)
    state = DriverState(step=4, version=4, sampler_epoch=0, sampler_position=32, kl_controller={},
                        reward_normalizer=None, wandb_run_id=None, eval_before=None)
    (ckpt / "driver.json").write_text(json.dumps(dataclasses.asdict(state)))
    (ckpt / "learner_ranks.json").write_text("[]")
    assert main(["train", DEMO, *run_overrides(tmp_path, "trainer.steps=2"), "--resume", str(ckpt)]) == 2
    assert f"checkpoint {ckpt} is at step 4, past trainer.steps=2" in capsys.readouterr().err


def test_ctrl_c_before_the_runs_own_handler_is_one_line(tmp_path, monkeypatch, capsys):
    import cluster.launch

    def interrupted(cfg, resume=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cluster.launch, "train", interrupted)
    assert main(["train", DEMO, *run_overrides(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == \
        "rlrelay: interrupted (`--resume auto` continues from the latest checkpoint, if any)"


def test_resuming_with_another_estimator_or_model_shape_is_refused_before_start(tmp_path, capsys):
    # Adding a critic failed only when the learner loaded the checkpoint, after every actor
    # had started; dropping one was silent.
    import dataclasses

    from cluster.checkpoints import DriverState, run_signature

    model = tmp_path / "model"
    build_char_tokenizer("0123456789+=", model)
    LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)

    def checkpoint(name: str, signature: dict):
        ckpt = tmp_path / name
        (ckpt / "learner").mkdir(parents=True)
        state = DriverState(step=1, version=1, sampler_epoch=0, sampler_position=8, kl_controller={},
                            reward_normalizer=None, wandb_run_id=None, eval_before=None,
                            extra={"signature": signature})
        (ckpt / "driver.json").write_text(json.dumps(dataclasses.asdict(state)))
        (ckpt / "learner_ranks.json").write_text("[]")
        return ckpt

    grpo = checkpoint("grpo", run_signature(False, str(model)))
    overrides = run_overrides(tmp_path, f"model.path={model}", "algorithm.advantage_estimator=gae")
    assert main(["train", DEMO, *overrides, "--resume", str(grpo)]) == 2
    assert f"checkpoint {grpo} has no critic, this job's algorithm.advantage_estimator needs one" in \
        capsys.readouterr().err
    wider = checkpoint("wider", {**run_signature(False, str(model)), "model": {"hidden_size": 64}})
    assert main(["train", DEMO, *run_overrides(tmp_path, f"model.path={model}"), "--resume", str(wider)]) == 2
    assert f"checkpoint {wider} holds a policy of shape {{'hidden_size': 64}}" in capsys.readouterr().err


def test_a_broken_pipe_ends_a_printing_command_but_not_a_training_driver(monkeypatch):
    # A driver that took SIGPIPE's default died (rc 141, no checkpoint, no error.txt) when
    # W&B's service process went away; `rlrelay config | head` should still end quietly.
    import signal

    from cluster import cli

    seen = {}

    def record(name):
        def handler(args):
            seen[name] = signal.getsignal(signal.SIGPIPE)
            return 0
        return handler

    monkeypatch.setattr(cli, "train_command", record("train"))
    monkeypatch.setattr(cli, "config_command", record("config"))
    before = signal.getsignal(signal.SIGPIPE)
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's own start-up setting
        assert cli.main(["train", DEMO]) == 0
        assert cli.main(["config", DEMO]) == 0
    finally:
        signal.signal(signal.SIGPIPE, before)
    assert seen == {"train": signal.SIG_IGN, "config": signal.SIG_DFL}


def test_a_cluster_without_authentication_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    # The refusal came after the demo's data was built, the run directory made and W&B started.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    run_dir = tmp_path / "run"
    argv = ["train", DEMO, f"run.dir={run_dir}", f"run.cache_dir={tmp_path / 'cache'}", "--address", "10.0.0.7:6379"]
    assert main(argv) == 2
    assert "refused: the Ray cluster at 10.0.0.7:6379 is on another host" in capsys.readouterr().err
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_a_bad_model_path_is_named_before_the_demo_data_is_built_for_it(tmp_path, capsys):
    # With no data.train_path the demo's problems are generated, and its warm-start trained
    # (a minute), before model.path was looked at.
    argv = ["train", DEMO, "model.path=/no/such/model", f"run.dir={tmp_path / 'run'}",
            f"run.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 2
    assert "model.path '/no/such/model' is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_a_reward_module_in_the_working_directory_resolves_under_the_console_script(tmp_path):
    # `rlrelay` (the console script) starts with its own directory on sys.path, not the
    # working directory, so `my_rewards:score` next to the user's config was "not found"
    # though the reward workers (which get the working directory on PYTHONPATH) would find it.
    (tmp_path / "my_rewards.py").write_text("def score(prompt, response, answer):\n    return 1.0\n")
    model = tmp_path / "model"  # a tokenizer and a config are all the driver reads before the check
    build_char_tokenizer("0123456789+=", model)
    LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(model)
    rlrelay = Path(sys.executable).parent / "rlrelay"
    overrides = run_overrides(tmp_path, 'reward.functions=[{"name": "my_rewards:score"}]', f"model.path={model}",
                              "rollout.prompts_per_step=1000")  # fails right after the reward check
    out = subprocess.run([str(rlrelay), "train", DEMO, *overrides], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rollout.prompts_per_step (1000) exceeds the 80 prompts" in out.stderr, out.stderr[-2000:]


def test_the_dashboard_port_without_a_scheme_is_refused_naming_the_fix(capsys):
    # A cluster address (HOST:6379, as RAY_ADDRESS holds it) is fine: Ray finds the dashboard.
    with pytest.raises(SystemExit) as exit_:
        main(["jobs", "--address", "10.0.0.7:8265"])
    assert exit_.value.code == 2
    assert "names the dashboard's port without a scheme: use http://10.0.0.7:8265" in capsys.readouterr().err


def test_status_with_no_job_from_this_machine_and_no_address_says_so(tmp_path, monkeypatch, capsys):
    # It used to join `auto`, whichever Ray instance started last here, maybe another user's.
    monkeypatch.setenv("RLRELAY_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert "no job started from this machine is running" in str(exit_.value.code)
    assert "--address HOST:PORT" in str(exit_.value.code)


@pytest.mark.parametrize("address, message", [
    ("", "is empty"),  # an unset shell variable: it started a local instance instead of joining
    ("http://127.0.0.1:1", "is a job API (dashboard) URL, which submit, jobs, logs and stop take"),
])
def test_a_cluster_address_that_is_empty_or_the_job_api_url_is_refused_before_anything_starts(address, message,
                                                                                              capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(REPO / "deploy/jobs/demo.yaml"), "--address", address])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "config error: ray.address" in err and message in err, err
    with pytest.raises(SystemExit) as exit_:  # was a traceback (http) or a local instance started
        main(["status", "--address", address])
    assert message in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:
        main(["scale", "--rollout", "2", "--address", "local"])
    assert "look into a running cluster" in str(exit_.value.code)


def test_submit_resume_with_a_relative_run_directory_is_refused(capsys):
    # The job's relative run directory lives in its own copy of the working directory, gone
    # with it: `--resume auto` would find nothing and start afresh without a word.
    assert main(["submit", DEMO, "--resume", "auto", "--address", "http://127.0.0.1:1"]) == 2
    assert "--resume needs the checkpoints on storage the cluster keeps (an absolute run.dir)" in \
        capsys.readouterr().err


def test_submit_resume_checks_where_the_checkpoints_go(tmp_path, monkeypatch, capsys):
    # trainer.checkpoint_dir, when set, holds the checkpoints: a relative one passed (and went
    # away with the job), an absolute one beside a relative run.dir was refused.
    from cluster import jobs

    def connect(address, *, allow_insecure):  # past the checks: nothing is sent
        raise SystemExit("connecting")

    def submit(*overrides: str) -> int:
        return main(["submit", DEMO, *overrides, "--resume", "auto", "--address", "http://127.0.0.1:1"])

    monkeypatch.setattr(jobs, "_connect", connect)
    assert submit(f"run.dir={tmp_path / 'runs'}", "trainer.checkpoint_dir=ckpt") == 2
    assert "an absolute trainer.checkpoint_dir); trainer.checkpoint_dir ckpt is relative" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="connecting"):
        submit(f"trainer.checkpoint_dir={tmp_path / 'ckpt'}")  # run.dir stays relative


def test_eval_accuracy_is_judged_by_the_jobs_reward_not_always_exact_match(tmp_path, capsys):
    # A GSM8K-style job scores with numeric_match; its eval compared whole responses with the
    # answer (exact_match), so eval/accuracy stayed near 0 all run.
    from cluster.config import load_config

    assert load_config(DEMO).eval_judge() == "exact_match"
    numeric = load_config(DEMO, ['reward.functions=[{"name": "numeric_match"}]'])
    assert numeric.eval_judge() == "numeric_match"
    assert load_config(DEMO, ['reward.functions=[{"name": "numeric_match"}]', "trainer.eval_function=exact_match"]) \
        .eval_judge() == "exact_match"

    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "2+2=", "answer": "four"}) + "\n")
    argv = ["train", DEMO, *run_overrides(tmp_path, f"data.eval_path={evals}", "trainer.eval_function=numeric_match")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.eval_path {evals}: prompt 1 (line 2): eval judge numeric_match" in err
    with pytest.raises(SystemExit) as exit_:  # refused as the config loads
        main(["train", DEMO, *run_overrides(tmp_path, "trainer.eval_function=nope")])
    assert exit_.value.code == 2
    assert "trainer.eval_function: unknown reward function 'nope'" in capsys.readouterr().err


def test_a_bench_whose_job_config_is_invalid_says_so_in_one_line(capsys):
    # bench scale builds a job config from its flags; one a job refuses was a ConfigError traceback.
    assert main(["bench", "scale", "--samples", "1"]) == 2
    assert "rlrelay: bench scale: rollout.samples_per_prompt must be >= 2" in capsys.readouterr().err
