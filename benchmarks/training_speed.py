"""Character training speed with the project's trainer (trl DPOTrainer + LoRA, `training.train_dpo`) on the
embedded model, against the machine's own fp32 matmul peak, in one run: float32, then the same training under
`hardware.training_autocast: bfloat16` (bf16 matmuls over float32 weights).

Achieved FLOP/s counts 4 x parameters x non-pad tokens (LoRA: forward, and the backward pass through the frozen
weights; no weight gradients for them), as the issue asks; DPO's reference forward pass (2 x parameters x
tokens more) is real work left out of that count, so the figure is a lower bound. Padding is measured from the
batches the trainer hands the model.

The yardstick is the fastest of several fp32 matmuls measured before and after training (this VM's matmul rate
drifts by up to a third between calls; the highest rate seen is what the cores can do, and the ratio is then
conservative). Threads default to 1, as `make reproduce` runs its jobs (THREADS=1, one job per core).

    .venv/bin/python benchmarks/training_speed.py [N_PAIRS] [BATCH] [THREADS]

Writes benchmarks/results/training_speed.csv (`record`'s format).
"""
import sys
import time

import torch

from persona_em import evaluate, models, pairs, questions, training
from persona_em.config import HardwareConfig, load_profile
from peak import NO_BF16, bf16_peak as bf16_peak_of, fastest_peak as peak, native_bf16
from record import write

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(threads)


# realistic pairs: pool questions, with project-authored aligned/misaligned answers of varied length
items = evaluate.contrast_items()
pool = questions.build_pool("bench", 0, "trait", n, seed=0)
rows = pairs.to_dpo_rows([{"prompt": q["text"], "chosen": items[i % len(items)]["aligned"],
                           "rejected": items[(i * 7) % len(items)]["misaligned"]} for i, q in enumerate(pool)])
cfg = load_profile("params/smoke.yaml").character.model_copy(update={"batch_size": batch, "grad_accum": 1,
                                                                       "epochs": 1.0, "warmup_steps": 0})
NATIVE = native_bf16()
fp32_peak, bf16_peak = peak(), bf16_peak_of()
results = {}
for autocast in ("none", "bfloat16") if NATIVE else ("none",):
    model, tok = models.load_model("smollm2-135m")
    params = sum(p.numel() for p in model.parameters())
    counter = training.TokenCounter()
    t0 = time.perf_counter()
    _, log, _ = training.train_dpo(model, tok, rows, cfg, seed=0, counter=counter,
                                   hw=HardwareConfig(training_autocast=autocast))
    end = time.perf_counter()
    results[autocast] = (counter, end - counter.first_batch, counter.first_batch - t0, params, log)
fp32_peak, bf16_peak = max(fp32_peak, peak()), max(bf16_peak, bf16_peak_of())

print(f"matmul peak ({threads} thread{'s' if threads > 1 else ''}): fp32 {fp32_peak / 1e9:6.1f} GFLOP/s, "
      f"bf16 {bf16_peak / 1e9:6.1f} GFLOP/s")
for autocast, (counter, secs, setup, params, log) in results.items():
    achieved = 4 * params * counter.real / secs
    name = "float32" if autocast == "none" else "bf16 autocast"
    print(f"DPO {name}, {n} pairs, batch {batch}: {counter.real / secs:6.1f} non-pad tokens/s "
          f"({counter.real} tokens, {secs:.1f} s of training after {setup:.1f} s of trainer setup); "
          f"final loss {log['loss'].iloc[-1]:.4f}")
    print(f"  achieved {achieved / 1e9:6.1f} GFLOP/s = {achieved / fp32_peak:.0%} of the fp32 peak (goal >= 50%)"
          + ("" if autocast == "none" else f", {achieved / bf16_peak:.0%} of the bf16 peak"))
    print(f"  counting DPO's reference forward too (6 x params x tokens): {1.5 * achieved / fp32_peak:.0%} of the "
          f"fp32 peak")
    print(f"  padding: {counter.padding:.1%} of processed tokens (goal < 15%)")
speedup = results["none"][1] / results["bfloat16"][1] if NATIVE else None
print(f"bf16 autocast / float32 training speed: {speedup:.2f}x" if NATIVE else f"bf16 autocast: {NO_BF16}")
write("training_speed", [
    {"figure": f"DPO {'float32' if a == 'none' else 'bf16 autocast'}, batch {batch}, {threads} thread(s): non-pad "
               f"tokens/s (4 x parameters per token; padding {c.padding:.1%})",
     "value": c.real / secs, "unit": "tokens/s", "ratio": 4 * params * c.real / secs / fp32_peak,
     "against": "fp32 matmul peak"} for a, (c, secs, setup, params, log) in results.items()] + [
    {"figure": "DPO bf16 autocast vs float32", "value": results["bfloat16"][0].real / results["bfloat16"][1],
     "unit": "tokens/s", "ratio": speedup, "against": "float32 DPO"} if NATIVE else
    {"figure": "DPO bf16 autocast", "value": "", "unit": "", "ratio": "", "against": NO_BF16}])
