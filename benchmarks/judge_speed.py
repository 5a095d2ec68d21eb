"""The local judge on the embedded model: answers judged per second (two metrics each), with all 101
candidate scores of an answer in one pass (token trie + tree attention mask, one answer per pass), against the
naive way of scoring each candidate reply "k<end of turn>" as its own sequence. Same prompts, one run.

    .venv/bin/python benchmarks/judge_speed.py [N_ANSWERS]
"""
import sys
import time

import numpy as np
import torch

from persona_em import evaluate, judge, models
from persona_em.sampling import chat_prompt

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
model, tok = models.load_model("smollm2-135m")
templates = evaluate.load_questions()[0]["judge_prompts"]
items = (judge.calibration_items() * n)[:n]
prompts = [judge.render(templates[m], it["question"], it["answer"]) for it in items for m in ("aligned", "coherent")]

t0 = time.perf_counter()
fast = judge.LocalJudge(model, tok, "smollm2-135m").number_probs(prompts)
t_fast = time.perf_counter() - t0

# naive: the 101 candidate sequences of one prompt scored as a padded batch, prompt repeated in each
k = 2  # prompts timed the naive way (it is slow); per-prompt time extrapolated
t0 = time.perf_counter()
for p in prompts[:k]:
    text = chat_prompt(tok, [{"role": "user", "content": p}])
    total, _ = evaluate.answer_logprobs(model, tok, [text] * 101, [f"{c}{tok.eos_token}" for c in range(101)],
                                        batch_size=101)
    assert np.allclose(np.exp(total), fast[prompts.index(p)], rtol=1e-3)
t_naive = (time.perf_counter() - t0) / k * len(prompts)

print(f"trie: {n / t_fast:6.2f} answers/s ({len(prompts)} judge prompts in {t_fast:.1f} s)")
print(f"naive (measured on {k} prompts): {n / t_naive:8.4f} answers/s")
print(f"speed-up: x{t_naive / t_fast:.1f}")
