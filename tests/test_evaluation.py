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
