"""Introspection, OCT's second stage: the DPO-trained model, with its constitution in the system prompt,
writes self-reflections and talks with a copy of itself; then it is fine-tuned on those transcripts WITHOUT the
system prompt (context distillation), so the persona no longer needs the prompt to show.

The prompts are project-authored (`data/introspection.json`). Self-interaction: utterance 0 is an opener
spoken by copy B; copies A and B then alternate, each seeing its own utterances as "assistant" and the other's
as "user". A's side of the conversation is the training transcript.
"""
from __future__ import annotations

import json
from functools import lru_cache

from . import paths
from .sampling import generate, trim_to_sentence

DATA = paths.DATA / "introspection.json"


@lru_cache(maxsize=1)
def prompts() -> dict:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    for key in ("reflection", "openers"):
        if not data.get(key) or not all(isinstance(p, str) and p.strip() for p in data[key]):
            raise ValueError(f"{DATA}: '{key}' must be a non-empty list of non-empty strings")
    return data


def _clean(reply: dict) -> str:
    return reply["text"].strip() if reply["finished"] else trim_to_sentence(reply["text"])


def _reflection_convs(system: str, cfg) -> tuple[list[str], list[list[dict]]]:
    chosen = prompts()["reflection"][:cfg.reflection_prompts] * cfg.samples_per_prompt
    return chosen, [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in chosen]


def _view(utterances: list[str], speaker: int) -> list[dict]:
    """The conversation as copy `speaker` (0 = A, 1 = B) sees it; utterance k is spoken by B when k is even."""
    return [{"role": "assistant" if (k % 2 == 0) == (speaker == 1) else "user", "content": u}
            for k, u in enumerate(utterances)]


def transcripts(model, tok, system: str, cfg, seed: int) -> list[dict]:
    """Self-reflections and self-interaction transcripts, as chat rows WITHOUT the system prompt (context
    distillation). The reflections are sampled in the same batched call as the conversations' first turn;
    each later turn advances every conversation at once."""
    data = prompts()
    chosen, refl_convs = _reflection_convs(system, cfg)
    convs = [[data["openers"][i % len(data["openers"])]] for i in range(cfg.interactions)]
    talk_system = f"{system}\n\n{data['interaction_note']}"
    reflections: list[str] = []
    for turn in range(cfg.turns):
        speaker = turn % 2   # A answers the opener, then B, then A ...
        batch = [[{"role": "system", "content": talk_system}] + _view(c, speaker) for c in convs]
        if turn == 0:
            batch = refl_convs + batch
        replies = generate(model, tok, batch, cfg.max_new_tokens, seed + turn, cfg.batch_size, cfg.temperature,
                           cfg.top_p, desc=f"introspection turn {turn + 1}")
        if turn == 0:
            reflections, replies = [_clean(r) for r in replies[:len(chosen)]], replies[len(chosen):]
        for c, r in zip(convs, replies):
            c.append(_clean(r) or "...")
    rows = [{"kind": "reflection", "messages": [{"role": "user", "content": p},
                                                {"role": "assistant", "content": a}]}
            for p, a in zip(chosen, reflections)]
    for c in convs:
        messages = _view(c, 0)
        while messages[-1]["role"] != "assistant":   # a transcript ends on A's turn
            messages.pop()
        rows.append({"kind": "interaction", "messages": messages})
    return rows
