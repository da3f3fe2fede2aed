"""``deploy/data/gsm8k_to_jsonl.py``: GSM8K rows to the trainer's JSONL prompts, with the bad
row named and no partial output left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONVERTER = Path(__file__).resolve().parents[2] / "deploy" / "data" / "gsm8k_to_jsonl.py"


def convert(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERTER), str(source), str(out)], capture_output=True, text=True,
                          timeout=60)


def test_gsm8k_converter_writes_prompts_the_trainer_reads(tmp_path):
    from cluster.data import load_prompts
    from reward.rules import numeric_match

    rows = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
             "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
            {"question": "A farm sells 1,250 eggs a day. How many in 2 days?",
             "answer": "1,250 * 2 = <<1250*2=2500>>2,500\n#### 2,500"}]
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out" / "train.jsonl"
    result = convert(source, out)
    assert result.returncode == 0, result.stderr
    prompts = load_prompts(out)
    assert [p.answer for p in prompts] == ["7", "2500"]
    assert prompts[0].messages[0].role == "user" and "Tom has 3 apples" in prompts[0].messages[0].content
    assert numeric_match("", "3 + 4 = 7 apples.\nThe answer is 7", prompts[0].answer) == 1.0
    assert numeric_match("", "1,250 * 2 = 2,500", prompts[1].answer) == 1.0


@pytest.mark.parametrize("second, message", [
    (json.dumps({"question": "q", "answer": "no marker"}), "row 2: no '#### <number>'"),
    ("{not json", "line 2: not JSON"),
])
def test_gsm8k_converter_names_a_bad_row_and_leaves_no_partial_output(tmp_path, second, message):
    # It stopped with a traceback naming no row, and left the rows before it as the output.
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"question": "q", "answer": "x\n#### 3"}) + "\n" + second + "\n")
    out = tmp_path / "out.jsonl"
    result = convert(source, out)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [source]


def test_gsm8k_converter_refuses_to_write_over_its_input(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"question": "q", "answer": "x\n#### 3"}) + "\n")
    result = convert(source, source)
    assert result.returncode != 0 and "is the input" in result.stderr
    assert "#### 3" in source.read_text()  # it used to be emptied
