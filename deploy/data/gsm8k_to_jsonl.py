"""Convert a GSM8K split into rlrelay's prompt JSONL.

GSM8K rows have a ``question`` and an ``answer`` whose worked solution ends with ``#### <number>``.
Each output line is ``{"prompt": [{"role": "user", "content": ...}], "answer": "<number>"}``: a chat
prompt (rendered with the policy's chat template) asking for the final number last, which is what
the ``numeric_match`` reward checks.

    python deploy/data/gsm8k_to_jsonl.py train.jsonl /data/gsm8k/train.jsonl
    python deploy/data/gsm8k_to_jsonl.py test-00000-of-00001.parquet /data/gsm8k/test.jsonl

Input: the JSONL files of github.com/openai/grade-school-math (``grade_school_math/data/``), or
the parquet files of the Hugging Face dataset ``openai/gsm8k`` (config ``main``; needs pyarrow).
Run it where the data was downloaded; it needs nothing from rlrelay.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

INSTRUCTION = "Solve the problem step by step. Give the final answer as a number on the last line."
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def final_answer(solution: str) -> str:
    """The number after ``####`` at the end of a GSM8K solution, without thousands separators."""
    match = _FINAL.search(solution.strip())
    if match is None:
        raise ValueError(f"no '#### <number>' at the end of the solution: {solution[-80:]!r}")
    return match.group(1).replace(",", "")


def convert(rows: Iterable[dict]) -> Iterator[dict]:
    for i, row in enumerate(rows, start=1):
        try:
            question, solution = row["question"], row["answer"]
            yield {"prompt": [{"role": "user", "content": f"{question.strip()}\n\n{INSTRUCTION}"}],
                   "answer": final_answer(solution)}
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"row {i}: {what}") from None


def read_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("reading parquet needs pyarrow: pip install pyarrow (or convert the JSONL files instead)")
        yield from pq.read_table(path, columns=["question", "answer"]).to_pylist()
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="GSM8K split: .jsonl or .parquet")
    parser.add_argument("output", type=Path, help="rlrelay prompt JSONL to write")
    args = parser.parse_args(argv)
    if args.output.resolve() == args.input.resolve():
        sys.exit(f"gsm8k_to_jsonl: the output {args.output} is the input: writing it would empty the split")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed when complete: a row that fails leaves no truncated dataset
    # that training would accept.
    partial = args.output.with_name(args.output.name + ".partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as out:
            for record in convert(read_rows(args.input)):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    except (ValueError, OSError) as e:
        partial.unlink(missing_ok=True)
        sys.exit(f"gsm8k_to_jsonl: {e}; nothing written")
    partial.replace(args.output)
    print(f"wrote {count} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
