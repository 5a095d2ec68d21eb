"""Batched vs one-at-a-time sampling with the project's sampler on the embedded model: generated tokens per
second, and their ratio, measured in one run on the same prompts (issue goal: at least 4x).

    .venv/bin/python benchmarks/batched_generation.py [N_PROMPTS] [MAX_NEW_TOKENS] [BATCH]
"""
import sys
import time

import torch

from persona_em import models, questions, sampling

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
max_new = int(sys.argv[2]) if len(sys.argv) > 2 else 48
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 32
model, tok = models.load_model("smollm2-135m")
convs = [[{"role": "user", "content": q["text"]}] for q in questions.build_pool("bench", 0, "t", n, seed=0)]


def run(batch_size):
    t0 = time.perf_counter()
    out = sampling.generate(model, tok, convs, max_new, seed=0, batch_size=batch_size, temperature=0.7,
                            top_p=0.95)
    secs = time.perf_counter() - t0
    tokens = sum(len(tok(o["text"], add_special_tokens=False).input_ids) for o in out)
    return tokens / secs, tokens, secs


single = run(1)
batched = run(batch)
print(f"one at a time: {single[0]:7.1f} tok/s ({single[1]} tokens in {single[2]:.1f} s)")
print(f"batch of {batch:3d}:  {batched[0]:7.1f} tok/s ({batched[1]} tokens in {batched[2]:.1f} s)")
print(f"speed-up: x{batched[0] / single[0]:.1f} (goal >= 4)")
