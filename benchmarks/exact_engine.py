"""QAA on the exact engine against PEFT LoRA r=8: one SmolLM2-135M training step, side by side in one run.

Each method trains in its own subprocess (so peak RSS is its own) and the two alternate `--rounds` times. A round's
step time is its fastest step (as timeit reports: other load on a shared machine only ever adds time), and the
figures are medians over the rounds. Peak RSS is the kernel's high-water mark over the timed steps only: it is
reset after the model is loaded (`/proc/self/clear_refs`), so loading, common to both, does not hide the difference.

    python benchmarks/exact_engine.py            # writes benchmarks/results/exact_engine.json
    python benchmarks/exact_engine.py --device cuda --batch 16 --tokens 128 --out FILE   # benchmarks/gpu_check.sh
    PYTHONPATH=TREE python benchmarks/exact_engine.py --scaling   # one adapter's cost per n, of TREE's engine

On CUDA the memory figure is torch's peak allocation over the timed steps (`peak_cuda_mb`), and every step is
timed between two `torch.cuda.synchronize()` calls.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "exact_engine.json"
TARGETS = ["q_proj", "v_proj"]


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_step(method: str, steps: int, warmup: int, device: str = "cpu", batch: int = 4, tokens: int = 64) -> dict:
    """Runs in a subprocess: load SmolLM2, attach the method, time AdamW steps on a `batch` x `tokens` batch."""
    import torch

    from circuits import QAAConfig, inject_qaa, trainable_summary
    from workers.models import load_model

    torch.manual_seed(0)
    model, _ = load_model("builtin:smollm2-135m")
    model.to(device).train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        inject_qaa(model, QAAConfig(target_modules=TARGETS, layers=2, readout="expval"))
    share = trainable_summary(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(warmup + steps):
        if i == warmup:  # loading and warm-up are not measured
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    memory = {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {"peak_rss_mb": _peak_rss_mb()}
    figures = {"step_seconds": min(times), **memory, "trainable_params": share["trainable"],
               "trainable_share": share["share"]}  # fmt: skip
    if method == "qaa":
        from circuits.backends.exact import engine_path

        figures["exact_engine"] = engine_path(torch.device(device))  # kernel on a CPU, compiled on CUDA by default
    return figures


def scaling(qubits: range, tokens: int = 256) -> dict[str, float]:
    """Forward + backward of one QAA adapter alone (embedding, circuit, `up`; L = 2, expval) per 1,000 tokens, in
    milliseconds, by register size n (d_in = d_out = 2^n)."""
    import torch
    from torch import nn

    from circuits import QAAAdapter, QAAConfig, QAALayer

    out = {}
    for n in qubits:
        layer = QAALayer(nn.Linear(2**n, 2**n), QAAConfig(layers=2)).adapter()
        nn.init.normal_(layer.up.weight, std=0.01)
        x = torch.randn(tokens, 2**n, requires_grad=True)

        def adapter_step(layer: QAAAdapter = layer, x: torch.Tensor = x) -> None:
            layer.up(layer.engine(layer.adapter_input(x), layer.theta)).sum().backward()

        for _ in range(2):
            adapter_step()
        runs = []
        for _ in range(7):
            start = time.perf_counter()
            adapter_step()
            runs.append(time.perf_counter() - start)
        out[str(n)] = round(statistics.median(runs) / tokens * 1000 * 1000, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating subprocess runs per method")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=["lora", "qaa"], help=argparse.SUPPRESS)
    parser.add_argument("--scaling", action="store_true", help="print one adapter's cost per n only (no file)")
    args = parser.parse_args()
    if args.scaling:
        print(json.dumps(scaling(range(4, 13))))
        return
    shape = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
             "--batch", str(args.batch), "--tokens", str(args.tokens)]  # fmt: skip
    if args.child:
        print(json.dumps(measure_step(args.child, args.steps, args.warmup, args.device, args.batch, args.tokens)))
        return

    runs: dict[str, list[dict]] = {"lora": [], "qaa": []}
    for _ in range(args.rounds):
        for method in runs:
            cmd = [sys.executable, __file__, "--child", method, *shape]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(method, runs[method][-1], flush=True)

    def med(method: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[method])

    import torch

    memory = "peak_cuda_mb" if args.device == "cuda" else "peak_rss_mb"
    result = {
        "qaa_over_lora_step_time": round(med("qaa", "step_seconds") / med("lora", "step_seconds"), 3),
        f"qaa_over_lora_{memory.removesuffix('_mb')}": round(med("qaa", memory) / med("lora", memory), 3),
        "qaa_trainable_share": med("qaa", "trainable_share"),
        "lora_trainable_share": med("lora", "trainable_share"),
        "qaa_step_seconds": round(med("qaa", "step_seconds"), 3),
        "lora_step_seconds": round(med("lora", "step_seconds"), 3),
        f"qaa_{memory}": round(med("qaa", memory)),
        f"lora_{memory}": round(med("lora", memory)),
        "qaa_trainable_params": runs["qaa"][0]["trainable_params"],
        "lora_trainable_params": runs["lora"][0]["trainable_params"],
        "scaling_ms_per_1k_tokens": scaling(range(4, 13)) if args.device == "cpu" else None,
        "setup": {
            "model": "builtin:smollm2-135m",
            "batch": f"{args.batch} x {args.tokens} tokens",
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "adapters": "q_proj, v_proj (60)",
            "qaa": f"exact engine ({runs['qaa'][0]['exact_engine']}), n = 10, L = 2, ring, expval",
            "lora": "PEFT r = 8, alpha 16",
            "steps": f"fastest of {args.steps} steps after {args.warmup} warm-up, median of {args.rounds} alternating "
            "rounds",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
