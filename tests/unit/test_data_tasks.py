"""Multiple-choice tasks: JSONL / BIG-bench loading and validation, the default Shakespeare task."""
from __future__ import annotations

import json
import re

import pytest

from megatron_prune.config import ConfigError
from megatron_prune.data.corpus import Document, load_corpus
from megatron_prune.data.shakespeare_task import build_shakespeare_task, spoken_lines
from megatron_prune.data.tasks import (MultipleChoiceExample, load_bigbench_task, load_jsonl_task, load_task,
                                       write_jsonl_task)

GOOD = {"context": "Q: 2+2?\nA:", "choices": [" 4", " 5"], "label": 0}


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_jsonl_round_trip(tmp_path):
    examples = [MultipleChoiceExample("ctx one\n", ["a", "b", "c"], 2), MultipleChoiceExample("ctx two ü\n", ["x", "y"], 0)]
    path = str(tmp_path / "t.jsonl")
    write_jsonl_task(examples, path)
    assert load_task(path) == examples


@pytest.mark.parametrize("bad, field", [
    ({"choices": ["a", "b"], "label": 0}, "context"),
    ({**GOOD, "choices": ["only one"]}, "choices"),
    ({**GOOD, "choices": ["a", ""]}, "choices"),
    ({**GOOD, "label": 2}, "label"),
    ({**GOOD, "label": True}, "label"),
    ({**GOOD, "context": 3}, "context"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad, field):
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, "", GOOD, bad])  # bad record is on line 4
    with pytest.raises(ConfigError) as info:
        load_jsonl_task(path)
    assert f"{path}:4:" in str(info.value) and f"'{field}'" in str(info.value)


def test_jsonl_invalid_json_names_the_line(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [GOOD, '{"context": "x", '])
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: not valid JSON")):
        load_jsonl_task(path)


def _bigbench(path, examples, **extra):
    # indent=2 spreads each example over several lines, like real BIG-bench files.
    path.write_text(json.dumps({"name": "toy", "description": "d", **extra, "examples": examples}, indent=2))
    return str(path)


def test_bigbench_label_is_argmax_and_context_uses_prefixes(tmp_path):
    path = _bigbench(tmp_path / "task.json",
                     [{"input": "2+2", "target_scores": {"3": 0, "4": 1, "5": 0}},
                      {"input": "sky colour", "target_scores": {"blue": 0.9, "green": 0.1}}],
                     example_input_prefix="\nQuestion: ")
    examples = load_task(path)
    assert [e.label for e in examples] == [1, 0]
    assert examples[0].choices == ["3", "4", "5"]
    assert examples[0].context == "\nQuestion: 2+2\nA: "


def test_bigbench_errors_name_file_line_and_field(tmp_path):
    good = {"input": "x", "target_scores": {"a": 1, "b": 0}}
    path = _bigbench(tmp_path / "task.json", [good, good, {"input": "y", "target_scores": {"a": 1, "b": 1}}])
    lines = open(path).read().split("\n")
    # The third example starts at the third line that opens an example object inside the array.
    starts = [i + 1 for i, line in enumerate(lines) if line == "    {"]
    with pytest.raises(ConfigError) as info:
        load_bigbench_task(path)
    message = str(info.value)
    assert f"{path}:{starts[2]}: examples[2]" in message and "'target_scores'" in message and "tied" in message

    path = _bigbench(tmp_path / "task2.json", [good, {"input": 5, "target_scores": {"a": 1, "b": 0}}])
    starts = [i + 1 for i, line in enumerate(open(path).read().split("\n")) if line == "    {"]
    with pytest.raises(ConfigError, match=re.escape(f"{path}:{starts[1]}: examples[1]: field 'input'")):
        load_bigbench_task(path)
    path = _bigbench(tmp_path / "task3.json", [{"input": "q", "target": "generative only"}])
    with pytest.raises(ConfigError, match="examples\\[0\\]: field 'target_scores'"):
        load_bigbench_task(path)


def test_unknown_task_extension_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown format"):
        load_task(str(tmp_path / "t.csv"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))


def test_spoken_lines_drop_stage_directions_headings_and_speakers():
    text = ("ACT I.\n\nScene I. Elsinore. A platform before the Castle.\n\n"
            "[Francisco at his post. Enter to him\nBernardo and two other watchful soldiers.]\n\n"
            "Ber.\nLong live the king, and all his noble house!\n"
            "  Mac. So foule and faire a day I haue not seene\n"
            "Enter Macbeth and Banquo with drums and colours.\n"
            "Who's there?\n")
    assert spoken_lines(text) == ["Long live the king, and all his noble house!",
                                  "So foule and faire a day I haue not seene"]


def _numbered_play(name: str, n: int) -> Document:
    lines = [f"This is spoken line number {i} of {name}" for i in range(n)]
    return Document(name=name, work=name, text="\n".join(lines) + "\n", path=name)


def test_default_task_label_points_at_the_true_next_line():
    docs = [_numbered_play("alpha", 80), _numbered_play("beta", 50)]
    examples = build_shakespeare_task(docs, n_examples=40, seed=11)
    assert len(examples) == 40
    labels = set()
    for ex in examples:
        *_, last = ex.context.rstrip("\n").split("\n")
        number, play = re.match(r"This is spoken line number (\d+) of (\w+)", last).groups()
        assert ex.choices[ex.label] == f"This is spoken line number {int(number) + 1} of {play}"
        assert len(ex.context.rstrip("\n").split("\n")) == 4 and len(set(ex.choices)) == 4
        assert all(c.endswith(f"of {play}") for c in ex.choices)  # distractors from the same play
        labels.add(ex.label)
    assert labels == {0, 1, 2, 3}  # the true line is not always in the same position


def test_default_task_is_deterministic_for_a_seed():
    docs = [d for d in load_corpus("shakespeare") if d.work == "macbeth"]
    first = build_shakespeare_task(docs, n_examples=30, seed=5)
    assert first == build_shakespeare_task(list(reversed(docs)), n_examples=30, seed=5)
    assert first != build_shakespeare_task(docs, n_examples=30, seed=6)
    for ex in first:  # real text: the true line follows the context's last line in its document
        last = ex.context.rstrip("\n").split("\n")[-1]
        assert any(last in d.text and ex.choices[ex.label] in d.text.split(last, 1)[1] for d in docs)


def test_default_task_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match="asked for 500 examples"):
        build_shakespeare_task([_numbered_play("alpha", 60)], n_examples=500, seed=0)
