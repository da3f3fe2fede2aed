"""Rollout workers as real Ray actors with real vLLM engines (CPU): generation records,
seeded determinism, and weight sync — the engine's log-probs match the learner's after a
sync (untied and tied embeddings, repeated long prompts that hit the prefix cache)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.rollout_worker import EngineSettings, RolloutWorker
from actors.types import GenerateRequest, Prompt, SamplingSettings
from learner.batch import collate
from learner.models import sequence_logprobs
from learner.shared_weights import SharedWeightWriter
from learner.weight_bucket import drop_aliases, pack_state_dict

pytestmark = pytest.mark.integration

TEMPERATURE = 0.7
# One prompt longer than a KV block (128 tokens on CPU) so its repeated samples share cached
# prefix blocks: a prefix cache left stale by a reload would show up as a mismatch.
PROMPTS = ("12+34=", "the quick brown fox jumps over the lazy dog " * 5, "what is 45+17?")


def request(step: int = 0, samples: int = 4) -> GenerateRequest:
    return GenerateRequest(
        prompts=tuple(Prompt(index=i, text=t, answer="x") for i, t in enumerate(PROMPTS)),
        sampling=SamplingSettings(temperature=TEMPERATURE, max_new_tokens=12, samples_per_prompt=samples),
        step=step, seed=7)


def start_worker(ray, model_dir) -> object:
    actor = ray.remote(RolloutWorker).options(num_cpus=0.5)
    return actor.remote(0, EngineSettings(model_path=str(model_dir), max_model_len=256, kv_cache_gib=0.25,
                                          num_threads=1))


def mismatch(model, rollouts) -> float:
    batch = collate(rollouts, pad_token_id=0)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, batch, TEMPERATURE)
    mask = batch.response_mask
    return float(((lp - batch.rollout_logprobs).abs() * mask).sum() / mask.sum())


def perturbed(model_dir, seed: int):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_generate_then_sync_changes_outputs_and_logprobs_match(ray_local, request_fixture_dir, model_fixture):
    ray = ray_local
    model_dir = request_fixture_dir(model_fixture)
    worker = start_worker(ray, model_dir)

    before = ray.get(worker.generate.remote(request()), timeout=300)
    assert len(before) == len(PROMPTS) * 4
    assert [(r.slot, r.sample_index) for r in before] == [(i, k) for i in range(3) for k in range(4)]
    for r in before:
        assert r.policy_version == 0
        assert len(r.response_logprobs) == len(r.response_token_ids) > 0
        assert r.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in r.response_logprobs)
    # A per-request seed makes the same request sample the same tokens.
    again = ray.get(worker.generate.remote(request()), timeout=300)
    assert [r.response_token_ids for r in again] == [r.response_token_ids for r in before]
    initial = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    assert mismatch(initial, before) <= 1e-3

    # Sync new weights through the object store, as the learner does: its state dict less a
    # tied head's second name (a tied model's checkpoint has no lm_head.weight either), so the
    # engine must re-pack lm_head itself.
    new_model = perturbed(model_dir, seed=1)
    weights = drop_aliases(new_model.state_dict(keep_vars=True))
    assert ("lm_head.weight" in weights) != new_model.config.tie_word_embeddings
    update_ref = ray.put(pack_state_dict(weights, version=1))
    report = ray.get(worker.load_weights.remote(update_ref), timeout=300)
    assert report.version == 1 and report.nbytes > 0
    after = ray.get(worker.generate.remote(request()), timeout=300)
    assert all(r.policy_version == 1 for r in after)
    assert [r.response_token_ids for r in after] != [r.response_token_ids for r in before]
    # The engine now samples from the new weights: its log-probs equal the learner's.
    assert mismatch(new_model, after) <= 1e-3
    assert mismatch(initial, after) > 1e-2

    # A stale update is refused whole and the worker keeps serving version 1.
    with pytest.raises(Exception, match="stale weight update"):
        ray.get(worker.load_weights.remote(ray.put(pack_state_dict(initial.state_dict(), version=1))), timeout=300)
    assert ray.get(worker.ping.remote(), timeout=60) == 1

    # The same-host transport: written once into this process's shared memory, read in place
    # by the worker's process, with the same result.
    newer = perturbed(model_dir, seed=2)
    weights = drop_aliases(newer.state_dict(keep_vars=True))
    writer = SharedWeightWriter()
    try:
        report = ray.get(worker.load_weights.remote(writer.write(weights, version=2)), timeout=300)
        assert report.version == 2
        latest = ray.get(worker.generate.remote(request()), timeout=300)
        assert all(r.policy_version == 2 for r in latest)
        assert mismatch(newer, latest) <= 1e-3 and mismatch(new_model, latest) > 1e-2
    finally:
        writer.close()
    ray.kill(worker)


@pytest.fixture
def request_fixture_dir(request):
    return request.getfixturevalue


# Ends each message with a special token, as real templates do (<|im_end|>, <|eot_id|>).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role }} {{ m.content }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def test_chat_prompts_use_the_tokenizers_chat_template(ray_local, tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from actors.types import ChatMessage

    chat_dir = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, chat_dir)
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(chat_dir))

    chat = Prompt(index=0, messages=(ChatMessage(role="system", content="be brief"),
                                     ChatMessage(role="user", content="what is 2+2?")), answer="4")
    plain = Prompt(index=1, text="12+3=", answer="15")
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, samples_per_prompt=1)
    worker = start_worker(ray_local, chat_dir)
    out = ray_local.get(worker.generate.remote(GenerateRequest(prompts=(chat, plain), sampling=sampling, step=0,
                                                               seed=0)), timeout=300)
    # The reward sees the prompt as the engine did, special tokens kept (decoding the ids
    # without them dropped the markers a chat reward model is trained with).
    assert out[0].prompt_text == "system be brief</s>user what is 2+2?</s>assistant "
    assert list(out[0].prompt_token_ids) == tok.encode(out[0].prompt_text, add_special_tokens=False)
    assert out[1].prompt_text == "12+3="
    ray_local.kill(worker)

    # A chat prompt for a model whose tokenizer has no template is an error naming the prompt.
    # The worker encodes with this same function (so does the driver's length check, before
    # any worker starts); calling it here spares a second engine start (~15 s).
    from actors.rollout_worker import encode_prompt

    plain_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with pytest.raises(ValueError, match="prompt 0 is a chat, but the tokenizer .* has no chat template"):
        encode_prompt(plain_tok, chat, str(tiny_model_dir))
