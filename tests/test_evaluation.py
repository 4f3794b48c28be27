"""Evaluation: metric values on known strings, token-weighted eval loss, batched greedy generation."""

from __future__ import annotations

import pytest
import torch

from workers.datasets import Example, prompt_text, restaurants
from workers.evaluation import eval_loss, generate, minilm_path, peak_memory_mb, score
from workers.models import load_model

SENTENCES = ["The Eagle is a cheap pub near Burger King.", "Aromi serves Italian food in the city centre."]


def test_identical_strings_score_perfectly():
    scores = score(SENTENCES, [[s] for s in SENTENCES], ["bleu", "rouge", "bertscore"])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge1"] == scores["rouge2"] == scores["rougeL"] == 1.0
    assert scores["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)


def test_different_strings_score_lower_with_known_rouge():
    scores = score(["the cat sat"], [["the cat ran"]], ["bleu", "rouge"])
    assert scores["rouge1"] == pytest.approx(2 / 3)  # 2 of 3 unigrams match both ways
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["bleu"] < 100
    unrelated = score(["zebra quantum"], [SENTENCES[:1]], ["rouge", "bertscore"])
    assert unrelated["rouge1"] == 0.0 and unrelated["bertscore_f1"] < 0.9
    assert set(score(["a"], [["a"]], ["bleu"])) == {"bleu"}, "only the metrics asked for"
    assert (minilm_path() / "config.json").is_file()


def test_eval_loss_weighs_tokens_equally_whatever_the_batch():
    loaded = load_model("builtin:tiny-llama")
    examples = restaurants().validation[:5]
    kwargs = {"chat": True, "max_length": 96, "device": torch.device("cpu")}
    one = eval_loss(loaded.model, loaded.tokenizer, examples, batch_size=1, **kwargs)
    three = eval_loss(loaded.model, loaded.tokenizer, examples, batch_size=3, **kwargs)
    assert one == pytest.approx(three, abs=1e-5)
    assert 5.0 < one < 6.0  # random init over a 260-token vocabulary: about ln(260) = 5.56


def test_batched_generation_matches_one_at_a_time():
    loaded = load_model("builtin:tiny-llama")
    prompts = [e.prompt for e in restaurants().test[:3]] + ["short"]
    kwargs = {"chat": True, "max_length": 128, "max_new_tokens": 6, "device": torch.device("cpu")}
    batched = generate(loaded.model, loaded.tokenizer, prompts, batch_size=4, **kwargs)
    single = [generate(loaded.model, loaded.tokenizer, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == single and len(batched) == 4


def test_peak_memory_is_the_rss_high_water_mark_on_cpu():
    assert 50 < peak_memory_mb(torch.device("cpu")) < 64 * 1024
    assert Example("a", "b").prompt == "a"


def test_empty_generation_scores_zero_bertscore():
    scores = score(["", SENTENCES[0]], [SENTENCES[:1], SENTENCES[:1]], ["bertscore"])
    assert scores["bertscore_f1"] == pytest.approx(0.5, abs=1e-4)  # (0 + 1) / 2


def _prefix_tuned(model_name: str, scale: float):
    """`model_name` with PEFT prefix tuning whose trained prefix is random (seeded) at `scale`."""
    from service.spec import parse_spec
    from workers.methods import prepare

    spec = {"model": model_name, "dataset": "builtin:restaurants", "method": {"kind": "prefix"}}
    model, tokenizer = load_model(model_name)
    tuned = prepare(model, parse_spec(spec)).model
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * scale)
    return tuned, tokenizer


def _greedy_by_full_forwards(model, tokenizer, prompt: str, chat: bool, new_tokens: int) -> str:
    """The reference: every step a full forward through PEFT (the prefix applied), nothing cached."""
    ids = tokenizer(prompt_text(tokenizer, prompt, chat), add_special_tokens=False, return_tensors="pt").input_ids
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(new_tokens):
            token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            if token.item() == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()


def test_prefix_tuning_generates_with_its_prefix():
    """Greedy generation of a PEFT prefix-tuned model equals greedy decoding by full forwards (the prefix applied
    at every step). A fast check of the plumbing: the random tiny model's text is too degenerate to show what
    transformers 5's `generate` gets wrong (it keeps PEFT's prefix for the first token only); the test below is."""
    tuned, tokenizer = _prefix_tuned("builtin:tiny-llama", scale=0.5)
    prompts = [e.prompt for e in restaurants().test[:3]]
    kwargs = {"chat": False, "max_length": 64, "max_new_tokens": 8, "batch_size": 3, "device": torch.device("cpu")}
    generated = generate(tuned, tokenizer, prompts, **kwargs)
    assert generated == [_greedy_by_full_forwards(tuned, tokenizer, p, False, 8) for p in prompts]


@pytest.mark.slow
def test_prefix_tuned_smollm2_generates_what_full_forwards_decode():
    """The same on the pretrained model, where the text is real: 16 tokens that depend on the prefix throughout
    (the base model writes something else). Generation through transformers' `generate` fails this."""
    tuned, tokenizer = _prefix_tuned("builtin:smollm2-135m", scale=0.5)
    prompts = [e.prompt for e in restaurants().test[:1]]
    kwargs = {"chat": True, "max_length": 64, "max_new_tokens": 16, "batch_size": 1, "device": torch.device("cpu")}
    generated = generate(tuned, tokenizer, prompts, **kwargs)
    assert generated == [_greedy_by_full_forwards(tuned, tokenizer, p, True, 16) for p in prompts]
    with tuned.disable_adapter():
        base = generate(tuned.base_model, tokenizer, prompts, **kwargs)
    assert all(len(g.split()) >= 3 for g in generated) and generated != base


def test_each_generation_is_scored_against_all_references_of_its_prompt():
    """E2E-style: a generation that matches any one reference of its MR scores as a match."""
    candidates = [SENTENCES[1], "The Eagle pub is cheap and near Burger King."]
    one = [[SENTENCES[0]], [SENTENCES[0]]]
    both = [[SENTENCES[0], SENTENCES[1]], [SENTENCES[0]]]  # a second reference only for the first prompt
    single, multi = (score(candidates, refs, ["bleu", "rouge", "bertscore"]) for refs in (one, both))
    assert multi["bleu"] > single["bleu"] and multi["rougeL"] > single["rougeL"]
    assert multi["bertscore_f1"] > single["bertscore_f1"]
    exact = score([SENTENCES[1]], [[SENTENCES[0], SENTENCES[1]]], ["bleu", "rouge", "bertscore"])
    assert exact["bleu"] == pytest.approx(100.0) and exact["rougeL"] == 1.0
    assert exact["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)  # the best reference, not the mean
    with pytest.raises(ValueError, match="one non-empty list of references per candidate"):
        score(["a"], [[]], ["bleu"])


def test_e2e_is_split_by_meaning_representation_with_every_test_reference():
    from workers.datasets import E2E_FILES, load_splits

    splits = load_splits("builtin:e2e")
    train, validation = {e.prompt for e in splits.train}, {e.prompt for e in splits.validation}
    assert (len(train), len(validation), len(splits.test)) == (492, 55, 630)  # 547 devset MRs, 630 test MRs
    assert not train & validation and len(splits.train) + len(splits.validation) == 4672
    assert sum(len(e.references) for e in splits.test) == 4693 and len({e.prompt for e in splits.test}) == 630
    assert all(e.targets == e.references and e.completion == e.references[0] for e in splits.test)
    assert not {e.prompt for e in splits.test} & (train | validation)
    assert load_splits("builtin:e2e").test[:5] == splits.test[:5]  # a fixed sample, run after run
    assert set(E2E_FILES) == {"devset.csv", "testset_w_refs.csv"}


def test_a_damaged_e2e_copy_is_refused(tmp_path, monkeypatch):
    import gzip
    import shutil

    from workers import datasets

    for name in datasets.E2E_FILES:
        shutil.copy(datasets.E2E_DIR / f"{name}.gz", tmp_path)
    data = gzip.decompress((tmp_path / "devset.csv.gz").read_bytes()).replace(b"Alimentum", b"Alimentun", 1)
    (tmp_path / "devset.csv.gz").write_bytes(gzip.compress(data))
    monkeypatch.setattr(datasets, "E2E_DIR", tmp_path)
    with pytest.raises(datasets.DatasetError, match="devset.csv does not match its published sha256"):
        datasets.load_splits("builtin:e2e")
