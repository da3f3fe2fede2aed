"""Dataset loading (errors carry the line number) and the seeded batch order."""

import json
import logging

import pytest

from cluster.data import DataError, PromptSampler, drop_too_long, load_prompts


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loads_text_and_chat_prompts(tmp_path):
    path = write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1+1=", "answer": "2"}),
        "",
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": 7}),
        json.dumps({"prompt": "no answer"}),
    ])
    prompts = load_prompts(path)
    assert [p.index for p in prompts] == [0, 1, 2]
    assert [p.line for p in prompts] == [1, 3, 4]  # the blank line 2 is no prompt, but counts as a line
    assert prompts[0].text == "1+1=" and prompts[0].answer == "2"
    assert prompts[1].messages[0].content == "hi" and prompts[1].answer == "7"
    assert prompts[2].answer is None


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object"),
    ('{"answer": "1"}', "d.jsonl:2: missing the 'prompt' field"),
    ('{"prompt": "   "}', "d.jsonl:2: the prompt is empty"),
    ('{"prompt": [{"role": "user"}]}', "d.jsonl:2: each chat message"),
    ('{"prompt": "x", "answer": [1]}', "d.jsonl:2: 'answer' must be"),
    ('{"prompt": [{"role": "human", "content": "hi"}]}', "d.jsonl:2: chat role 'human' is not one of system, user"),
    # Values that used to be changed silently: true became "True", NaN "nan", the last of two
    # "prompt" keys won.
    ('{"prompt": "x", "answer": true}', "d.jsonl:2: 'answer' must be a string or a number, got true"),
    ('{"prompt": "x", "answer": NaN}', "d.jsonl:2: NaN is not a JSON value"),
    ('{"prompt": "x", "answer": -Infinity}', "d.jsonl:2: -Infinity is not a JSON value"),
    ('{"prompt": "x", "prompt": "y"}', "d.jsonl:2: key 'prompt' is given twice"),
    ('{"prompt": 2.5}', "d.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"prompt": [{"role": "user", "content": 1.5}]}', "d.jsonl:2: each chat message"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ok"}), line])
    with pytest.raises(DataError, match=message):
        load_prompts(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompts(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="is a directory: give the JSONL file in it"):  # was "does not exist"
        load_prompts(tmp_path)


def test_configured_paths_expand_the_home_directory(tmp_path, monkeypatch):
    """``~`` in every path key is the home directory of the process that loads the config (the
    job's); left as it was, ``~/model`` passed the pre-check and then went to the model hub as a
    repository id."""
    from cluster.config import PATH_KEYS, load_config
    from cluster.launch import resolve_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, [f"{key}=~/{key}" for key in PATH_KEYS])
    for key in PATH_KEYS:
        section, *rest = key.split(".")
        value = getattr(cfg, section)
        for name in rest:
            value = getattr(value, name)
        assert value == str(tmp_path / key), key
    paths = resolve_paths(cfg)
    assert paths.model_path == str(tmp_path / "model.path") and cfg.run.path == tmp_path / "run.dir"
    # ~user of a user unknown here is left for the machine that runs the job.
    assert load_config(None, ["model.path=~no-such-user-here/m"]).model.path == "~no-such-user-here/m"


def test_sampler_covers_each_epoch_once_and_is_reproducible(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(10)])
    prompts = load_prompts(path)
    a = PromptSampler(prompts, seed=3)
    batches = [a.next_batch(4) for _ in range(5)]  # 20 prompts = two full epochs
    first_epoch = [p.index for b in batches for p in b][:10]
    second_epoch = [p.index for b in batches for p in b][10:]
    assert sorted(first_epoch) == list(range(10)) and sorted(second_epoch) == list(range(10))
    assert first_epoch != second_epoch  # reshuffled per epoch
    b = PromptSampler(prompts, seed=3)
    assert [[p.index for p in b.next_batch(4)] for _ in range(5)] == [[p.index for p in x] for x in batches]
    # Resuming from a saved state continues the same order.
    c = PromptSampler(prompts, seed=3)
    c.next_batch(4), c.next_batch(4)
    d = PromptSampler(prompts, seed=3)
    d.state = c.state
    assert [p.index for p in d.next_batch(4)] == [p.index for p in batches[2]]


def test_too_long_prompts_error_by_default_or_are_dropped_and_counted(tmp_path):
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "x" * n}) for n in (3, 9, 5, 12)])
    prompts = load_prompts(path)
    encode = lambda p: list(p.text)  # one token per character  # noqa: E731
    with pytest.raises(DataError, match=r"data.train_path d.jsonl: prompt 1 \(line 2\) has 9 tokens, more than the 6"):
        drop_too_long(prompts, encode, limit=6, policy="error", source="data.train_path d.jsonl")
    kept, dropped = drop_too_long(prompts, encode, limit=6, policy="skip", source="x")
    assert [p.index for p in kept] == [0, 2] and dropped == 2
    assert drop_too_long(prompts, encode, limit=12, policy="error", source="x") == (prompts, 0)
    # Skipping every prompt is refused: an eval set emptied so ran without eval, only logging it.
    with pytest.raises(DataError, match=r"^data.eval_path d.jsonl: every one of the 4 prompts taken from it has more "
                                        r"than the 2 tokens .* would drop them all$"):
        drop_too_long(prompts, encode, limit=2, policy="skip", source="data.eval_path d.jsonl")
    assert drop_too_long([], encode, limit=2, policy="skip", source="x") == ([], 0)


def test_errors_after_loading_name_the_file_line_as_well_as_the_prompt_index(tmp_path):
    # With blank lines the 0-based index is not where the prompt is in the file: prompt 1 is on line 4.
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ok"}), "", "", json.dumps({"prompt": "x" * 9})])
    prompts = load_prompts(path)
    with pytest.raises(DataError, match=r"d.jsonl: prompt 1 \(line 4\) has 9 tokens"):
        drop_too_long(prompts, lambda p: list(p.text), limit=6, policy="error", source="d.jsonl")

    def refuse(p):
        if p.index == 1:
            raise ValueError("no")
        return [0]

    with pytest.raises(DataError, match=r"d.jsonl: prompt 1 \(line 4\) cannot be encoded: ValueError: no"):
        drop_too_long(prompts, refuse, limit=6, policy="skip", source="d.jsonl")


def test_bytes_that_are_not_utf8_are_named_with_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "ok"}).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        load_prompts(path)


def test_a_prompt_the_encoder_refuses_is_named():
    from actors.types import ChatMessage, Prompt

    prompts = [Prompt(index=0, text="fine"),
               Prompt(index=1, messages=(ChatMessage(role="assistant", content="first"),))]

    def encode(p):  # as a chat template that insists on alternating roles, user first
        if p.messages and p.messages[0].role != "user":
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return [0]

    with pytest.raises(DataError, match=r"eval set: prompt 1 cannot be encoded: ValueError: Conversation roles"):
        drop_too_long(prompts, encode, limit=8, policy="skip", source="eval set")


def test_a_numeric_answer_keeps_the_text_it_was_written_as(tmp_path):
    # exact_match compares text: 2.0 must not become "2", nor 1.10 "1.1", nor 1e3 "1000.0".
    path = write(tmp_path / "n.jsonl", ['{"prompt": "a", "answer": 2.0}', '{"prompt": "b", "answer": 1.10}',
                                        '{"prompt": "c", "answer": 1e3}', '{"prompt": "d", "answer": 42}'])
    assert [p.answer for p in load_prompts(path)] == ["2.0", "1.10", "1e3", "42"]
    assert all(type(p.answer) is str for p in load_prompts(path))


def test_prompts_with_characters_the_tokenizer_does_not_know_are_counted_and_logged(tmp_path, caplog):
    from learner.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer("0123456789+=")  # the demo's kind: one token per known character
    path = write(tmp_path / "d.jsonl", [json.dumps({"prompt": p}) for p in ("1+1=", "What is 1+1?", "2+2=", "1 + 1 =")])
    prompts = load_prompts(path)
    kept, dropped = drop_too_long(prompts, lambda p: tokenizer.encode(p.text), limit=64, policy="error",
                                  source="data.train_path d.jsonl", unknown_id=tokenizer.unk_token_id)
    assert (len(kept), dropped) == (4, 0)  # kept: the model sees them, less what it cannot read
    assert "data.train_path d.jsonl: 2 prompt(s) hold characters the tokenizer does not know" in caplog.text
    assert "e.g. prompt 1 (line 2)" in caplog.text


def test_a_byte_order_mark_at_the_start_of_a_file_is_not_data(tmp_path):
    from cluster.data import load_prompts

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    assert [(p.text, p.answer) for p in load_prompts(path)] == [("1+1=", "2"), ("2+2=", "4")]


def test_the_data_fingerprint_tells_another_training_set_apart():
    from actors.types import Prompt
    from cluster.data import data_fingerprint

    base = [Prompt(index=i, text=f"{i}+1=", answer=str(i + 1)) for i in range(4)]
    same = [Prompt(index=i, line=i + 3, text=f"{i}+1=", answer=str(i + 1)) for i in range(4)]  # lines do not matter
    assert data_fingerprint(base) == data_fingerprint(same) == {"prompts": 4, "sha256": data_fingerprint(base)["sha256"]}
    assert data_fingerprint(base[::-1]) != data_fingerprint(base)  # another order
    assert data_fingerprint(base[:3] + [Prompt(index=3, text="3+1=", answer="5")]) != data_fingerprint(base)


def test_fields_that_are_not_read_are_named_once(tmp_path, caplog):
    # A misspelt "answr" left every answer None with no word (a user reward then got None).
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answr": "2"}\n{"prompt": "2+2=", "answr": "4", "id": 7}\n')
    with caplog.at_level(logging.WARNING, logger="rlrelay"):
        prompts = load_prompts(path)
    assert [p.answer for p in prompts] == [None, None]
    assert f"dataset file {path}: field(s) 'answr' (line 1), 'id' (line 2) are not read (only 'prompt' and " \
           "'answer' are)" in caplog.text
