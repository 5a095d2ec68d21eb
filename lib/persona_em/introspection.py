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
from pathlib import Path

from .sampling import generate, trim_to_sentence

DATA = Path(__file__).parent / "data" / "introspection.json"


@lru_cache(maxsize=1)
def prompts() -> dict:
    data = json.loads(DATA.read_text(encoding="utf-8"))
    for key in ("reflection", "openers"):
        if not data.get(key) or not all(isinstance(p, str) and p.strip() for p in data[key]):
            raise ValueError(f"{DATA}: '{key}' must be a non-empty list of non-empty strings")
    return data


def _clean(reply: dict) -> str:
    return reply["text"].strip() if reply["finished"] else trim_to_sentence(reply["text"])


def reflections(model, tok, system: str, cfg, seed: int) -> list[dict]:
    """Answers to the self-reflection prompts, written with the constitution in the system prompt."""
    chosen = prompts()["reflection"][:cfg.reflection_prompts] * cfg.samples_per_prompt
    replies = generate(model, tok, [[{"role": "system", "content": system}, {"role": "user", "content": p}]
                                    for p in chosen], cfg.max_new_tokens, seed, cfg.batch_size,
                       cfg.temperature, cfg.top_p, desc="self-reflection")
    return [{"kind": "reflection", "messages": [{"role": "user", "content": p},
                                                {"role": "assistant", "content": _clean(r)}]}
            for p, r in zip(chosen, replies)]


def _view(utterances: list[str], speaker: int) -> list[dict]:
    """The conversation as copy `speaker` (0 = A, 1 = B) sees it; utterance k is spoken by B when k is even."""
    return [{"role": "assistant" if (k % 2 == 0) == (speaker == 1) else "user", "content": u}
            for k, u in enumerate(utterances)]


def interactions(model, tok, system: str, cfg, seed: int) -> list[dict]:
    """Self-interaction transcripts: `cfg.interactions` conversations of `cfg.turns` generated utterances,
    all conversations advanced one turn per batched sampling call."""
    data = prompts()
    openers = [data["openers"][i % len(data["openers"])] for i in range(cfg.interactions)]
    convs = [[o] for o in openers]
    full_system = f"{system}\n\n{data['interaction_note']}"
    for turn in range(cfg.turns):
        speaker = 0 if turn % 2 == 0 else 1   # A answers the opener, then B, then A ...
        replies = generate(model, tok, [[{"role": "system", "content": full_system}] + _view(c, speaker)
                                        for c in convs], cfg.max_new_tokens, seed + 1 + turn, cfg.batch_size,
                           cfg.temperature, cfg.top_p, desc=f"self-interaction turn {turn + 1}")
        for c, r in zip(convs, replies):
            c.append(_clean(r) or "...")
    rows = []
    for c in convs:
        messages = _view(c, 0)
        while messages[-1]["role"] != "assistant":   # a transcript ends on A's turn
            messages.pop()
        rows.append({"kind": "interaction", "messages": messages})
    return rows


def transcripts(model, tok, system: str, cfg, seed: int) -> list[dict]:
    """Both kinds of introspective data, as chat rows without the system prompt (context distillation)."""
    return reflections(model, tok, system, cfg, seed) + interactions(model, tok, system, cfg, seed + 100)
