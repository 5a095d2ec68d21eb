"""Chosen/rejected response pairs, as Open Character Training makes them.

Chosen: the teacher answers with the constitution in its system prompt (OCT's prompt shape).
Rejected: the student answers with no system prompt (its chat template's default).
OCT's filters: both answers end in punctuation, prompt + answers within a token cap. An answer cut by the
token limit is trimmed back to its last full sentence; a pair that still fails is sampled again (new seed),
so every diversity level keeps its N.
"""
from __future__ import annotations

from .constitution import Constitution, system_prompt
from .sampling import generate, trim_to_sentence

PUNCT = (".", "!", "?", '"', "'", ")")
MAX_ATTEMPTS = 4


def _clean(reply: dict) -> str:
    return reply["text"].strip() if reply["finished"] else trim_to_sentence(reply["text"])


def make_pairs(teacher, student, tok, constitution: Constitution, questions: list[dict], teacher_name: str,
               max_new_tokens: int, max_pair_tokens: int, batch_size: int, seed: int,
               temperature: float = 0.7, top_p: float = 0.95, teacher_tok=None) -> tuple[list[dict], dict]:
    """Returns (pairs, stats). `teacher` and `student` may be the same model object; a larger teacher brings
    its own tokenizer (`teacher_tok`; `tok` is the student's, which also measures the pair's length)."""
    teacher_tok = teacher_tok or tok
    system = system_prompt(constitution, teacher_name)
    todo = list(range(len(questions)))
    pairs: dict[int, dict] = {}
    stats = {"attempts": 0, "rejected_by_filter": 0}
    for attempt in range(MAX_ATTEMPTS):
        if not todo:
            break
        qs = [questions[i]["text"] for i in todo]
        chosen = generate(teacher, teacher_tok, [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                                         for q in qs], max_new_tokens, seed + 1000 * attempt, batch_size,
                          temperature, top_p, desc=f"teacher (try {attempt + 1})")
        rejected = generate(student, tok, [[{"role": "user", "content": q}] for q in qs], max_new_tokens,
                            seed + 1000 * attempt + 1, batch_size, temperature, top_p,
                            desc=f"student (try {attempt + 1})")
        stats["attempts"] += len(todo)
        still = []
        for i, c, r in zip(todo, chosen, rejected):
            c, r = _clean(c), _clean(r)
            n_tok = len(tok(questions[i]["text"] + c + r, add_special_tokens=False).input_ids)
            if c.endswith(PUNCT) and r.endswith(PUNCT) and c != r and n_tok <= max_pair_tokens:
                q = questions[i]
                pairs[i] = {"id": q["id"], "trait_index": q["trait_index"], "cell": q["cell"],
                            "prompt": q["text"], "chosen": c, "rejected": r}
            else:
                still.append(i)
                stats["rejected_by_filter"] += 1
        todo = still
    stats["dropped"] = len(todo)
    return [pairs[i] for i in sorted(pairs)], stats


def to_dpo_rows(pairs: list[dict]) -> list[dict]:
    """Conversational preference format for trl's DPOTrainer."""
    return [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
