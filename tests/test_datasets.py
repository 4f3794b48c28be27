"""Datasets: the restaurants generator, JSONL validation, and tokenization with loss on completions only."""

from __future__ import annotations

import json

import pytest

from workers.datasets import (
    IGNORE,
    SEPARATOR,
    DatasetError,
    Example,
    collate,
    encode,
    load_splits,
    read_jsonl,
    restaurants,
    split_rows,
)
from workers.models import tiny_tokenizer


def byte_ids(text: str) -> list[int]:
    """The tiny tokenizer's ids: one per UTF-8 byte, after the 4 special tokens."""
    return [4 + b for b in text.encode()]


def test_restaurants_are_deterministic_disjoint_and_realise_every_attribute():
    first, again = restaurants(), restaurants()
    assert first == again
    assert (len(first.train), len(first.validation), len(first.test)) == (2000, 200, 200)
    prompts = [{e.prompt for e in split} for split in (first.train, first.validation, first.test)]
    assert sum(map(len, prompts)) == 2400, "every meaning representation is distinct"
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert restaurants(seed=1).train != first.train
    for example in first.train[:300]:
        attributes = dict(part[:-1].split("[", 1) for part in example.prompt.split(", "))
        sentence = example.completion.lower()
        assert example.completion.endswith(".") and example.completion.startswith(("There", attributes["name"])), (
            example
        )
        for key, value in attributes.items():
            if key == "familyFriendly":
                assert ("not suitable" in sentence) == (value == "no"), example
            else:
                assert value.lower() in sentence, (key, example)


def test_restaurants_use_several_templates_and_orderings():
    completions = [e.completion for e in restaurants().train]
    assert len({c.split(" ")[0] == "There" for c in completions}) == 2
    openings = {c.split(",")[0].split(" ")[-1] for c in completions}
    assert len(openings) > 20, "clauses come in varying orders and phrasings"


def test_chat_labels_mask_exactly_the_prompt():
    tokenizer = tiny_tokenizer()
    example = Example("name[Aromi]", "Aromi is a pub.")
    ids, labels = encode(tokenizer, example, max_length=256, chat=True)
    prompt = byte_ids("user\nname[Aromi]") + [2] + byte_ids("\n") + [1] + byte_ids("assistant\n")
    completion = byte_ids("Aromi is a pub.") + [2] + byte_ids("\n")  # <|im_end|> and the newline are learned
    assert ids == [1] + prompt + completion
    assert labels == [IGNORE] * (1 + len(prompt)) + completion


def test_plain_labels_use_the_separator_and_end_with_eos():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    ids, labels = encode(tokenizer, Example("p", "done"), max_length=256, chat=False)
    assert ids == byte_ids("p" + SEPARATOR) + byte_ids("done") + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(byte_ids("p" + SEPARATOR)) + byte_ids("done") + [2]


def test_truncation_keeps_the_prompt_end_and_a_quarter_for_the_completion():
    tokenizer = tiny_tokenizer()
    example = Example("x" * 100, "y" * 100)
    ids, labels = encode(tokenizer, example, max_length=40, chat=False)
    assert len(ids) == len(labels) == 40
    assert labels[:30] == [IGNORE] * 30 and labels[30:] == byte_ids("y" * 10)
    assert ids[:30] == byte_ids(("x" * 100 + SEPARATOR)[-30:])
    short = encode(tokenizer, Example("x", "y" * 100), max_length=40, chat=False)[1]
    assert short.count(IGNORE) == len(byte_ids("x" + SEPARATOR)), "a short prompt is kept whole"


def test_collate_pads_right_with_masked_labels():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert collate([([5], [5])], pad_id=3, pad_to=4)["input_ids"].tolist() == [[5, 3, 3, 3]]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion": "b"', "line 3: not valid JSON"),
        ('["a", "b"]', "line 3: each line must be a JSON object, got list"),
        ('{"prompt": "a"}', "line 3: 'completion' must be a non-empty string"),
        ('{"prompt": " ", "completion": "b"}', "line 3: 'prompt' must be a non-empty string"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, line, message):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = write_lines(tmp_path / "rows.jsonl", [good, "", line])
    with pytest.raises(DatasetError, match=message):
        read_jsonl(path)


def test_jsonl_rows_split_deterministically_and_disjointly(tmp_path):
    rows = [json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) for i in range(50)]
    path = write_lines(tmp_path / "rows.jsonl", rows)
    splits = load_splits(str(path), seed=3)
    assert splits == load_splits(str(path), seed=3) != load_splits(str(path), seed=4)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 5, 5)
    seen = [e.prompt for e in splits.train + splits.validation + splits.test]
    assert sorted(seen) == sorted(f"p{i}" for i in range(50))
    tiny = split_rows([Example("a", "b")], seed=0)
    assert tiny.train == tiny.validation == tiny.test == [Example("a", "b")]


def test_uploads_resolve_through_the_store_and_unknown_refs_fail(tmp_path):
    path = write_lines(tmp_path / "up.jsonl", [json.dumps({"prompt": "a", "completion": "b"})])
    assert load_splits("ds_0123abcd", resolve_dataset=lambda ref: path).train == [Example("a", "b")]
    with pytest.raises(DatasetError, match="ds_0123abcd"):
        load_splits("ds_0123abcd")
    with pytest.raises(DatasetError, match="builtin:nope"):
        load_splits("builtin:nope")
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits(str(tmp_path / "missing.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DatasetError, match="line 1: not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")
