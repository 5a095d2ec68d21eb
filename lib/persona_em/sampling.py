"""Batched, seeded sampling from a chat model (left padding, length-sorted batches)."""
from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def chat_prompt(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_text(model, tok, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16,
                temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
    """One sampled continuation per raw text prompt: {'text', 'finished'} in input order.

    Prompts are sorted by length so that batches carry little padding; the seed is set once, so the same
    inputs, order and seed give the same samples on a CPU.
    """
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[dict | None] = [None] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, pad_token_id=tok.pad_token_id)
            new = gen[:, enc.input_ids.shape[1]:]
            for i, row in zip(idx, new):
                finished = bool((row == tok.eos_token_id).any())
                out[i] = {"text": tok.decode(row, skip_special_tokens=True).strip(), "finished": finished}
    finally:
        tok.padding_side = old_side
    return out


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int, seed: int, batch_size: int = 16,
             temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
    """One sampled assistant reply per conversation (chat template applied)."""
    return sample_text(model, tok, [chat_prompt(tok, c) for c in conversations], max_new_tokens, seed,
                       batch_size, temperature, top_p, desc)


def trim_to_sentence(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence."""
    ends = list(SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else text.strip()
