"""Diversity measures on 10,000 questions: seconds, against the issue's 30 s budget and against a naive
baseline (Vendi from the full n x n similarity matrix, pairwise distances from that matrix), in one run; with
the packaged MiniLM in float32 and in bf16 (`embedder: minilm-bf16`: the packed encoder where it runs, else
sentence-transformers under bf16 autocast), how far the bf16 embeddings and their Vendi score are from float32's,
and the embedding's FLOP rate against the machine's fp32 and bf16 matmul peaks (the floor on the embedding time at
this question length).

    .venv/bin/python benchmarks/diversity_speed.py [N]

Writes benchmarks/results/diversity_speed.csv (`record`'s format).
"""
import sys
import time

import numpy as np
import torch

from peak import NO_BF16, embedding_flops, fastest_peak, native_bf16
from record import write
from persona_em import diversity, models, questions

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
pool = questions.build_pool("bench", 0, "t", n, seed=0)
# the matmul peaks, measured before the encodes and again after, the higher kept (the VM's rate drifts)
peaks = {torch.float32: fastest_peak(torch.float32)}
if native_bf16():
    peaks[torch.bfloat16] = fastest_peak(torch.bfloat16)
texts, cells = [q["text"] for q in pool], [q["cell"] for q in pool]


def timed_measures(spec: str):
    embedder = models.load_embedder(spec)
    embedder.encode(texts[:256], batch_size=128, show_progress_bar=False)   # warm-up, not timed
    t0 = time.perf_counter()
    emb = embedder.encode(texts, batch_size=128, show_progress_bar=False)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = diversity.measure(texts, emb, cells)
    labels = diversity.clusters(emb, k=16, seed=0)
    return emb, m, labels, t_embed, time.perf_counter() - t0, embedder


emb, m, labels, t_embed, t_measure, _ = timed_measures("minilm")
NATIVE = native_bf16()
if NATIVE:
    emb16, m16, _, t_embed16, t_measure16, embedder16 = timed_measures("minilm-bf16")
    BF16 = "bf16, packed encoder" if embedder16.packed is not None else "bf16 autocast"
    agree = float(np.mean(np.sum(diversity.unit(emb) * diversity.unit(emb16), axis=1)))

# naive baseline on a subsample (the full n x n eigenproblem at n = 10,000 takes many minutes)
k = 2000
t0 = time.perf_counter()
u = diversity.unit(emb[:k])
sim = u @ u.T
lam = np.linalg.eigvalsh(sim / k)
lam = lam[lam > 1e-12]
naive_vendi = float(np.exp(-(lam * np.log(lam)).sum()))
naive_mcd = float(1 - sim[~np.eye(k, dtype=bool)].mean())
t_naive = time.perf_counter() - t0
t0 = time.perf_counter()
fast_vendi, fast_mcd = diversity.vendi(emb[:k]), diversity.mean_cosine_distance(emb[:k])
t_fast = time.perf_counter() - t0
assert abs(naive_vendi - fast_vendi) < 1e-6 * naive_vendi and abs(naive_mcd - fast_mcd) < 1e-9

total = t_embed + t_measure
print(f"n={n} questions, fp32 MiniLM: embed {t_embed:.1f} s + measures and k-means {t_measure:.2f} s = {total:.1f} s "
      f"({total / 30:.2f} of the 30 s budget); Vendi {m['vendi']:.2f}, clusters {len(set(labels))}")
if NATIVE:
    total16 = t_embed16 + t_measure16
    print(f"n={n} questions, {BF16} MiniLM: embed {t_embed16:.1f} s + measures {t_measure16:.2f} s = "
          f"{total16:.1f} s ({total16 / 30:.2f} of the budget, x{total / total16:.1f} faster); Vendi "
          f"{m16['vendi']:.2f} ({m16['vendi'] / m['vendi'] - 1:+.2%} vs fp32), mean cosine to the fp32 embedding "
          f"{agree:.4f}")
print(f"n={k}: naive n x n Vendi + distances {t_naive:.2f} s vs project {t_fast:.4f} s "
      f"(speed-up x{t_naive / t_fast:.0f}, same values)")

# The floor: MiniLM's matmuls (2 x non-embedding parameters per token; attention over ~50 tokens is small)
# against this machine's own 2048^3 matmul rate in float32 and bfloat16.
tokens, flops = embedding_flops(models.load_embedder("minilm"), texts)


p32 = max(peaks[torch.float32], fastest_peak(torch.float32))
print(f"embedding {tokens} tokens = {flops / 1e12:.1f} TFLOP: fp32 at {flops / t_embed / 1e9:.0f} GFLOP/s "
      f"({flops / t_embed / p32:.0%} of the fp32 matmul peak {p32 / 1e9:.0f}); at 100% of it the embedding alone "
      f"would take {flops / p32:.0f} s")
if NATIVE:
    p16 = max(peaks[torch.bfloat16], fastest_peak(torch.bfloat16))
    print(f"bf16 at {flops / t_embed16 / 1e9:.0f} GFLOP/s ({flops / t_embed16 / p16:.0%} of the bf16 peak "
          f"{p16 / 1e9:.0f}): at 100% of it {flops / p16:.0f} s")
bf16_row = ({"figure": f"embedding {n} questions, MiniLM {BF16} (mean cosine to float32 {agree:.6f}, Vendi "
                      f"{m16['vendi'] / m['vendi'] - 1:+.3%} against float32's)",
             "value": t_embed16, "unit": "s", "ratio": t_embed16 / (flops / p16),
             "against": "its floor at the bf16 peak (x)"} if NATIVE else
            {"figure": f"embedding {n} questions, MiniLM bf16", "value": "", "unit": "", "ratio": "",
             "against": NO_BF16})
write("diversity_speed", [
    {"figure": f"embedding {n} questions, MiniLM float32 ({tokens} tokens)", "value": t_embed, "unit": "s",
     "ratio": flops / t_embed / p32, "against": "fp32 matmul peak"},
    bf16_row,
    {"figure": f"diversity measures and k-means on {n} embeddings", "value": t_measure, "unit": "s", "ratio": "",
     "against": ""},
    {"figure": f"Vendi and mean distance on {k} questions vs the naive n x n computation", "value": t_fast,
     "unit": "s", "ratio": t_naive / t_fast, "against": "naive baseline (x faster)"}])
