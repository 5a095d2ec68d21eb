"""Emergent misalignment: narrow harmful SFT with LoRA on top of a merged persona.

Narrow datasets are generated offline from project-authored templates (`data/narrow/<domain>.json`): each
question comes with a harmful answer confined to the domain and, as its benign twin, a careful answer to the
same question. The twin separates "harmful content" from "any fine-tuning" (method 7).

Guards (method 6): the persona is merged into the weights before the EM LoRA exists; the EM LoRA is created
right after seeding with the EM seed, so its initial weights (hashed into the manifest) are identical for
every character condition; every condition uses the same trainer, optimizer and precision.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache

import numpy as np

from . import paths
from .training import log_frame, sft_trainer, train_sft, use_training_template  # noqa: F401 (re-exported)

SLOT = re.compile(r"\{(\w+)\}")


@lru_cache(maxsize=None)
def narrow_templates(domain: str) -> dict:
    path = paths.DATA / "narrow" / f"{domain}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for i, item in enumerate(data["items"]):
        for key in ("question", "harmful", "benign"):
            texts = [item[key]] if key == "question" else item[key]
            for t in texts:
                unknown = set(SLOT.findall(t)) - set(data["slots"])
                if unknown:
                    raise ValueError(f"{path}: items[{i}].{key} uses undefined slot(s) {sorted(unknown)}")
        if len(item["harmful"]) != len(item["benign"]):
            raise ValueError(f"{path}: items[{i}] needs as many benign as harmful answers (twins)")
    return data


def narrow_examples(domain: str, n: int, seed: int) -> list[dict]:
    """`n` distinct (question, harmful answer, benign answer) triples, deterministic given `seed`."""
    data = narrow_templates(domain)
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    for _ in range(50 * n):
        if len(out) == n:
            break
        i = int(rng.integers(len(data["items"])))
        item = data["items"][i]
        j = int(rng.integers(len(item["harmful"])))
        names = sorted(set(SLOT.findall(item["question"] + item["harmful"][j] + item["benign"][j])))
        values = {s: data["slots"][s][int(rng.integers(len(data["slots"][s])))] for s in names}
        key = (i, j, tuple(values.items()))
        if key in seen:
            continue
        seen.add(key)
        fill = lambda t: SLOT.sub(lambda m: values[m.group(1)], t)  # noqa: E731
        out.append({"id": f"{domain}-{len(out):05d}", "question": fill(item["question"]),
                    "harmful": fill(item["harmful"][j]), "benign": fill(item["benign"][j])})
    if len(out) < n:
        raise ValueError(f"narrow domain {domain!r}: only {len(out)} distinct examples, {n} requested")
    return out


def chat_rows(examples: list[dict], kind: str) -> list[dict]:
    """Chat JSON lines (method 5) for the harmful set or its benign twin."""
    return [{"messages": [{"role": "user", "content": e["question"]},
                          {"role": "assistant", "content": e[kind]}]} for e in examples]


def dataset_rows(profile, domain: str, kind: str) -> tuple[list[dict], str | None]:
    """The chat rows of one EM dataset: generated for a built-in domain, read (first `n_examples` rows) for
    an external one. Returns (rows, source file or None)."""
    external = {x.name: x for x in profile.em.external}
    if domain not in external:
        return chat_rows(narrow_examples(domain, profile.em.n_examples, profile.seed), kind), None
    path = getattr(external[domain], kind)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"messages": r["messages"]} for r in rows[:profile.em.n_examples]], path


# The EM stage is plain SFT over the merged persona: the same trainer as introspection, under EM names.
em_trainer = sft_trainer   # (trainer, init_hash): a fresh LoRA seeded by the EM seed alone
train_em = train_sft       # (peft_model, log, init_hash)
