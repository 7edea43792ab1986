"""Multiple-choice tasks: one example type, and loaders for JSONL and BIG-bench `task.json` files.

Scoring convention (what `evaluate` does with an example): the score of choice i is the summed
log-likelihood of the tokens of `choices[i]` following `context`, i.e. the text is the plain
concatenation `context + choices[i]`. So any separator (newline, space, "A: ") belongs at the end of
`context`, not at the start of the choices.

Every validation error names the file, the line and the field, and is raised before any scoring.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_prune.config import ConfigError


@dataclass
class MultipleChoiceExample:
    context: str
    choices: list[str]
    label: int  # index of the correct choice

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "label": self.label}


def _check_example(record: Any, where: str) -> MultipleChoiceExample:
    """Validate one JSONL record; `where` is "file:line"."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with fields context, choices, label; "
                          f"got {type(record).__name__}")
    for name in ("context", "choices", "label"):
        if name not in record:
            raise ConfigError(f"{where}: field '{name}' is missing (each line needs context, choices, label)")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise ConfigError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise ConfigError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings, "
                          f"got {choices!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(f"{where}: field 'label' must be an integer index into choices "
                          f"(0..{len(choices) - 1}), got {label!r}")
    return MultipleChoiceExample(context=context, choices=list(choices), label=label)


def _require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"task file {path} does not exist. Fix: point the task path at a .jsonl file "
                          f"(context, choices, label per line) or a BIG-bench task.json.")
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_jsonl_task(path: str) -> list[MultipleChoiceExample]:
    """One example per non-blank line: {"context": str, "choices": [str, ...], "label": int}."""
    text = _require_file(path)
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        examples.append(_check_example(record, where))
    if not examples:
        raise ConfigError(f"{path}: no examples (the file is empty)")
    return examples


def write_jsonl_task(examples: Sequence[MultipleChoiceExample], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")


_WS = re.compile(r"[ \t\n\r]*")


def _array_offsets(text: str, key: str) -> list[int]:
    """Character offsets of the elements of the top-level array `key` in a valid JSON object.

    `json` reports no positions for parsed values, so we walk the top level with `raw_decode` to
    turn "examples[17]" into a line number a person can jump to.
    """
    decoder, offsets = json.JSONDecoder(), []
    try:
        i = _WS.match(text, 0).end()
        if text[i] != "{":
            return []
        i = _WS.match(text, i + 1).end()
        while text[i] != "}":
            name, i = decoder.raw_decode(text, i)
            i = _WS.match(text, _WS.match(text, i).end() + 1).end()  # skip ':'
            if name == key and text[i] == "[":
                offsets = []  # a later duplicate key wins, as in json.loads
                i = _WS.match(text, i + 1).end()
                while text[i] != "]":
                    offsets.append(i)
                    _, i = decoder.raw_decode(text, i)
                    i = _WS.match(text, i).end()
                    if text[i] == ",":
                        i = _WS.match(text, i + 1).end()
                i += 1
            else:
                _, i = decoder.raw_decode(text, i)
            i = _WS.match(text, i).end()
            if text[i] == ",":
                i = _WS.match(text, i + 1).end()
    except (IndexError, ValueError):
        return offsets
    return offsets


def load_bigbench_task(path: str) -> list[MultipleChoiceExample]:
    """A BIG-bench JSON task: `examples` with `input` and `target_scores` ({choice: score}).

    label = the choice with the highest score (a tie is an error: a single-label task needs one best
    choice). The context follows BIG-bench's own prompt format:
    task_prefix + example_input_prefix + input + example_output_prefix, with BIG-bench's defaults
    ("\\nQ: " and "\\nA: ") when the file does not set them.
    """
    text = _require_file(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise ConfigError(f"{path}: field 'examples' must be a non-empty list (BIG-bench task.json format)")
    prefix = data.get("task_prefix", "")
    in_prefix = data.get("example_input_prefix", "\nQ: ")
    out_prefix = data.get("example_output_prefix", "\nA: ")
    for name, value in (("task_prefix", prefix), ("example_input_prefix", in_prefix),
                        ("example_output_prefix", out_prefix)):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: field '{name}' must be a string, got {value!r}")

    offsets = _array_offsets(text, "examples")
    examples = []
    for k, record in enumerate(data["examples"]):
        line = text.count("\n", 0, offsets[k]) + 1 if k < len(offsets) else "?"
        where = f"{path}:{line}: examples[{k}]"
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected an object with 'input' and 'target_scores'")
        if not isinstance(record.get("input"), str):
            raise ConfigError(f"{where}: field 'input' must be a string, got {record.get('input')!r}")
        scores = record.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2:
            raise ConfigError(f"{where}: field 'target_scores' must map at least 2 choices to scores "
                              f"(generative-only BIG-bench tasks are not multiple choice)")
        for choice, score in scores.items():
            if not choice or isinstance(score, bool) or not isinstance(score, (int, float)):
                raise ConfigError(f"{where}: field 'target_scores' entry {choice!r}: {score!r} must map a "
                                  f"non-empty choice to a number")
        choices, values = list(scores), list(scores.values())
        best = max(values)
        if values.count(best) > 1:
            raise ConfigError(f"{where}: field 'target_scores' has {values.count(best)} choices tied at the "
                              f"best score {best}; a single-label task needs exactly one")
        context = prefix + in_prefix + record["input"] + out_prefix
        examples.append(MultipleChoiceExample(context=context, choices=choices, label=values.index(best)))
    return examples


def load_task(path: str) -> list[MultipleChoiceExample]:
    """Dispatch on the extension: `.jsonl` (generic) or `.json` (BIG-bench)."""
    if path.endswith(".jsonl"):
        return load_jsonl_task(path)
    if path.endswith(".json"):
        return load_bigbench_task(path)
    raise ConfigError(f"task file {path}: unknown format; use a .jsonl file (context, choices, label) "
                      f"or a BIG-bench task.json")
