"""The offline question pool: project-authored situations composed over context facets.

A question is "{asker} {scenario} {stakes} {format}". The scenario's life domain is the question's context
*cell*; asker, stakes and answer format vary within a cell. The same situations probe every trait, so what a
diversity level changes is only which situations are asked about, never the trait or the prompt shape.
"""
from __future__ import annotations

import itertools
import json
from functools import lru_cache

import numpy as np

from . import paths

SITUATIONS = paths.DATA / "situations.json"


@lru_cache(maxsize=1)
def situations() -> dict:
    data = json.loads(SITUATIONS.read_text(encoding="utf-8"))
    for facet in ("askers", "stakes", "formats"):
        if not data.get(facet):
            raise ValueError(f"{SITUATIONS}: facet {facet!r} is missing or empty")
    if not data.get("domains"):
        raise ValueError(f"{SITUATIONS}: 'domains' is missing or empty")
    return data


def compose(*parts: str) -> str:
    return " ".join(p.strip() for p in parts if p and p.strip())


def n_combinations() -> int:
    s = situations()
    per_scenario = len(s["askers"]) * len(s["stakes"]) * len(s["formats"])
    return per_scenario * sum(len(v) for v in s["domains"].values())


def build_pool(constitution: str, trait_index: int, trait: str, n: int, seed: int) -> list[dict]:
    """`n` distinct questions for one trait, balanced over domains (cells), deterministic given `seed`.

    Each row: id, constitution, trait, text, cell, and the facet values it was composed from.
    """
    s = situations()
    domains = sorted(s["domains"])
    if n > n_combinations():
        raise ValueError(f"pool of {n} questions requested, but the templates give only {n_combinations()}")
    rng = np.random.default_rng([seed, trait_index])
    per_domain = [n // len(domains) + (i < n % len(domains)) for i in range(len(domains))]
    rows = []
    for domain, k in zip(domains, per_domain):
        combos = list(itertools.product(range(len(s["domains"][domain])), range(len(s["askers"])),
                                        range(len(s["stakes"])), range(len(s["formats"]))))
        if k > len(combos):
            raise ValueError(f"domain {domain!r} gives only {len(combos)} questions, {k} requested")
        picked = sorted(rng.choice(len(combos), size=k, replace=False))
        for sc, a, st, f in (combos[i] for i in picked):
            asker, stakes, fmt = s["askers"][a], s["stakes"][st], s["formats"][f]
            rows.append({
                "id": f"{constitution}-t{trait_index}-{domain}-{sc}-{asker['id']}-{stakes['id']}-{fmt['id']}",
                "constitution": constitution, "trait_index": trait_index, "trait": trait,
                "text": compose(asker["text"], s["domains"][domain][sc], stakes["text"], fmt["text"]),
                "cell": domain, "asker": asker["id"], "stakes": stakes["id"], "format": fmt["id"],
            })
    return rows


def labelled_pool(constitution: str, trait_index: int, trait: str, texts: list[str], cells: list[str]) -> list[dict]:
    """Pool rows for questions that carry no template cell (a teacher-expanded pool): `cells` are cluster
    labels, so the diversity machinery works on them unchanged."""
    return [{"id": f"{constitution}-t{trait_index}-x{j:04d}", "constitution": constitution,
             "trait_index": trait_index, "trait": trait, "text": t, "cell": cell}
            for j, (t, cell) in enumerate(zip(texts, cells))]
