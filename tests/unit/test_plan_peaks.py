"""The memory plan's other two peak candidates: the no-grad forward pass and AdamW's step.

Nothing checked either. The forward pass's logits were only tested on a micro-batch of fewer
than 1024 response tokens, where one chunk is all of them, so planning the whole ``[B T, V]``
instead of one chunk of ``LOSS_CHUNK_TOKENS`` passed. And the optimizer step, the peak of a
replicated model on a short micro-batch (its foreach update allocates one more fp32 buffer of
the shard's size), could be left out of the total without a test noticing: the plan then
understated what must fit by that buffer.
"""

from __future__ import annotations

from cluster.architecture import Architecture
from cluster.memory_model import GIB, LearnerShape, MemoryOptions, forward_logits_bytes, plan_memory
from cluster.plan import KNOWN_CONFIGS

P = 494_032_768  # Qwen2.5-0.5B's parameters (test_plan.py pins it against the published size)
V = 151_936  # its vocabulary


def qwen_05b() -> Architecture:
    return Architecture.from_hf_config(KNOWN_CONFIGS["Qwen2.5-0.5B-Instruct"])


def policy_only(**kw) -> LearnerShape:
    """One rank training the policy alone (grpo without a reference)."""
    return LearnerShape(**dict(world_size=1, critic=False, reference=False) | kw)


def test_the_forward_pass_holds_one_chunk_of_1024_tokens_of_logits_not_all_of_them():
    arch = qwen_05b()
    # 16 x 512 = 8192 response tokens: the chunked head's forward holds 12 bytes per entry of
    # one 1024-token chunk, not of all 8192.
    assert forward_logits_bytes(arch, 16, 1024, 512, 2) == 12 * 1024 * V
    # The model's own lm_head: the window (L wide) and the gathered response columns in bf16,
    # then one chunk's fp32 temporaries, 12 bytes per entry in bf16 and 8 in fp32.
    assert forward_logits_bytes(arch, 16, 1024, 512, 2, chunked=False) == \
        2 * 16 * 1024 * V + 2 * 16 * 512 * V + 12 * 1024 * V
    assert forward_logits_bytes(arch, 4, 1024, 512, 4, chunked=False) == \
        4 * 4 * 1024 * V + 4 * 4 * 512 * V + 8 * 1024 * V


def test_the_planned_forward_pass_is_the_resident_state_without_gradients_plus_one_logits_chunk():
    # Replicated bf16 policy: a bf16 compute copy (2P) and fp32 state (gradients 4P, master
    # weights and two moments 12P); the forward runs before any gradient exists, so 14P. Its
    # active part is one chunk of 4 x 512 = 2048 response tokens (12 x 1024 x V = 1.87 GB),
    # which outweighs one block's activations (4 x 1024 x 62,528 = 0.26 GB).
    plan = plan_memory(qwen_05b(), policy_only(micro_batch_size=4, seq_len=1024, response_len=512,
                                               mixed_precision=True), MemoryOptions(sharding="none"))
    assert plan.forward_bytes - plan.overhead_bytes == 14 * P + 12 * 1024 * V == 8_783_448_320


def test_a_replicated_policy_on_a_short_micro_batch_peaks_at_the_optimizer_step():
    # sharding=none, bf16: resident 2P (compute copy) + 4P (gradients) + 12P (master weights,
    # moments) = 18P; AdamW's step adds one fp32 buffer of the whole model, 4P: 22P. A micro-batch
    # of one 16-token row adds far less than 4P to the training step (its lm_head gradient alone
    # is 8 x V x H = 1.09 GB, 4P is 1.98 GB).
    plan = plan_memory(qwen_05b(), policy_only(micro_batch_size=1, seq_len=16, response_len=8, mixed_precision=True),
                       MemoryOptions(sharding="none"))
    assert plan.resident["policy"].total == 18 * P
    tensors = 22 * P
    assert plan.overhead_bytes == int(1.5 * GIB) + int(0.05 * tensors)
    assert plan.total_bytes == tensors + int(1.5 * GIB) + int(0.05 * tensors) == 13_022_769_676
    # The training step itself stays below it: the step, not the micro-batch, decides the total.
    assert plan.peak.total < tensors


def test_the_optimizer_step_peak_on_a_cpu_learner_has_no_cuda_context():
    # fp32 on CPU, sharding=none: a separate fp32 compute copy (4P), the fp32 shard (4P),
    # gradients (4P) and two moments (8P) = 20P resident, plus the step's buffer 4P; no fixed
    # 1.5 GiB overhead without a GPU, only the 5 % fragmentation.
    plan = plan_memory(qwen_05b(), policy_only(micro_batch_size=1, seq_len=16, response_len=8, mixed_precision=False),
                       MemoryOptions(sharding="none"))
    assert plan.resident["policy"].total == 20 * P
    assert plan.total_bytes == 24 * P + int(0.05 * (24 * P)) == 12_449_625_753
