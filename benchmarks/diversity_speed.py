"""Diversity measures on 10,000 questions: seconds, against the issue's 30 s budget and against a naive
baseline (Vendi from the full n x n similarity matrix, pairwise distances from that matrix), in one run.

    .venv/bin/python benchmarks/diversity_speed.py [N]
"""
import sys
import time

import numpy as np
import torch

from persona_em import diversity, models, questions

torch.set_num_threads(2)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
pool = questions.build_pool("bench", 0, "t", n, seed=0)
texts, cells = [q["text"] for q in pool], [q["cell"] for q in pool]

embedder = models.load_embedder("minilm")
t0 = time.perf_counter()
emb = embedder.encode(texts, batch_size=128, show_progress_bar=False)
t_embed = time.perf_counter() - t0

t0 = time.perf_counter()
m = diversity.measure(texts, emb, cells)
labels = diversity.clusters(emb, k=16, seed=0)
t_measure = time.perf_counter() - t0

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
print(f"n={n} questions: embed {t_embed:.1f} s + measures and k-means {t_measure:.2f} s = {total:.1f} s "
      f"({total / 30:.2f} of the 30 s budget); Vendi {m['vendi']:.1f}, clusters {len(set(labels))}")
print(f"n={k}: naive n x n Vendi + distances {t_naive:.2f} s vs project {t_fast:.4f} s "
      f"(speed-up x{t_naive / t_fast:.0f}, same values)")
