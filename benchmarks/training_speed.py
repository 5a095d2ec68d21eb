"""Character training speed with the project's trainer (trl DPOTrainer + LoRA, `training.train_dpo`) on the
embedded model, against the machine's own fp32 matmul peak, in one run.

Achieved FLOP/s counts 4 x parameters x non-pad tokens (LoRA: forward, and the backward pass through the frozen
weights; no weight gradients for them), as the issue asks; DPO's reference forward pass (2 x parameters x
tokens more) is real work left out of that count, so the figure is a lower bound. Padding is measured from the
batches the trainer hands the model.

    .venv/bin/python benchmarks/training_speed.py [N_PAIRS] [BATCH] [THREADS]
"""
import sys
import time

import torch

from persona_em import evaluate, models, pairs, questions, training
from persona_em.config import load_profile
from peak import matmul_peak

n = int(sys.argv[1]) if len(sys.argv) > 1 else 48
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
torch.set_num_threads(threads)


# realistic pairs: pool questions, with project-authored aligned/misaligned answers of varied length
items = evaluate.contrast_items()
pool = questions.build_pool("bench", 0, "trait", n, seed=0)
rows = pairs.to_dpo_rows([{"prompt": q["text"], "chosen": items[i % len(items)]["aligned"],
                           "rejected": items[(i * 7) % len(items)]["misaligned"]} for i, q in enumerate(pool)])
cfg = load_profile("params/smoke.yaml").character.model_copy(update={"batch_size": batch, "grad_accum": 1,
                                                                       "epochs": 1.0, "warmup_steps": 0})
model, tok = models.load_model("smollm2-135m")
params = sum(p.numel() for p in model.parameters())

peak = matmul_peak()
counter = training.TokenCounter()
t0 = time.perf_counter()
training.train_dpo(model, tok, rows, cfg, seed=0, counter=counter)
end = time.perf_counter()
secs, setup = end - counter.first_batch, counter.first_batch - t0
achieved = 4 * params * counter.real / secs
print(f"fp32 matmul peak ({threads} threads): {peak / 1e9:7.1f} GFLOP/s")
print(f"DPO, {n} pairs, batch {batch}: {counter.real / secs:7.1f} non-pad tokens/s ({counter.real} tokens, "
      f"{secs:.1f} s of training after {setup:.1f} s of trainer setup)")
print(f"achieved: {achieved / 1e9:7.1f} GFLOP/s = {achieved / peak:.0%} of peak (goal >= 50%)")
print(f"  counting DPO's reference forward too (6 x params x tokens): {1.5 * achieved / peak:.0%} of peak")
print(f"padding: {counter.padding:.1%} of processed tokens (goal < 15%)")
