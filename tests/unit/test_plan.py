"""``rlrelay plan``: parameter counts equal the real models', the memory model's terms are the
documented formulas, and the advice follows the ladder (the command itself: test_plan_command.py).

The planner-versus-measured comparison (a real forward/backward/AdamW step on CPU) is in
``tests/integration/test_plan_measured.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.memory_advice import advise, largest_micro_batch
from cluster.architecture import Architecture, PlanError
from cluster.memory_model import (GIB, LOSS_CHUNK_TOKENS, LearnerShape, MemoryOptions, activation_bytes,
                                  forward_logits_bytes, layer_activation_bytes, logits_bytes, memory_options,
                                  plan_memory, trained_state, value_head_bytes)
from cluster.plan import KNOWN_CONFIGS, resolve_architecture

REPO = Path(__file__).resolve().parents[2]

# config.json fields (public numbers for the known models; small ones for bias variants).
SMALL_CONFIGS = {
    "llama-untied-gqa": dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             tie_word_embeddings=False),
    "llama-tied-biases": dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                              attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-untied": dict(model_type="qwen2", vocab_size=1000, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    "mistral-head-dim": dict(model_type="mistral", vocab_size=1000, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             tie_word_embeddings=False),
}
ALL_CONFIGS = SMALL_CONFIGS | KNOWN_CONFIGS


def qwen_05b() -> Architecture:
    return Architecture.from_hf_config(KNOWN_CONFIGS["Qwen2.5-0.5B-Instruct"])


def shape(**kw) -> LearnerShape:
    base = dict(world_size=4, micro_batch_size=8, seq_len=1024, response_len=512, mixed_precision=True,
                critic=False, reference=False)
    return LearnerShape(**base | kw)


# -- parameter counts ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_parameter_counts_equal_the_transformers_model_on_meta(name, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(ALL_CONFIGS[name]))
    config = AutoConfig.from_pretrained(tmp_path)
    arch = Architecture.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config)
        trunk = AutoModel.from_config(config)
    assert arch.policy_params == sum(p.numel() for p in policy.parameters())  # tied: counted once
    # The critic is the trunk plus Linear(hidden, 1) (learner/models.py).
    assert arch.critic_params == sum(p.numel() for p in trunk.parameters()) + config.hidden_size + 1
    assert arch.block_params == sum(p.numel() for p in policy.model.layers[0].parameters())


def test_known_architectures_have_their_published_sizes():
    sizes = {name: Architecture.from_hf_config(c).policy_params for name, c in KNOWN_CONFIGS.items()}
    assert sizes == {"Qwen2.5-0.5B-Instruct": 494_032_768, "Qwen2.5-1.5B-Instruct": 1_543_714_304,
                     "Qwen2.5-7B-Instruct": 7_615_616_512, "Meta-Llama-3-8B-Instruct": 8_030_261_248}


def test_demo_architecture_is_the_demo_model():
    from cluster.demo import ALPHABET, DemoSettings, build_policy
    from cluster.plan import demo_architecture
    from learner.tokenizer import build_char_tokenizer

    settings = DemoSettings()
    model = build_policy(settings, vocab_size=len(build_char_tokenizer(ALPHABET)))
    assert demo_architecture(settings).policy_params == sum(p.numel() for p in model.parameters())


def test_unknown_architecture_is_refused():
    with pytest.raises(PlanError, match="gpt2"):
        Architecture.from_hf_config({"model_type": "gpt2"})


# -- the memory model ------------------------------------------------------------------------

def test_trained_state_is_fp32_shards_with_master_weights_under_bf16():
    n = qwen_05b().policy_params
    fp32 = trained_state(n, 1, mixed=False)
    assert (fp32.parameters, fp32.gradients, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    bf16 = trained_state(n, 4, mixed=True)  # fp32 shard = master weights, under optimizer state
    shard = math.ceil(n / 4)
    assert (bf16.parameters, bf16.gradients, bf16.optimizer) == (0, 4 * shard, 12 * shard)


def test_activation_formula_by_hand():
    # This pins the formula the module docstring documents, term by term, against edits; that the
    # formula is right is checked against measured memory in tests/integration/test_plan_measured.py.
    # Qwen2.5-0.5B, bf16, seq 1024: h 896, q 896 (kv heads repeated, so k and v are q-sized), i 4864.
    per_layer = 2 * (4 * 896 + 2 * 2 * 896 + 4) + 2 * (4 * 896) + 4 * 14 + 2 * 1024 + 4 * 2 * 4864
    assert layer_activation_bytes(qwen_05b(), 2, 1024) == per_layer == 62_528
    outside = 4 * 896 + 2 * 2 * 896 + 4 + 8 + 1024
    assert activation_bytes(qwen_05b(), 8, 1024, 2, False) == 8 * 1024 * (24 * per_layer + outside)
    checkpointed = 8 * 1024 * (24 * 2 * 896 + per_layer + outside)
    assert activation_bytes(qwen_05b(), 8, 1024, 2, True) == checkpointed
    assert checkpointed < activation_bytes(qwen_05b(), 8, 1024, 2, False) / 10


def test_logits_formula_by_hand():
    # Pins the documented terms (measured: test_plan_measured.py, both head paths, fp32 and bf16).
    v, h = 151936, 896
    # Chunked head, 16 x 512 response tokens in bf16: hidden states and their gradient, the
    # head's fp32 gradient plus a bf16 product and cast, one chunk of 1024 at 14 bytes.
    assert logits_bytes(qwen_05b(), 16, 1024, 512, 2) == 2 * 2 * 16 * 512 * h + (4 + 4) * v * h + 14 * 1024 * v
    # In fp32 the gradient accumulates in place; one small chunk: all 32 response tokens.
    assert logits_bytes(qwen_05b(), 1, 64, 32, 4) == 2 * 4 * 32 * h + 4 * v * h + 12 * 32 * v
    assert forward_logits_bytes(qwen_05b(), 1, 64, 32, 2) == 12 * 32 * v
    # The model's own lm_head: the window's logits (as wide as the sequence when prompts differ
    # in length), the response columns gathered from it, 12 kept fp32 bytes, one chunk of 1024.
    assert logits_bytes(qwen_05b(), 16, 1024, 512, 2, chunked=False) == \
        2 * 16 * 1024 * v + 2 * 16 * 512 * v + 12 * 16 * 512 * v + 18 * 1024 * v
    assert logits_bytes(qwen_05b(), 1, 64, 32, 4, chunked=False) == 4 * 64 * v + 4 * 32 * v + 12 * 32 * v + 16 * 32 * v
    assert forward_logits_bytes(qwen_05b(), 1, 64, 32, 2, chunked=False) == 2 * 64 * v + 2 * 32 * v + 12 * 32 * v
    # The point of the chunked head: a fifth of the memory at this size.
    assert logits_bytes(qwen_05b(), 16, 1024, 512, 2) < logits_bytes(qwen_05b(), 16, 1024, 512, 2, chunked=False) / 5


def test_loss_chunk_is_the_learners():
    from learner import head, losses

    assert LOSS_CHUNK_TOKENS == losses._CHUNK_TOKENS == head.CHUNK_TOKENS


def test_full_sharding_gathers_root_and_two_blocks_in_backward_grad_op_keeps_all():
    arch = qwen_05b()
    job = shape(critic=True, reference=True)
    full = plan_memory(arch, job, MemoryOptions(sharding="full"))
    # The critic's peak is its blocks' backward: root (no lm_head) and two blocks gathered in bf16.
    assert full.active["critic"].parameters == 2 * (arch.critic_root_params + 2 * arch.block_params)
    # The policy's peak is the loss on the logits, when every block is resharded and the root is not.
    assert full.active["policy"].parameters == 2 * arch.policy_root_params and full.active["policy"].logits > 0
    grad_op = plan_memory(arch, job, MemoryOptions(sharding="grad_op"))
    # The trained models are never resharded after a forward: their bf16 copies stay. The
    # frozen reference is (no backward follows that would free it): only its fp32 shard stays.
    assert grad_op.resident["reference"].parameters == 4 * math.ceil(arch.policy_params / 4)
    assert grad_op.resident["critic"].parameters == 2 * arch.critic_params
    assert grad_op.total_bytes > full.total_bytes


def test_sharding_divides_the_state_and_none_replicates_it():
    arch = qwen_05b()
    full4 = plan_memory(arch, shape(world_size=4), MemoryOptions()).resident["policy"]
    full8 = plan_memory(arch, shape(world_size=8), MemoryOptions()).resident["policy"]
    none8 = plan_memory(arch, shape(world_size=8), MemoryOptions(sharding="none")).resident["policy"]
    assert full8.optimizer == math.ceil(arch.policy_params / 8) * 12
    assert abs(full4.optimizer - 2 * full8.optimizer) <= 12
    assert none8.optimizer == 12 * arch.policy_params


def test_offloads_move_state_to_the_host():
    arch = qwen_05b()
    job = shape(critic=True, reference=True)
    base = plan_memory(arch, job, MemoryOptions())
    ref_off = plan_memory(arch, job, MemoryOptions(reference_offload=True))
    assert ref_off.resident["reference"].total == 0 and ref_off.resident["policy"] == base.resident["policy"]
    assert ref_off.host_bytes == base.resident["reference"].total
    cpu = plan_memory(arch, job, MemoryOptions(cpu_offload=True))
    assert all(fp.total == 0 for fp in cpu.resident.values())
    assert cpu.host_bytes == sum(fp.total for fp in base.resident.values())
    assert cpu.total_bytes < base.total_bytes


def test_peak_is_the_policy_step_with_critic_and_reference_resident():
    arch = qwen_05b()
    result = plan_memory(arch, shape(critic=True, reference=True), MemoryOptions())
    assert result.peak_model == "policy"  # the logits make the policy's step the larger
    expected = result.active["policy"] + result.resident["policy"] + result.resident["critic"] \
        + result.resident["reference"]
    assert result.peak == expected
    assert result.total_bytes == result.peak.total + result.overhead_bytes


def test_the_critics_float32_value_head_keeps_a_copy_of_the_hidden_states_under_bf16():
    # Part of the critic's loss phase; its blocks' backward (which follows the head's, once the
    # copy is freed) is the larger phase on this model.
    arch = qwen_05b()
    assert value_head_bytes(arch, 8, 1024, c=2) == 4 * 8 * 1024 * 896
    assert value_head_bytes(arch, 8, 1024, c=4) == 0


def test_fits_against_the_margin():
    result = plan_memory(qwen_05b(), shape(), MemoryOptions(gpu_memory_gib=80))
    assert result.usable_bytes == int(0.9 * 80 * GIB)
    tight = plan_memory(qwen_05b(), shape(), MemoryOptions(gpu_memory_gib=result.total_bytes / GIB / 0.9 - 0.01))
    assert result.fits and not tight.fits


# -- advice ----------------------------------------------------------------------------------

def test_advice_turns_on_activation_checkpointing_first():
    arch = Architecture.from_hf_config(KNOWN_CONFIGS["Qwen2.5-7B-Instruct"])
    job = shape(world_size=8, micro_batch_size=8, critic=True, reference=True)
    steps = advise(arch, job, MemoryOptions())
    assert [r.setting for r, _ in steps] == ["learner.activation_checkpointing=true"]
    assert steps[0][1].fits and not plan_memory(arch, job, MemoryOptions()).fits


def test_advice_climbs_the_ladder_in_order_and_skips_what_is_on():
    arch = Architecture.from_hf_config(KNOWN_CONFIGS["Meta-Llama-3-8B-Instruct"])
    job = shape(world_size=1, micro_batch_size=4, reference=True)
    steps = advise(arch, job, MemoryOptions(sharding="grad_op"))
    assert [r.setting for r, _ in steps] == ["learner.activation_checkpointing=true",
                                             "learner.reference_offload=true", "learner.sharding=full",
                                             "learner.cpu_offload=true"]
    totals = [p.total_bytes for _, p in steps]
    assert totals == sorted(totals, reverse=True) and steps[-1][1].fits
    # Rungs already on are skipped: checkpointing is on and sharding is full already.
    turned_on = advise(arch, job, MemoryOptions(activation_checkpointing=True))
    assert [r.setting for r, _ in turned_on] == ["learner.reference_offload=true", "learner.cpu_offload=true"]
    no_reference = advise(arch, shape(world_size=1, micro_batch_size=4), MemoryOptions())
    assert "learner.reference_offload=true" not in [r.setting for r, _ in no_reference]
    assert advise(qwen_05b(), shape(), MemoryOptions()) == []  # fits: nothing to do


def test_a_token_budget_plans_its_worst_case_rows():
    """A budget of 8 full-length rows plans the activations of micro-batch 8; the logits are for
    the rows of a one-token prompt and a full response that fill the same budget."""
    arch, rows = qwen_05b(), shape(micro_batch_size=8)
    budget = shape(micro_batch_size=1, micro_batch_tokens=8 * 1024)
    assert budget.micro_rows == (8, math.ceil(8 * 1024 / 513))
    by_rows, by_tokens = plan_memory(arch, rows, MemoryOptions()), plan_memory(arch, budget, MemoryOptions())
    assert by_tokens.active["policy"].activations == by_rows.active["policy"].activations
    assert by_tokens.active["policy"].logits == logits_bytes(arch, 16, 1024, 512, 2)
    # A budget below one full row still plans a full row: a longer row runs alone.
    assert shape(micro_batch_tokens=100).micro_rows == (1, 2)
    huge = Architecture.from_hf_config(KNOWN_CONFIGS["Qwen2.5-7B-Instruct"])
    job = shape(world_size=8, micro_batch_tokens=16 * 1024)
    assert not plan_memory(huge, job, MemoryOptions()).fits
    fitting = largest_micro_batch(huge, job, MemoryOptions())  # the budget in whole 1024-token rows
    assert fitting % 1024 == 0 and 0 < fitting < 16 * 1024
    assert plan_memory(huge, shape(world_size=8, micro_batch_tokens=fitting), MemoryOptions()).fits
    assert not plan_memory(huge, shape(world_size=8, micro_batch_tokens=fitting + 1024), MemoryOptions()).fits


def test_the_largest_micro_batch_is_the_linear_search_s_answer_and_quick_for_a_huge_one(capsys):
    huge = Architecture.from_hf_config(KNOWN_CONFIGS["Qwen2.5-7B-Instruct"])
    for world in (1, 2, 8):
        job = shape(world_size=world, micro_batch_size=40)
        linear = next((mb for mb in range(40, 0, -1)
                       if plan_memory(huge, shape(world_size=world, micro_batch_size=mb), MemoryOptions()).fits), 0)
        assert largest_micro_batch(huge, job, MemoryOptions()) == linear
    # It counted down one row at a time: minutes (killed after 60 s) for this override.
    config = str(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")
    assert main(["plan", config, "learner.micro_batch_size=100000000"]) == 0
    assert "learner.micro_batch_size=" in capsys.readouterr().out


# -- inputs from the config and the command line ---------------------------------------------

def test_memory_options_come_from_the_config_and_flags_override_them():
    cfg = load_config(REPO / "deploy/jobs/demo.yaml")
    assert memory_options(cfg.learner) == MemoryOptions()
    cfg = load_config(REPO / "deploy/jobs/demo.yaml", ["learner.sharding=grad_op", "learner.gpu_memory_gib=40",
                                                       "learner.activation_checkpointing=true"])
    assert memory_options(cfg.learner) == MemoryOptions(sharding="grad_op", gpu_memory_gib=40.0,
                                                        activation_checkpointing=True)
    options = memory_options(cfg.learner, sharding="none", activation_checkpointing=None, cpu_offload=True)
    assert options == MemoryOptions(sharding="none", gpu_memory_gib=40.0, activation_checkpointing=True,
                                    cpu_offload=True)
    with pytest.raises(PlanError, match="gpus_per_node must be >= 1"):
        memory_options(cfg.learner, gpus_per_node=0)


def test_learner_shape_from_a_job_config():
    cfg = load_config(REPO / "deploy/jobs/gsm8k-0.5b-rm-1node.yaml")
    assert LearnerShape.from_config(cfg) == LearnerShape(
        world_size=4, micro_batch_size=8, seq_len=1024, response_len=512, mixed_precision=True,
        critic=True, reference=True)


def test_architecture_sources(tmp_path):
    cfg = load_config(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml")  # /models/... is not here
    arch, source = resolve_architecture(cfg, None)
    assert arch == qwen_05b() and "does not exist here" in source and "built-in table" in source
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMALL_CONFIGS["qwen2-tied"]))
    for given in (model_dir, model_dir / "config.json"):
        arch, source = resolve_architecture(cfg, str(given))
        assert arch.hidden_size == 64 and "--model-config" in source
    local = load_config(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml", [f"model.path={model_dir}"])
    assert resolve_architecture(local, None) == (arch, str(model_dir / "config.json"))
    unknown = load_config(REPO / "deploy/jobs/gsm8k-0.5b-verifier-1node.yaml", ["model.path=/models/nope"])
    with pytest.raises(PlanError, match="--model-config"):
        resolve_architecture(unknown, None)


# -- bad model configs and edge cases ----------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be a positive integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
])
def test_a_malformed_config_json_is_named_not_planned(change, message):
    # A ZeroDivisionError, a TypeError, or a "FITS" verdict for -0.1M parameters.
    config = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, **change}
    with pytest.raises(PlanError, match=message):
        Architecture.from_hf_config(config)
    with pytest.raises(PlanError, match="holds a list, not a JSON object"):
        Architecture.from_hf_config([config])


def test_offloading_saves_nothing_on_a_cpu_learner_and_is_not_advised():
    # The learner ignores both offload settings on CPU; the plan counted them as savings.
    shape = LearnerShape(world_size=1, micro_batch_size=4, seq_len=2048, response_len=1024,
                         mixed_precision=False, critic=True, reference=True)
    plain = plan_memory(qwen_05b(), shape, MemoryOptions())
    for offload in ({"cpu_offload": True}, {"reference_offload": True}):
        assert plan_memory(qwen_05b(), shape, MemoryOptions(**offload)).total_bytes == plain.total_bytes
    tight = MemoryOptions(gpu_memory_gib=plain.total_bytes / GIB / 2)
    assert not {"cpu_offload", "reference_offload"} & {k for remedy, _ in advise(qwen_05b(), shape, tight)
                                                         for k in remedy.change}


def test_a_gpu_too_large_to_count_in_bytes_is_named(capsys):
    # 1e300 GiB overflowed to inf bytes: an OverflowError traceback.
    assert main(["plan", str(REPO / "deploy/jobs/demo.yaml"), "--gpu-memory-gib", "1e300"]) == 2
    assert "too large to count in bytes" in capsys.readouterr().err
