"""The config tree: YAML + overrides, and failing fast with the key named."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]

DEMO = REPO / "deploy" / "jobs" / "demo.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(DEMO, ["trainer.steps=2", "rollout.num_workers=2", "learner.lr=3e-4",
                             "algorithm.dual_clip=3", "run.wandb_tags=[a, b]"])
    assert cfg.trainer.steps == 2
    assert cfg.rollout.num_workers == 2
    assert cfg.learner.lr == pytest.approx(3e-4)
    assert cfg.algorithm.dual_clip == 3.0 and isinstance(cfg.algorithm.dual_clip, float)
    assert cfg.run.wandb_tags == ["a", "b"]
    assert cfg.run.path == Path("runs/demo")


@pytest.mark.parametrize("override, named", [
    ("no.such.key=1", "no.such.key"),
    ("trainer.stepz=3", "trainer.stepz"),
    ("trainer.steps.deeper=3", "trainer.steps.deeper"),
])
def test_unknown_key_is_named(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(DEMO, [override])


@pytest.mark.parametrize("override, message", [
    ("trainer.steps=abc", "trainer.steps: expected an integer"),
    ("trainer.steps=2.5", "trainer.steps: expected an integer"),
    ("rollout.temperature=hot", "rollout.temperature: expected a number"),
    ("learner.lr=true", "learner.lr: expected a number"),
    ("model.path=5", "model.path: expected a string"),
    ("trainer.steps=0", "trainer.steps must be >= 1"),
    ("algorithm.advantage_estimator=ppo2", "algorithm.advantage_estimator: 'ppo2' is not one of"),
    ("algorithm.dual_clip=0.5", "algorithm.dual_clip must be > 1"),
    ("rollout.max_new_tokens=64", "must be below model.max_model_len"),
    ("reward.on_failure=ignore", "reward.on_failure"),
    ("reward.isolation=fork", "reward.isolation: 'fork' is not one of process, thread"),
    ("rollout.kv_cache_gib=-1", r"rollout.kv_cache_gib must be > 0 .* \(got -1.0, 0.5\)"),
    ("rollout.gpu_memory_utilization=1.5", r"rollout.gpu_memory_utilization in \(0, 1\]"),
    ("rollout.num_cpus=-1", r"rollout.num_cpus must be >= 0 \(got -1.0\)"),
    ("reward.num_gpus=-0.5", "reward.num_gpus must be >= 0"),
    ("rollout.num_threads=0", "rollout.num_threads must be >= 1"),
    ("ray.num_cpus=0", "ray.num_cpus must be >= 1"),
    ("learner.num_gpus=-1", "learner.num_cpus and learner.num_gpus must be >= 0"),
    ("rollout.num_gpus=0.5", r"rollout.gpu_memory_utilization \(0.5\) must stay below rollout.num_gpus \(0.5\)"),
    ("learner.num_gpus=0.5", r"learner.num_gpus must be 0 \(CPU\) or 1 \(one GPU per rank"),
    ("learner.num_gpus=2", "more GPUs means a larger learner.world_size"),
    ("demo.num_layers=0", "demo.num_layers: bad value 0"),
    ("trainer.steps", "not of the form key=value"),
    ("rollout.timeout_s=0", r"rollout.timeout_s must be > 0 seconds \(got 0.0\)"),
    ("rollout.health_timeout_s=-1", "rollout.health_timeout_s must be > 0"),
    ("rollout.health_interval_s=0", "rollout.health_interval_s must be > 0"),
    ("reward.timeout_s=0", "reward.timeout_s must be > 0"),
    ("reward.max_restarts=-1", "reward.max_restarts must be >= 0"),
    ("data.eval_limit=-3", r"data.eval_limit must be >= 0 \(got -3\)"),
    # An empty value is most often an unset shell variable; it must not quietly mean "default".
    ("data.train_path=", r"'data.train_path=' has no value \(write data.train_path=null"),
    ("trainer.steps=[1", r"override 'trainer.steps=\[1': invalid YAML at line 1"),
    # A negative floor made the cosine schedule's rate negative: training away from the reward.
    ("learner.min_lr_ratio=-1", r"learner.min_lr_ratio must lie in \[0, 1\] \(got -1.0\)"),
    ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio must lie in"),
    ("learner.weight_decay=-0.1", "learner.weight_decay must be >= 0"),
    ("learner.max_grad_norm=-1", "learner.max_grad_norm must be >= 0"),
    ("learner.warmup_steps=-2", "learner.warmup_steps must be >= 0"),
    ("algorithm.kl_target=-1", "algorithm.kl_target must be > 0 and algorithm.kl_horizon >= 1"),
    ("algorithm.kl_horizon=0", None),  # only checked with an adaptive target: no error alone
    ("algorithm.critic_warmup_steps=-1", "algorithm.critic_warmup_steps must be >= 0"),
    ("reward.model={path: /rm, batch_size: 0}", "reward.model.batch_size must be >= 1"),
    ("run.seed=-1", r"run.seed must lie in \[0, 2\*\*32\)"),
    ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
    ("trainer.sample_table_every=-5", "trainer.sample_table_every must be >= 0"),
    ('rollout.stop=["", "\\n"]', "rollout.stop holds an empty string"),
])
def test_bad_values_fail_with_the_key(override, message):
    if message is None:
        load_config(DEMO, [override])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, [override])


def test_an_adaptive_kl_needs_a_horizon_and_a_starting_coefficient():
    with pytest.raises(ConfigError, match="algorithm.kl_horizon >= 1"):
        load_config(DEMO, ["algorithm.kl_coef=0.1", "algorithm.kl_target=0.01", "algorithm.kl_horizon=0"])
    with pytest.raises(ConfigError, match="adapts algorithm.kl_coef, which is 0"):
        load_config(DEMO, ["algorithm.kl_target=0.01"])
    adaptive = ["algorithm.kl_coef=0.1", "algorithm.kl_target=0.01", "algorithm.kl_place=loss", "algorithm.kl_estimator=k3"]
    assert load_config(DEMO, adaptive).algorithm.kl_target == 0.01


def test_a_config_file_that_is_a_directory_or_not_utf8_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml' cannot be read as UTF-8 text"):
        load_config(latin)


def test_yaml_unknown_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  num_wokers: 2\n")
    with pytest.raises(ConfigError, match="rollout.num_wokers"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_errors_name_the_file_and_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("rollout:\n  num_workers: 4\ntrainer:\n  steps: 2\nrollout:\n  num_workers: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml.*line 5: key 'rollout' is given twice"):
        load_config(twice)
    nested = tmp_path / "nested.yaml"
    nested.write_text("rollout:\n  num_workers: 4\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'num_workers' is given twice"):
        load_config(nested)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout:\n  num_workers: [2\ntrainer:\n  steps: 2\n")
    with pytest.raises(ConfigError, match=r"config file '.*broken.yaml': invalid YAML at line \d"):
        load_config(broken)
    # Merge keys may restate what they merge; that is not a duplicate.
    merged = tmp_path / "merged.yaml"
    merged.write_text("reward: &common {max_restarts: 3, num_workers: 2}\n"
                      "rollout:\n  <<: *common\n  num_workers: 5\n")
    cfg = load_config(merged)
    assert (cfg.rollout.max_restarts, cfg.rollout.num_workers, cfg.reward.num_workers) == (3, 5, 2)


def test_null_override_unsets_an_optional_value():
    assert load_config(DEMO, ["reward.model={path: /rm}", "reward.model=null"]).reward.model is None


def test_group_estimators_need_several_samples():
    with pytest.raises(ConfigError, match=r"rollout.samples_per_prompt must be >= 2 \(got 1\): "
                                          r"algorithm.advantage_estimator=grpo compares the samples of a prompt$"):
        load_config(DEMO, ["rollout.samples_per_prompt=1"])
    cfg = load_config(DEMO, ["rollout.samples_per_prompt=1", "algorithm.advantage_estimator=reinforce_pp"])
    assert cfg.rollout.samples_per_prompt == 1


@pytest.mark.parametrize("estimator, culprits", [
    # The estimator needs no groups: only the dynamic-sampling key is to blame, and named.
    ("reinforce_pp", "algorithm.dynamic_sampling=true compares"),
    ("rloo", "algorithm.advantage_estimator=rloo and algorithm.dynamic_sampling=true compare"),
])
def test_dynamic_sampling_with_one_sample_names_the_key_that_needs_more(estimator, culprits):
    with pytest.raises(ConfigError, match=rf"samples_per_prompt must be >= 2 \(got 1\): {culprits} the samples"):
        load_config(DEMO, ["rollout.samples_per_prompt=1", f"algorithm.advantage_estimator={estimator}",
                           "algorithm.dynamic_sampling=true"])


def test_reward_functions_by_name_or_mapping():
    cfg = load_config(None, ["reward.functions=[exact_match, {name: 'my_rewards:score', weight: 0.5}]"])
    assert [(f.name, f.weight) for f in cfg.reward.functions] == [("exact_match", 1.0), ("my_rewards:score", 0.5)]
    cfg = load_config(None, ["reward.model={path: /models/rm, weight: 0.3}"])
    assert cfg.reward.model.path == "/models/rm" and cfg.reward.model.weight == 0.3
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].wieght"):
        load_config(None, ["reward.functions=[{name: exact_match, wieght: 1}]"])


def test_defaults_validate():
    Config().validate()


def test_weight_transport_is_checked_and_auto_picks_by_cluster_shape():
    from cluster.pools import weight_transport

    with pytest.raises(ConfigError, match="rollout.weight_transport: 'nccl' is not one of auto, shared_memory"):
        load_config(None, ["rollout.weight_transport=nccl"])
    assert load_config(None, []).rollout.weight_transport == "auto"
    assert weight_transport("auto", nodes=1, autoscale=False) == "shared_memory"
    assert weight_transport("auto", nodes=2, autoscale=False) == "object_store"
    # An autoscaler may add a node before the next push: only the object store reaches it.
    assert weight_transport("auto", nodes=1, autoscale=True) == "object_store"
    assert weight_transport("object_store", nodes=1, autoscale=False) == "object_store"
    assert weight_transport("shared_memory", nodes=3, autoscale=True) == "shared_memory"


def test_reward_settings_are_checked_before_any_worker_starts(tmp_path, caplog):
    from actors.types import Prompt
    from cluster.preflight import check_reward_config

    def check(*overrides, prompts=(Prompt(index=0, text="1+1=", answer="2"),)):
        check_reward_config(load_config(DEMO, list(overrides)), list(prompts), "train.jsonl")

    check()  # the demo's exact_match resolves
    with pytest.raises(ConfigError, match=r"reward.functions\[0\].name: unknown reward function 'exact_mach': built-ins"):
        check("reward.functions=[exact_mach]")  # refused as the config loads
    with pytest.raises(ConfigError, match=r"reward.functions: .*'no_such_module_x:score'.*cannot import"):
        check("reward.functions=[no_such_module_x:score]")
    with pytest.raises(ConfigError, match=r"reward.model.path '.*rm' is not a model directory \(no config.json\)"):
        check(f"reward.model={{path: {tmp_path / 'rm'}}}")
    (tmp_path / "rm").mkdir()
    rm = f"reward.model={{path: {tmp_path / 'rm'}}}"
    # A causal LM would load with a random score head (and with a one-label config run to the
    # end scoring noise): refused by its config before any worker starts.
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                             "id2label": {"0": "LABEL_0"}}))
    with pytest.raises(ConfigError, match=r"is a LlamaForCausalLM architecture, not a sequence-classification"):
        check(rm)
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ConfigError, match=r"has 2 labels; a reward model has exactly one"):
        check(rm)
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                             "id2label": {"0": "LABEL_0"},
                                                             "max_position_embeddings": 512}))
    check(rm)
    check(f"reward.model={{path: {tmp_path / 'rm'}, max_length: 512}}")
    with caplog.at_level(logging.WARNING, logger="rlrelay"):  # texts the policy may write that it cannot see whole
        check(rm, "model.max_model_len=1024")
    assert "reward.model: texts over 512 tokens (of the reward model's tokenizer) are cut to their last 512" in caplog.text
    with pytest.raises(ConfigError, match=r"reward.model.max_length=600 exceeds the 512 positions"):
        check(f"reward.model={{path: {tmp_path / 'rm'}, max_length: 600}}")
    with pytest.raises(ConfigError, match="every weight is 0"):
        load_config(DEMO, ['reward.functions=[{"name": "exact_match", "weight": 0}]'])


@pytest.mark.parametrize("function, answer, message", [
    ("exact_match", None, "'exact_match' needs a reference answer, but the sample has none"),
    ("numeric_match", "forty-two", "'numeric_match' needs a numeric answer, got 'forty-two'"),
    ("keyword_contains", "", "'keyword_contains' got an empty or all-whitespace keyword ''"),
    ("keyword_contains", "  ", "'keyword_contains' got an empty or all-whitespace keyword '  '"),
])
def test_a_training_prompt_a_built_in_reward_cannot_score_is_named_before_start(function, answer, message):
    # Found after the actors started, this failed every sample of the first step.
    from actors.types import Prompt
    from cluster.data import DataError
    from cluster.preflight import check_reward_config

    prompts = [Prompt(index=0, text="1+1=", answer="2"), Prompt(index=7, text="2+2=", answer=answer)]
    with pytest.raises(DataError, match=rf"data.train_path train.jsonl: prompt 7: reward function {message}"):
        check_reward_config(load_config(DEMO, [f"reward.functions=[{function}]"]), prompts, "train.jsonl")
    # A user function decides for itself whether it needs an answer.
    check_reward_config(load_config(DEMO, ["reward.functions=[reward.rules:exact_match]"]), prompts, "train.jsonl")


def test_with_failures_scored_zero_unscorable_prompts_are_counted_not_refused(caplog):
    from actors.types import Prompt
    from cluster.preflight import check_reward_config

    prompts = [Prompt(index=0, text="1+1=", answer="2"), Prompt(index=3, line=5, text="hi", answer=None)]
    check_reward_config(load_config(DEMO, ["reward.on_failure=zero"]), prompts, "train.jsonl")
    assert ("exact_match cannot score 1 prompt(s) (e.g. prompt 3 (line 5)); with reward.on_failure=zero their "
            "samples score 0") in caplog.text
    caplog.clear()  # under drop they are not scored at all: the warning said 0 whatever the mode
    check_reward_config(load_config(DEMO, ["reward.on_failure=drop"]), prompts, "train.jsonl")
    assert "with reward.on_failure=drop their prompt groups leave the batch (reward/dropped_groups)" in caplog.text


def test_the_cli_and_the_config_do_not_import_torch():
    # `rlrelay --help` and `rlrelay config` stay instant (torch costs ~0.7 s and ~130 MiB a
    # process), and the bench's bare actor, which imports cluster.bench, stays bare.
    code = ("import sys; from cluster.cli import main; import cluster.bench; "
            "assert main(['config', 'deploy/jobs/demo.yaml', 'trainer.steps=3']) == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    assert '"steps": 3' in out.stdout


@pytest.mark.parametrize("overrides, message", [
    # Ray refused a placement bundle that reserves nothing, only after it had started.
    (["learner.num_cpus=0", "learner.num_gpus=0"], "learner.num_cpus and learner.num_gpus are both 0"),
    # A worker drives one device (its engine gets no tensor-parallel size): the rest sat idle.
    (["rollout.num_gpus=2"], r"rollout.num_gpus must be <= 1 \(got 2.0\).*tensor parallelism is not supported"),
    (["reward.num_gpus=1.5"], r"reward.num_gpus must be <= 1 \(got 1.5\).*tensor parallelism is not supported"),
    # The pipeline is one batch deep: 2 ran exactly as 1.
    (["trainer.async_staleness=2"], r"trainer.async_staleness must be 0 \(synchronous\) or 1 .* got 2"),
    # The policy trains only once the critic's warm-up is over.
    (["algorithm.advantage_estimator=gae", "algorithm.critic_warmup_steps=20", "trainer.steps=20"],
     r"algorithm.critic_warmup_steps \(20\) must be below trainer.steps \(20\)"),
])
def test_settings_that_fail_after_start_or_do_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, overrides)


def test_settings_beside_the_refused_ones_still_load():
    load_config(DEMO, ["learner.num_cpus=0", "learner.num_gpus=1"])  # the GPU alone makes a bundle
    load_config(DEMO, ["rollout.num_gpus=1", "reward.num_gpus=0.25", "trainer.async_staleness=1"])
    load_config(DEMO, ["algorithm.advantage_estimator=gae", "algorithm.critic_warmup_steps=19", "trainer.steps=20"])
    with pytest.raises(ConfigError, match="only advantage_estimator=gae has"):  # no critic: a key that would do nothing
        load_config(DEMO, ["algorithm.critic_warmup_steps=5"])


def test_reward_workers_have_their_own_start_and_health_timeouts():
    # A large reward model loading for over 600 s failed its start with no key to raise the limit.
    cfg = load_config(DEMO, ["reward.start_timeout_s=1800", "reward.health_timeout_s=60"])
    assert (cfg.reward.start_timeout_s, cfg.reward.health_timeout_s, cfg.reward.health_interval_s) == (1800, 60, 10)
    with pytest.raises(ConfigError, match="reward.start_timeout_s"):
        load_config(DEMO, ["reward.start_timeout_s=0"])


@pytest.mark.parametrize("name", ["", "  ", "..", "a/b", "../elsewhere"])
def test_a_run_name_that_is_not_one_path_component_is_refused(name):
    # It became the run directory runs/<name>: '' wrote into runs/ itself, '../x' outside it.
    with pytest.raises(ConfigError, match="run.name .* must be one non-empty path component"):
        load_config(DEMO, [f"run.name='{name}'"])


@pytest.mark.parametrize("override, message", [
    ("reward.functions=[{name: exact_mach}]", "reward.functions[0].name: unknown reward function 'exact_mach'"),
    ("trainer.eval_function=nope", "trainer.eval_function: unknown reward function 'nope'"),
    ("reward.functions=[{name: 'mod:'}]", "'mod:' must look like 'module:function'"),
])
def test_a_misspelt_reward_function_is_refused_with_the_config(override, message):
    # It passed `rlrelay config` and `submit`, and failed when the job started on the cluster.
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    load_config(None, ["reward.functions=[{name: numeric_match}, {name: 'my_rewards:length'}]"])  # the module is checked where it runs


def test_unknown_keys_of_mixed_types_are_named_not_a_sort_error(tmp_path):
    # YAML reads `1:` as an int and `on:` as a bool; sorting them beside strings raised TypeError.
    path = tmp_path / "job.yaml"
    path.write_text("1: a\nfoo: b\n")
    with pytest.raises(ConfigError, match="unknown config key '1'"):
        load_config(path)


def test_a_dotted_key_in_yaml_is_told_to_nest(tmp_path):
    # `run.name: x` is one key with a dot in YAML; the fix is not obvious from "unknown key".
    path = tmp_path / "job.yaml"
    path.write_text("run.name: x\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'run.name'.*in YAML nest it, run: then name:"):
        load_config(path)
    path.write_text("trainer:\n  eval.every: 2\n")  # a dot under a section with no such field: no hint
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.eval.every' \(known keys here: [^)]*\)$"):
        load_config(path)


def test_a_section_given_without_its_required_key_names_the_key():
    # It was Python's "__init__() missing 1 required keyword-only argument".
    with pytest.raises(ConfigError, match=r"^reward.model.path: required in reward.model, and not given$"):
        load_config(None, ["reward.model.weight=2"])
