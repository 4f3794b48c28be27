"""Use a trained QAA adapter in a plain transformers script: load the base model, put the adapter on it, generate.

qaa-client download JOB --dest out/      # the job's artifacts: the adapter, metrics.json, samples.jsonl, ...
python examples/use_adapter.py --adapter out/ --prompt "name[Aromi], eatType[coffee shop], area[riverside]"
"""

import argparse

import torch
from peft import PeftModel

import circuits.tuner  # noqa: F401  (registers QAA with PEFT, so PeftModel.from_pretrained knows it)
from workers.datasets import prompt_text  # the prompt exactly as the job trained on it
from workers.models import load_model  # SmolLM2 offline; AutoModelForCausalLM.from_pretrained works the same

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="builtin:smollm2-135m", help="The base model the adapter was trained on.")
parser.add_argument("--adapter", required=True, help="The adapter folder (adapter_config.json + safetensors).")
parser.add_argument("--prompt", required=True)
parser.add_argument("--max-new-tokens", type=int, default=48)
args = parser.parse_args()

loaded = load_model(args.model)
tokenizer = loaded.tokenizer
model = PeftModel.from_pretrained(loaded.model, args.adapter).eval()  # the exact engine; no quantum backend needed
inputs = tokenizer(prompt_text(tokenizer, args.prompt, loaded.chat), return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
