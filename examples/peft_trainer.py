"""Fine-tune SmolLM2 with QAA through transformers.Trainer, as with any PEFT method (docs/qaa.md).

python examples/peft_trainer.py --steps 40 --out qaa-adapter      # then PeftModel.from_pretrained(base, out)
"""

import argparse
import json
from pathlib import Path

from peft import get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from circuits import QAAPeftConfig  # registers QAA with PEFT
from workers.models import load_model  # SmolLM2 offline; AutoModelForCausalLM.from_pretrained works the same

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="builtin:smollm2-135m")
parser.add_argument("--data", default=Path(__file__).with_name("cafes.jsonl"), type=Path)
parser.add_argument("--steps", default=40, type=int)
parser.add_argument("--out", default="qaa-adapter")
args = parser.parse_args()

model, tokenizer = load_model(args.model)
model = get_peft_model(model, QAAPeftConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
model.print_trainable_parameters()

rows = [json.loads(line) for line in args.data.read_text().splitlines()]
train = [tokenizer(f"{r['prompt']}\n{r['completion']}{tokenizer.eos_token}", truncation=True, max_length=64)
         for r in rows]  # fmt: skip

arguments = TrainingArguments(args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=2e-3,
                              logging_steps=5, save_strategy="no", report_to=[], use_cpu=True)  # fmt: skip
collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
trainer = Trainer(model=model, args=arguments, train_dataset=train, data_collator=collator)
trainer.train()
model.save_pretrained(args.out)
print(json.dumps({"losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}))
