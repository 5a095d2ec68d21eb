"""Diversity of a question set (method 7) and diversity-controlled subsets (method 6.6).

All measures are vectorised. The Vendi score uses the fact that the non-zero eigenvalues of K/n = X X^T / n
equal those of X^T X / n (d x d, d = embedding size), so 10,000 questions cost one 384 x 384 eigenproblem.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import numpy as np


def unit(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(min=1e-12)


def vendi(emb: np.ndarray) -> float:
    """exp(entropy of the eigenvalues of K/n), K the cosine-similarity matrix: 1 (all same) .. n (orthogonal)."""
    x = unit(emb)
    n = len(x)
    lam = np.linalg.eigvalsh(x.T @ x / n) if x.shape[1] < n else np.linalg.eigvalsh(x @ x.T / n)
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def mean_cosine_distance(emb: np.ndarray) -> float:
    """Mean of 1 - cos over distinct pairs, from the norm of the summed unit vectors (no n x n matrix)."""
    x = unit(emb)
    n = len(x)
    if n < 2:
        return 0.0
    total = np.square(x.sum(axis=0)).sum()  # sum over all ordered pairs incl. i == j
    return float(1.0 - (total - n) / (n * (n - 1)))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams in the set (lower-cased words)."""
    grams = Counter()
    for t in texts:
        words = t.lower().split()
        grams.update(zip(*(words[i:] for i in range(n))))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def cell_entropy(cells: Sequence[str]) -> float:
    counts = np.array(list(Counter(cells).values()), dtype=float)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log(p)).sum()))


def clusters(emb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster labels (k-means on unit embeddings) for pools whose questions carry no context cell."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, random_state=seed, n_init=4).fit_predict(unit(emb))


def measure(texts: Sequence[str], emb: np.ndarray, cells: Sequence[str]) -> dict:
    return {
        "n_questions": len(texts),
        "vendi": vendi(emb),
        "mean_cosine_distance": mean_cosine_distance(emb),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "cells_covered": len(set(cells)),
        "cell_entropy": cell_entropy(cells),
    }


def select_subset(cells: Sequence[str], tokens: Sequence[int], n_cells: int, n: int, target_tokens: int,
                  tolerance: float, seed: int, cell_order: Sequence[str]) -> list[int]:
    """Indices of `n` questions spread evenly over the first `n_cells` cells of `cell_order`, whose token
    count is within `tolerance` of `target_tokens`.

    The cells of a lower level are a subset of those of a higher one (nested levels). After a random draw,
    swaps within the same cell move the total toward the target, so only *which* situations are asked
    changes between levels, never how much text the model is trained on.
    """
    rng = np.random.default_rng(seed)
    cells, tokens = np.asarray(cells), np.asarray(tokens)
    chosen_cells = list(cell_order[:n_cells])
    if len(chosen_cells) < n_cells:
        raise ValueError(f"level of {n_cells} cells requested, but the pool has only {len(cell_order)} cells")
    quota = [n // n_cells + (i < n % n_cells) for i in range(n_cells)]
    picked, spare = [], []
    for cell, q in zip(chosen_cells, quota):
        idx = rng.permutation(np.flatnonzero(cells == cell))
        if len(idx) < q:
            raise ValueError(f"cell {cell!r} has {len(idx)} questions, {q} needed for N={n}")
        picked += list(idx[:q])
        spare += list(idx[q:])
    picked, spare = np.array(picked), np.array(spare)
    lo, hi = target_tokens * (1 - tolerance / 2), target_tokens * (1 + tolerance / 2)
    total = tokens[picked].sum()
    for _ in range(20 * n):
        if lo <= total <= hi:
            break
        gap = target_tokens - total
        # Best single swap within a cell: the pair whose token difference is closest to the gap.
        same = cells[picked][:, None] == cells[spare][None, :]
        delta = tokens[spare][None, :] - tokens[picked][:, None]
        score = np.where(same, np.abs(gap - delta), np.inf)
        i, j = np.unravel_index(np.argmin(score), score.shape)
        if not np.isfinite(score[i, j]) or abs(gap - delta[i, j]) >= abs(gap):
            break
        picked[i], spare[j] = spare[j], picked[i]
        total += delta[i, j]
    if not lo <= total <= hi:
        raise ValueError(f"could not match the token budget: {total} tokens vs target {target_tokens} "
                         f"(+-{tolerance / 2:.1%}) at {n_cells} cells; enlarge the pool or the tolerance")
    return sorted(int(i) for i in picked)


def diversity_subsets(pool: list[dict], count_tokens: Callable[[str], int], levels: Sequence[int], n: int,
                      tolerance: float, seed: int) -> dict[int, list[dict]]:
    """One subset per level for one trait's pool: equal N, token budgets within `tolerance` of each other."""
    cells = [q["cell"] for q in pool]
    tokens = [count_tokens(q["text"]) for q in pool]
    order = list(np.random.default_rng(seed).permutation(sorted(set(cells))))
    target = int(round(np.median(tokens) * n))
    out = {}
    for level in levels:
        idx = select_subset(cells, tokens, level, n, target, tolerance, seed + level, order)
        out[level] = [pool[i] | {"n_tokens": tokens[i]} for i in idx]
    return out


def level_spread(pool: list[dict], count_tokens: Callable[[str], int], levels: Sequence[int], n: int,
                 tolerance: float, seeds: Sequence[int], embed: Callable[[list[str]], np.ndarray]) -> list[dict]:
    """Measured diversity of the subsets each level would get under several subset seeds: does the Vendi
    score rise with the level whichever questions are drawn? Each distinct question is embedded once."""
    cache: dict[str, np.ndarray] = {}
    rows = []
    for seed in seeds:
        for level, qs in diversity_subsets(pool, count_tokens, levels, n, tolerance, seed).items():
            texts = [q["text"] for q in qs]
            todo = [t for t in dict.fromkeys(texts) if t not in cache]
            if todo:
                cache.update(zip(todo, embed(todo)))
            emb = np.stack([cache[t] for t in texts])
            rows.append({"subset_seed": seed, "level": level, "n_tokens": sum(q["n_tokens"] for q in qs),
                         **measure(texts, emb, [q["cell"] for q in qs])})
    return rows


def pca_2d(emb: np.ndarray) -> np.ndarray:
    """First two principal components of unit embeddings (for the pool map)."""
    x = unit(emb)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T
