"""Training data: the E2E NLG data, the builtin restaurants set, JSONL files, and tokenization with loss on
completions only.

`builtin:e2e` is the E2E NLG Challenge's human-written data (CC BY-SA 4.0, vendored in `workers/data/e2e/` with its
licence and checked against the published digests): the meaning representation is the prompt, as written in the
data (`name[The Eagle], eatType[pub], ...`), and one human reference the completion. Training and validation are
`devset.csv` split by MR (a seeded tenth of its MRs validates); the test split is `testset_w_refs.csv`, one example
per MR with every reference of that MR, so generations are scored against all of them.

`builtin:restaurants` is a seeded generator in the style of the E2E NLG challenge: a meaning representation
(`name[The Eagle], eatType[pub], ...`) as the prompt, one fluent sentence realising every attribute as the
completion. Records, templates and orderings are ours; the same seed gives the same splits everywhere.

Example:
    >>> splits = load_splits("builtin:restaurants")
    >>> len(splits.train), len(splits.validation), len(splits.test)
    (2000, 200, 200)
    >>> splits.train[0].prompt.startswith("name[")
    True
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.jsonl import JsonlLineError, read_examples

E2E_DIR = Path(__file__).resolve().parent / "data" / "e2e"
#: sha256 of the decompressed CSVs, as published with the data (workers/data/e2e/README.md).
E2E_FILES = {
    "devset.csv": "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    "testset_w_refs.csv": "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
}
E2E_SEED = 2017
#: The share of devset MRs held out for validation.
E2E_VALIDATION_SHARE = 0.1
BUILTIN_DATASETS = ("builtin:e2e", "builtin:restaurants")

RESTAURANTS_SEED = 2023
RESTAURANTS_SIZES = {"train": 2000, "validation": 200, "test": 200}
#: Between prompt and completion for models without a chat template.
SEPARATOR = "\n### Sentence:\n"
#: Ignored by the cross-entropy loss: prompt and padding positions.
IGNORE = -100
#: JSONL files smaller than this train and evaluate on the same rows (there is nothing to hold out).
MIN_ROWS_TO_SPLIT = 10


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    """One prompt and its completion; `references` holds every human reference when there are several (E2E's
    test MRs), else it is empty and `completion` is the one reference."""

    prompt: str
    completion: str
    references: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        """What a generation for this prompt is scored against."""
        return self.references or (self.completion,)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


# --- builtin:e2e --------------------------------------------------------------------------------------------


def _e2e_rows(name: str) -> list[tuple[str, str]]:
    """(mr, ref) rows of one vendored CSV, after checking its digest."""
    import csv
    import gzip
    import hashlib
    import io

    data = gzip.decompress((E2E_DIR / f"{name}.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != E2E_FILES[name]:
        raise DatasetError(f"builtin:e2e: {name} does not match its published sha256; the copy is damaged")
    return [(row["mr"], row["ref"]) for row in csv.DictReader(io.StringIO(data.decode("utf-8")))]


def _by_mr(rows: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for mr, ref in rows:
        grouped.setdefault(mr, []).append(ref)
    return grouped


def e2e() -> Splits:
    """Train and validation rows from devset.csv, split by MR; one test example per MR of testset_w_refs.csv."""
    dev = _by_mr(_e2e_rows("devset.csv"))
    mrs = sorted(dev)
    random.Random(E2E_SEED).shuffle(mrs)
    held = round(len(mrs) * E2E_VALIDATION_SHARE)
    train = [Example(mr, ref) for mr in mrs[held:] for ref in dev[mr]]
    validation = [Example(mr, ref) for mr in mrs[:held] for ref in dev[mr]]
    random.Random(E2E_SEED).shuffle(train)  # batches mix MRs
    test_refs = _by_mr(_e2e_rows("testset_w_refs.csv"))
    test_mrs = sorted(test_refs)
    random.Random(E2E_SEED).shuffle(test_mrs)  # the first N MRs are a fixed random sample
    test = [Example(mr, test_refs[mr][0], tuple(test_refs[mr])) for mr in test_mrs]
    return Splits(train, validation, test)


# --- builtin:restaurants ------------------------------------------------------------------------------------

_NAMES = [
    "The Eagle", "The Mill", "Blue Spice", "The Punter", "Green Man", "The Wrestlers", "Aromi", "Cotto",
    "The Phoenix", "Zizzi", "The Cricketers", "Fitzbillies", "Loch Fyne", "The Vaults", "Strada", "Giraffe",
    "The Golden Curry", "Alimentum", "Browns Cambridge", "The Olive Grove", "Taste of Cambridge", "Midsummer House",
    "The Twenty Two", "Clowns", "The Rice Boat", "Bibimbap House", "Wildwood", "The Dumpling Tree",
]  # fmt: skip
_NEAR = [
    "Burger King", "the Crowne Plaza Hotel", "Café Rouge", "the Rice Boat", "Raja Indian Cuisine", "Yippee Noodle Bar",
    "All Bar One", "Café Sicilia", "the Portland Arms", "Express by Holiday Inn", "Ranch", "Café Brazil",
]  # fmt: skip
_VALUES = {
    "eatType": ["coffee shop", "pub", "restaurant"],
    "food": ["French", "Italian", "Chinese", "Japanese", "Indian", "English", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["riverside", "city centre"],
    "familyFriendly": ["yes", "no"],
}
_OPTIONAL = ["eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]

# Openings: each realises name (+ eatType when given).
_OPEN_TYPED = ["{name} is a {eatType}", "There is a {eatType} called {name}", "{name} is a {eatType} venue"]
_OPEN_PLAIN = ["{name} is a place", "There is a place called {name}", "{name} is an eatery"]
# Clauses: each realises one attribute as a phrase that can follow the opening; several phrasings each.
_CLAUSES = {
    "food": ["serving {food}", "offering {food}", "specialising in {food}"],
    "priceRange": ["in the {v} price range", "with a {v} price range", "priced {v}"],
    "customer rating": ["rated {v} by customers", "with a {v} customer rating", "holding a {v} customer rating"],
    "area": ["in the {v}", "located in the {v} area", "situated in the {v}"],
    "near": ["near {v}", "close to {v}", "not far from {v}"],
    "familyFriendly": ["{kids} for families", "{kids} for children"],
}


def _mr(record: dict[str, str]) -> str:
    return ", ".join(f"{key}[{value}]" for key, value in record.items())


def _realise(record: dict[str, str], rng: random.Random) -> str:
    """One sentence that realises every attribute of `record`, in a random clause order and phrasing."""
    values = {"name": record["name"], "eatType": record.get("eatType", "")}
    opening = rng.choice(_OPEN_TYPED if "eatType" in record else _OPEN_PLAIN).format(**values)
    clauses = []
    keys = [k for k in record if k in _CLAUSES]
    rng.shuffle(keys)
    for key in keys:
        v = record[key]
        food = "fast food" if v == "Fast food" else f"{v} food"
        kids = "suitable" if v == "yes" else "not suitable"
        clauses.append(rng.choice(_CLAUSES[key]).format(v=v, food=food, kids=kids))
    if not clauses:
        return opening + "."
    if len(clauses) == 1:
        return f"{opening} {clauses[0]}."
    return f"{opening} {', '.join(clauses[:-1])} and {clauses[-1]}."


def _record(rng: random.Random) -> dict[str, str]:
    chosen = set(rng.sample(_OPTIONAL, rng.randint(2, len(_OPTIONAL))))
    record = {"name": rng.choice(_NAMES)}
    for key in _OPTIONAL:  # E2E's fixed attribute order in the meaning representation
        if key in chosen:
            record[key] = rng.choice(_NEAR) if key == "near" else rng.choice(_VALUES[key])
    return record


def restaurants(seed: int = RESTAURANTS_SEED, sizes: dict[str, int] | None = None) -> Splits:
    """Distinct meaning representations, split so that no MR of one split appears in another."""
    sizes = sizes or RESTAURANTS_SIZES
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[Example] = []
    while len(examples) < sum(sizes.values()):
        record = _record(rng)
        mr = _mr(record)
        if mr in seen:
            continue
        seen.add(mr)
        examples.append(Example(mr, _realise(record, rng)))
    n_train, n_val = sizes["train"], sizes["validation"]
    return Splits(examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :])


# --- JSONL --------------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[Example]:
    """Every `{prompt, completion}` line of `path`; `DatasetError` naming the first bad line. Blank lines skip."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DatasetError(f"dataset file {str(path)!r} cannot be read: {exc.strerror}") from exc
    with handle:
        try:
            examples = [Example(prompt, completion) for _, prompt, completion in read_examples(handle)]
        except JsonlLineError as exc:
            raise DatasetError(f"dataset {path.name}, {exc}") from exc
    if not examples:
        raise DatasetError(f"dataset {path.name} holds no examples")
    return examples


def split_rows(rows: Sequence[Example], seed: int) -> Splits:
    """A seeded 80/10/10 split; files under `MIN_ROWS_TO_SPLIT` rows use every row in every split."""
    if len(rows) < MIN_ROWS_TO_SPLIT:
        return Splits(list(rows), list(rows), list(rows))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = max(1, len(rows) // 10)
    pick = [rows[i] for i in order]
    return Splits(pick[2 * held :], pick[:held], pick[held : 2 * held])


def load_splits(
    ref: str, *, resolve_dataset: Callable[[str], Path] | None = None, seed: int = RESTAURANTS_SEED
) -> Splits:
    """`builtin:e2e`, `builtin:restaurants`, an uploaded `ds_<id>` (through `resolve_dataset`) or a local JSONL."""
    if ref == "builtin:e2e":
        return e2e()
    if ref == "builtin:restaurants":
        return restaurants()
    if ref.startswith("builtin:"):
        raise DatasetError(f"unknown builtin dataset {ref!r}; builtins: {', '.join(BUILTIN_DATASETS)}")
    if ref.startswith("ds_"):
        if resolve_dataset is None:
            raise DatasetError(f"dataset {ref!r} is an upload, but this run has no dataset store to find it in")
        path = resolve_dataset(ref)
    else:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise DatasetError(f"dataset file {ref!r} does not exist on this worker")
    return split_rows(read_jsonl(Path(path)), seed)


# --- tokenization -------------------------------------------------------------------------------------------


def prompt_text(tokenizer: Any, prompt: str, chat: bool) -> str:
    """What the model sees before it writes the completion (also the generation prompt)."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + SEPARATOR


def _completion_ids(tokenizer: Any, example: Example, chat: bool, prefix: str) -> list[int]:
    if not chat:
        return tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}],
        tokenize=False,
    )
    if not full.startswith(prefix):
        raise DatasetError("the chat template renders the conversation differently from its generation prompt")
    return tokenizer(full[len(prefix) :], add_special_tokens=False).input_ids


def encode(tokenizer: Any, example: Example, max_length: int, chat: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels `IGNORE` on the prompt, within `max_length` tokens.

    Prompt and completion are tokenized separately, so the boundary is exact for any tokenizer. When both
    do not fit, the completion keeps at least a quarter of the window and the prompt loses its start (the end,
    with the assistant header, is what the completion depends on most).
    """
    prefix = prompt_text(tokenizer, example.prompt, chat)
    prompt_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    completion_ids = _completion_ids(tokenizer, example, chat, prefix)
    keep = min(len(completion_ids), max(max_length - len(prompt_ids), max_length // 4))
    room = max_length - keep
    prompt_ids = prompt_ids[-room:] if room > 0 else []
    completion_ids = completion_ids[:keep]
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, pad_to: int | None = None) -> dict:
    """Right-pad a batch to its longest row (or to `pad_to`): input_ids, attention_mask, labels as tensors."""
    import torch

    width = max(pad_to or 0, max(len(ids) for ids, _ in encoded))
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (x, y) in enumerate(encoded):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
