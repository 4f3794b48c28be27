"""Evaluation: metric values on known strings, token-weighted eval loss, batched greedy generation."""

from __future__ import annotations

import pytest
import torch

from workers.datasets import Example, restaurants
from workers.evaluation import eval_loss, generate, minilm_path, peak_memory_mb, score
from workers.models import load_model

SENTENCES = ["The Eagle is a cheap pub near Burger King.", "Aromi serves Italian food in the city centre."]


def test_identical_strings_score_perfectly():
    scores = score(SENTENCES, SENTENCES, ["bleu", "rouge", "bertscore"])
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge1"] == scores["rouge2"] == scores["rougeL"] == 1.0
    assert scores["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)


def test_different_strings_score_lower_with_known_rouge():
    scores = score(["the cat sat"], ["the cat ran"], ["bleu", "rouge"])
    assert scores["rouge1"] == pytest.approx(2 / 3)  # 2 of 3 unigrams match both ways
    assert scores["rouge2"] == pytest.approx(1 / 2)
    assert scores["bleu"] < 100
    unrelated = score(["zebra quantum"], SENTENCES[:1], ["rouge", "bertscore"])
    assert unrelated["rouge1"] == 0.0 and unrelated["bertscore_f1"] < 0.9
    assert set(score(["a"], ["a"], ["bleu"])) == {"bleu"}, "only the metrics asked for"
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
    scores = score(["", SENTENCES[0]], [SENTENCES[0], SENTENCES[0]], ["bertscore"])
    assert scores["bertscore_f1"] == pytest.approx(0.5, abs=1e-4)  # (0 + 1) / 2


def test_prefix_tuning_generates_with_its_prefix():
    """Greedy generation of a PEFT prefix-tuned model equals greedy decoding by full forwards (the prefix applied
    at every step), and differs from the base model's: transformers 5's generation cache would drop the prefix."""
    from service.spec import parse_spec
    from workers.methods import prepare

    spec = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "method": {"kind": "prefix"}}
    model, tokenizer = load_model("builtin:tiny-llama")
    prompts = [e.prompt for e in restaurants().test[:3]]
    kwargs = {"chat": False, "max_length": 32, "max_new_tokens": 6, "batch_size": 3, "device": torch.device("cpu")}
    base = generate(model, tokenizer, prompts, **kwargs)
    tuned = prepare(model, parse_spec(spec)).model
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 3)
    generated = generate(tuned, tokenizer, prompts, **kwargs)

    expected = []
    for prompt in prompts:  # one at a time: no padding, and nothing cached between steps
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids[:, -32:]
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(6):
                ids = torch.cat([ids, tuned(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected.append(tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip())
    assert generated == expected
    assert generated != base
