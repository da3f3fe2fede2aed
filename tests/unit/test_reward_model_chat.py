"""A reward model with a chat template of its own scores a chat prompt in its own format: the
dataset's turns and the response as the assistant's turn, rendered by its template (the
policy's rendering would bring the policy's system prompt and no end-of-turn token)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from actors.types import ChatMessage
from reward.model_scorer import RewardModelScorer
from tiny_models import make_tiny_reward_model

# Characters of the tiny alphabet only, so every rendered text is scorable.
TEMPLATE = "{% for m in messages %}{{ m['role'][0] }}={{ m['content'] }}?{% endfor %}"


@pytest.fixture
def scorers(tmp_path):
    plain = make_tiny_reward_model(tmp_path / "plain")
    chat = make_tiny_reward_model(tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(str(chat))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(chat))
    return RewardModelScorer(str(plain)), RewardModelScorer(str(chat))


def test_a_chat_prompt_is_rendered_by_the_reward_models_own_template(scorers):
    plain, chat = scorers
    turns = (ChatMessage(role="user", content="12+30"),)
    policy_rendering = "s=be brief?u=12+30?a="  # what the policy's template made of the same turns
    assert chat.texts([policy_rendering, "5+5="], ["42", "10"], [turns, None]) == ["u=12+30?a=42?", "5+5=10"]
    # Scored as that text: the same logit as the rendered text given as a plain prompt.
    assert chat.score([policy_rendering], ["42"], [turns]) == pytest.approx(chat.score(["u=12+30?a=42?"], [""]))
    # A reward model without a template scores the policy's rendering, as before.
    assert plain.texts([policy_rendering], ["42"], [turns]) == [policy_rendering + "42"]
    with pytest.raises(ValueError, match="1 prompts, 1 responses and 2 message lists"):
        chat.texts(["p"], ["r"], [turns, turns])
