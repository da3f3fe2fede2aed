"""The critic is the policy checkpoint's trunk under a zero value head, loaded quietly but
checked: the causal LM's head is expected to be left over, a missing trunk weight is not.
The chunked head gives the logits path's log-probs, entropy and gradients on real models, and
so do packed rows (``learner.pack_sequences``), for the policy and the critic; each path's
log-probs are those of the sampled tokens, checked by hand. Models load without dropout."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from learner.batch import RolloutBatch
from learner.models import (check_linear_head, final_hidden_states, load_critic, load_policy, sequence_logprobs,
                            sequence_values)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_critic_takes_the_checkpoints_trunk_without_a_load_report(request, fixture, caplog):
    model_dir = request.getfixturevalue(fixture)
    with caplog.at_level(logging.WARNING):
        critic = load_critic(str(model_dir), torch.float32)
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    saved = load_file(str(model_dir / "model.safetensors"))
    trunk = critic.trunk.state_dict()
    assert torch.equal(trunk["embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(trunk["layers.1.mlp.down_proj.weight"], saved["model.layers.1.mlp.down_proj.weight"])
    assert float(critic.value_head.weight.detach().abs().sum()) == 0.0


def test_a_trunk_weight_missing_from_the_checkpoint_is_an_error_naming_it(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"critic's trunk lacks .*layers\.1\.mlp\.down_proj\.weight"):
        load_critic(str(broken), torch.float32)


def _rollouts(vocab: int) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([5, 3, 7])  # unequal prompts: the logits path gathers from a window
    seq, response = 16, 9
    mask = torch.ones(3, response)
    mask[1, 6:] = 0
    attention = torch.ones(3, seq, dtype=torch.long)
    attention[1, 3 + 6:] = 0
    return RolloutBatch(input_ids=torch.randint(1, vocab, (3, seq), generator=g), attention_mask=attention,
                        prompt_lengths=prompts, response_mask=mask, rollout_logprobs=torch.zeros(3, response))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
@pytest.mark.parametrize("chunked, packed", [(True, False), (True, True), (False, True)])
def test_chunked_head_and_packed_rows_give_the_logits_paths_log_probs_entropy_and_gradients(request, fixture,
                                                                                           chunked, packed):
    path = str(request.getfixturevalue(fixture))
    batch = _rollouts(load_policy(path, torch.float64).config.vocab_size)
    coef = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    # The reference: the model's own lm_head and logits over padded rows, default attention.
    for model, kwargs in ((load_policy(path, torch.float64), dict(chunked_head=False)),
                          (load_policy(path, torch.float64, packed=packed), dict(chunked_head=chunked, packed=packed))):
        lp, ent = sequence_logprobs(model, batch, 0.8, with_entropy=True, **kwargs)
        ((lp * coef).sum() + 0.1 * (ent * batch.response_mask).sum()).backward()
        results.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_lp, ref_ent, ref_grads), (lp, ent, grads) = results
    assert float(batch.response_mask.sum()) < batch.response_mask.numel()  # padding is in the test
    torch.testing.assert_close(lp, ref_lp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-9, atol=1e-9)
    assert float(ent[batch.response_mask == 0].abs().sum()) == 0.0
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    if chunked:
        sequence_logprobs(model, batch, 0.8, check_head=True, packed=packed)  # a plain linear head passes


def test_packed_rows_give_the_critics_values_and_gradients(tiny_model_dir):
    batch = _rollouts(load_policy(str(tiny_model_dir), torch.float64).config.vocab_size)
    results = []
    for packed in (False, True):
        critic = load_critic(str(tiny_model_dir), torch.float64, packed=packed)
        torch.nn.init.normal_(critic.value_head.weight, generator=torch.Generator().manual_seed(2))
        values = sequence_values(critic, batch, packed=packed)
        (values ** 2).sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in critic.named_parameters()}))
    (ref_values, ref_grads), (values, grads) = results
    assert float(values.abs().sum()) > 0
    torch.testing.assert_close(values, ref_values, rtol=1e-9, atol=1e-9)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-7, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_a_head_that_is_not_linear_is_refused_by_name(tiny_model_dir):
    model = load_policy(str(tiny_model_dir), torch.float32)
    batch = _rollouts(model.config.vocab_size)
    # A forward hook stands in for a head that scales its logits (as Cohere's logit_scale does).
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: 0.5 * out)
    sequence_logprobs(model, batch, 1.0)  # unchecked, the other log-probs would pass silently
    with pytest.raises(ValueError, match="chunked_head=false"):
        sequence_logprobs(model, batch, 1.0, check_head=True)
    hidden, logits = final_hidden_states(model, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match="not lm_head"):
        check_linear_head(model, hidden, logits)


def test_the_learner_builds_its_models_without_dropout(tiny_model_dir, tmp_path):
    """A checkpoint that trains with dropout: vLLM samples without it, so in training mode the
    learner's log-probs must still equal the no-dropout ones, or the PPO ratio is noise at equal
    weights. Training mode stays on (activation checkpointing runs only there)."""
    import json

    from learner.models import critic_skeleton, policy_skeleton

    noisy = tmp_path / "noisy"
    shutil.copytree(tiny_model_dir, noisy)
    config = json.loads((noisy / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (noisy / "config.json").write_text(json.dumps(config))
    batch = _rollouts(config["vocab_size"])
    policy = load_policy(str(noisy), torch.float32).train()
    with torch.no_grad():
        runs = [sequence_logprobs(policy, batch, 1.0, False)[0] for _ in range(2)]
        clean = sequence_logprobs(policy.eval(), batch, 1.0, False)[0]
    torch.testing.assert_close(runs[0], clean, rtol=0, atol=0)
    torch.testing.assert_close(runs[1], clean, rtol=0, atol=0)
    for model in (policy_skeleton(str(noisy), torch.float32), critic_skeleton(str(noisy), torch.float32).trunk,
                  load_critic(str(noisy), torch.float32).trunk):
        assert model.config.attention_dropout == 0.0


def test_a_bfloat16_critic_gives_its_values_in_float32(tiny_model_dir):
    """The value head runs in float32 over the bf16 trunk's hidden states: a bf16 head would
    round each value to 2^-9 of its size (errors up to 2.7e-3 on values from -0.5 to 1.5 here)."""
    critic = load_critic(str(tiny_model_dir), torch.bfloat16)
    head = critic.value_head
    torch.nn.init.normal_(head.weight, std=0.1, generator=torch.Generator().manual_seed(2))
    torch.nn.init.constant_(head.bias, 1.5)
    batch = _rollouts(load_policy(str(tiny_model_dir), torch.float32).config.vocab_size)
    values = critic(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hidden = critic.trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    exact = hidden.double() @ head.weight.double().T + head.bias.double()
    assert values.dtype == torch.float32
    torch.testing.assert_close(values.double(), exact.squeeze(-1), rtol=1e-6, atol=1e-6)
    values.sum().backward()
    assert head.weight.grad.dtype == torch.bfloat16 and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [dict(chunked_head=True), dict(chunked_head=False),
                                    dict(chunked_head=True, packed=True)])
def test_log_probs_are_those_of_the_sampled_tokens_by_hand(tiny_model_dir, kwargs):
    # The paths above are compared with each other and share their labels: a label off by one
    # position (the token before the sampled one) passed them all. Here each log-prob is taken
    # by hand from the model's full logits: log_softmax(logits[b, prompt_b - 1 + t] / T)[token].
    model = load_policy(str(tiny_model_dir), torch.float64, packed=kwargs.get("packed", False))
    batch = _rollouts(model.config.vocab_size)
    lp, _ = sequence_logprobs(model, batch, 0.8, **kwargs)
    with torch.no_grad():
        logits = load_policy(str(tiny_model_dir), torch.float64)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    checked = 0
    for b in range(3):
        p = int(batch.prompt_lengths[b])
        for t in range(batch.response_mask.shape[1]):
            if batch.response_mask[b, t]:
                token = int(batch.input_ids[b, p + t])
                want = torch.log_softmax(logits[b, p - 1 + t] / 0.8, dim=-1)[token]
                torch.testing.assert_close(lp[b, t], want, rtol=1e-9, atol=1e-9)
                checked += 1
    assert checked == int(batch.response_mask.sum()) == 24


def test_the_hidden_states_hook_is_removed_after_each_forward(tiny_model_dir):
    # A hook left on the decoder appends every later forward's states (and their graphs) to a
    # list that stays alive: memory grows micro-batch by micro-batch.
    model = load_policy(str(tiny_model_dir), torch.float32)
    batch = _rollouts(model.config.vocab_size)
    for _ in range(2):
        sequence_logprobs(model, batch, 1.0, chunked_head=True)
        assert not model.get_decoder()._forward_hooks


def test_every_dropout_of_a_config_is_turned_off_nested_ones_and_pdrop_names_too():
    from transformers import PretrainedConfig

    from learner.models import without_dropout

    # GPT-2 and Phi name theirs *_pdrop; multimodal configs nest the text model's config.
    config = PretrainedConfig(resid_pdrop=0.1, attn_pdrop=0.2, embd_pdrop=0.3, layer_norm_epsilon=1e-5)
    config.text_config = PretrainedConfig(attention_dropout=0.5, hidden_dropout_prob=0.1, rms_norm_eps=1e-6)
    without_dropout(config)
    assert (config.resid_pdrop, config.attn_pdrop, config.embd_pdrop) == (0.0, 0.0, 0.0)
    assert (config.text_config.attention_dropout, config.text_config.hidden_dropout_prob) == (0.0, 0.0)
    assert (config.layer_norm_epsilon, config.text_config.rms_norm_eps) == (1e-5, 1e-6)  # not dropouts


def test_packed_models_are_checked_for_packable_attention_as_they_load(tiny_model_dir, monkeypatch):
    # Only check_packable itself was tested; a loader that skipped it would let a model whose
    # attention bypasses transformers' interface attend across packed rows.
    import learner.models

    checked = []
    monkeypatch.setattr(learner.models, "check_packable", lambda model: checked.append(type(model).__name__))
    load_policy(str(tiny_model_dir), torch.float32, packed=True)
    load_critic(str(tiny_model_dir), torch.float32, packed=True)
    load_policy(str(tiny_model_dir), torch.float32)  # unpacked: nothing to check
    assert len(checked) == 2 and checked[0].endswith("ForCausalLM") and checked[1].endswith("Model")
