"""Chosen/rejected response pairs, by one of two methods (`generate.pairs`).

Teacher (Open Character Training): chosen = the teacher answering with the constitution in its system prompt
(OCT's prompt shape), rejected = the student answering with no system prompt. OCT's filters: both answers end in
punctuation, prompt + answers within a token cap. An answer cut by the token limit is trimmed back to its last
full sentence; a pair that still fails is sampled again (new seed), so every diversity level keeps its N.

Best-of-n (below): both sides sampled from the model itself, ranked by a trait scorer independent of the
persona check, with the levels of a subset draw matched on trait signal and training tokens.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from . import sampling
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


# -- best-of-n pairs ranked by a trait scorer -------------------------------------------------------------------
# When the teacher does not follow its constitution (the embedded 135M model: its persona margin is no higher
# with the constitution in its system prompt than without), teacher-vs-student pairs carry no trait. A small
# model does follow *demonstrations*: a few earlier turns in which the assistant answered in the trait's way
# (or against it) move its own answers. So each side of a pair is sampled from the model itself with its own
# context: the chosen side with the constitution's system prompt and `k` trait-consistent demonstrations, the
# rejected side with `k` trait-inconsistent ones (with k = 0 both sides are the plain student's answers). An
# independent trait scorer then ranks the samples, and a pair is a high-scoring chosen and a low-scoring
# rejected answer of the same question. The demonstrations are the scorer's own project-written items, never the
# persona check's. The neutral control gets its pairs by the same procedure, its own demonstrations and scorer.
def demonstrations(items: list[dict], side: str, k: int, rng: np.random.Generator, domain: str | None = None) -> list[dict]:
    """`k` (user, assistant) turns from scorer items: their first `side` ("consistent"/"inconsistent") answer.
    With `domain`, the items of that life domain when it has any (a demonstration about the same kind of
    situation moves a small model's answer more than one about another)."""
    same = [it for it in items if domain is not None and it.get("domain") == domain]
    pool = same or items
    turns = []
    for j in rng.choice(len(pool), size=min(k, len(pool)), replace=False):
        turns += [{"role": "user", "content": pool[j]["question"]},
                  {"role": "assistant", "content": pool[j][side][0]}]
    return turns


def side_contexts(questions: list[dict], items: list[dict], system: str, k: int, seed: int,
                  same_domain: bool = True) -> dict[str, dict]:
    """For each question (pool rows, by text), the context each side is sampled in: {"chosen": messages,
    "rejected": messages}, the question's user turn last. With `same_domain` the demonstrations come from the
    question's own life domain, drawn once per domain (so a domain's questions share their context, which the
    sampler computes once); otherwise they are drawn per question from all items. Both sides show the same
    demonstration questions, answered the trait's way and against it. With k = 0 both sides are the question
    alone."""
    out, per_domain = {}, {}
    for i, q in enumerate(questions):
        user = [{"role": "user", "content": q["text"]}]
        if k == 0:
            out[q["text"]] = {"chosen": user, "rejected": user}
            continue
        if same_domain:
            key = q.get("cell")
            if key not in per_domain:   # seeded by the domain's name, not by which questions happen to come first
                rng = lambda: np.random.default_rng([seed, *key.encode()]) if key else np.random.default_rng(seed)
                per_domain[key] = (demonstrations(items, "consistent", k, rng(), key),
                                   demonstrations(items, "inconsistent", k, rng(), key))
            chosen, rejected = per_domain[key]
        else:
            chosen = demonstrations(items, "consistent", k, np.random.default_rng([seed, i]))
            rejected = demonstrations(items, "inconsistent", k, np.random.default_rng([seed, i]))
        out[q["text"]] = {"chosen": [{"role": "system", "content": system}] + chosen + user, "rejected": rejected + user}
    return out


def sample_candidates(student, tok, contexts: dict, n: int, max_new_tokens: int, seed: int, batch_size: int,
                      temperature: float, top_p: float, max_attempts: int = MAX_ATTEMPTS,
                      share_prefix: bool = True, nucleus: str = "sort", pack_prefixes: bool = False) -> dict:
    """Up to `n` distinct usable answers (ending in punctuation after trimming) per context (key -> messages, the
    last a user turn), sampled from the student; contexts left with fewer than two are sampled again (new seed).
    With `share_prefix`, contexts that share everything but their last turn are sampled together over one cached
    prefix (fast when many questions share a context); without, all contexts go through padded batches (fast
    when few do). With `pack_prefixes` as well, a batch may mix contexts (`sampling.generate_prefixed`), so that
    many small groups fill whole batches; `nucleus` is `hardware.nucleus`."""
    out: dict = {key: [] for key in contexts}
    for attempt in range(max_attempts):
        todo = [key for key, a in out.items() if len(a) < (n if attempt == 0 else min(n, 2))]
        if not todo:
            break
        torch.manual_seed(seed + 7919 * attempt)
        groups: dict[str, list] = {}
        for key in todo:
            groups.setdefault(json.dumps(contexts[key][:-1]) if share_prefix else "", []).append(key)
        packed = {}
        if share_prefix and pack_prefixes:
            shared = [(prefix, keys) for prefix, keys in groups.items() if json.loads(prefix)]
            asked = [(json.loads(prefix), [contexts[k][-1]["content"] for k in keys]) for prefix, keys in shared]
            got = sampling.generate_prefixed(student, tok, asked, n, max_new_tokens, batch_size, temperature, top_p,
                                             desc=f"{len(todo)} questions x {n} in {len(shared)} contexts "
                                                  f"(try {attempt + 1})", nucleus=nucleus)
            packed = dict(zip((prefix for prefix, _ in shared), got or []))
        for prefix, keys in groups.items():
            turns = [contexts[key][-1]["content"] for key in keys]
            replies = packed.get(prefix) or (sampling.generate_shared_prefix(
                student, tok, json.loads(prefix), turns, n, max_new_tokens, batch_size, temperature, top_p,
                desc=f"{len(keys)} questions x {n} (try {attempt + 1})", nucleus=nucleus) if share_prefix else None)
            if replies is None:   # no prefix to share (or the sampler has its own cache): one prompt per sample
                flat = generate(student, tok, [contexts[key] for key in keys for _ in range(n)], max_new_tokens,
                                seed + 7919 * attempt, batch_size, temperature, top_p,
                                desc=f"{len(keys)} contexts x {n} (try {attempt + 1})", nucleus=nucleus)
                replies = [flat[j * n:(j + 1) * n] for j in range(len(keys))]
            for key, rs in zip(keys, replies):
                for reply in rs:
                    a = _clean(reply)
                    if a.endswith(PUNCT) and a not in out[key] and len(out[key]) < n:
                        out[key].append(a)
    short = [key for key, a in out.items() if len(a) < min(n, 2)]
    if short:
        raise ValueError(f"{len(short)} context(s) gave fewer than {min(n, 2)} usable answer(s) in {max_attempts} "
                         f"tries, e.g. {short[0]!r}; raise generate.max_new_tokens")
    return out


def candidate_pairs(question: str, answers: list[str], scores, count_tokens, max_pair_tokens: int) -> list[dict]:
    """Every (higher-scoring, lower-scoring) pair of one question's answers that fits the token cap, with its
    trait-score gap and its training tokens (question + chosen + rejected), largest gap first."""
    q_tokens = count_tokens(question)
    a_tokens = [count_tokens(a) for a in answers]
    out = []
    for i in range(len(answers)):
        for j in range(len(answers)):
            gap = float(scores[i] - scores[j])
            n_tok = q_tokens + a_tokens[i] + a_tokens[j]
            if gap > 0 and n_tok <= max_pair_tokens:
                out.append({"chosen": i, "rejected": j, "gap": gap, "n_tokens": n_tok})
    return sorted(out, key=lambda c: -c["gap"])


def _violation(value: float, lo: float, hi: float, scale: float) -> float:
    return (max(lo - value, 0.0) + max(value - hi, 0.0)) / scale


def match_levels(candidates: dict, token_tolerance: float, gap_tolerance: float, max_sweeps: int = 50) -> dict:
    """Choose one candidate pair per question at every level so that the levels' mean trait-score gaps lie
    within `gap_tolerance` of each other (largest / smallest - 1) and so do their training tokens
    (`token_tolerance`).

    `candidates`: level -> one list of candidate pairs per question (`candidate_pairs`, largest gap first).
    Every question starts from its largest gap (a level's mean gap can only fall from there); coordinate descent
    then changes one question's pair at a time while that brings the levels' spreads closer to the bands, and
    among equally good choices keeps the larger gap, so the levels with more signal give up only what matching
    needs.
    Returns level -> the chosen candidate index per question. Raises ValueError when the bands are not met."""
    levels = list(candidates)
    for level in levels:
        empty = [k for k, c in enumerate(candidates[level]) if not c]
        if empty:
            raise ValueError(f"level {level}: question {empty[0]} has no usable pair (all its answers score alike, "
                             "or none fits max_pair_tokens)")
    choice = {level: [0] * len(candidates[level]) for level in levels}
    gap = {level: float(np.mean([c[0]["gap"] for c in candidates[level]])) for level in levels}
    tok = {level: sum(c[0]["n_tokens"] for c in candidates[level]) for level in levels}
    spread = lambda v: max(v.values()) / min(v.values()) - 1 if min(v.values()) > 0 else np.inf

    def loss(gaps, toks):
        # 0.9 of each tolerance: a margin against rounding in the reported spreads
        return (max(0.0, spread(gaps) - 0.9 * gap_tolerance) ** 2
                + max(0.0, spread(toks) - 0.9 * token_tolerance) ** 2)

    current = loss(gap, tok)
    for _ in range(max_sweeps):
        if current == 0:
            break
        changed = False
        for level in levels:
            n_q = len(candidates[level])
            for k, cands in enumerate(candidates[level]):
                cur = cands[choice[level][k]]
                rest_g, rest_t = gap[level] - cur["gap"] / n_q, tok[level] - cur["n_tokens"]
                trial = lambda c: loss(gap | {level: rest_g + cands[c]["gap"] / n_q},
                                       tok | {level: rest_t + cands[c]["n_tokens"]})
                best = min(range(len(cands)), key=lambda c: (trial(c), -cands[c]["gap"]))
                if best != choice[level][k] and trial(best) < current:
                    choice[level][k] = best
                    gap[level], tok[level] = rest_g + cands[best]["gap"] / n_q, rest_t + cands[best]["n_tokens"]
                    current, changed = loss(gap, tok), True
        if not changed:
            break
    if current > 0:
        raise ValueError("could not match the levels' pairs: mean trait-score gaps "
                         + ", ".join(f"L{lv} {gap[lv]:.3f}" for lv in levels) + f" (within {gap_tolerance:.0%}); "
                         + "training tokens " + ", ".join(f"L{lv} {tok[lv]}" for lv in levels)
                         + f" (within {token_tolerance:.0%}); raise generate.best_of_n.n or the tolerances")
    return choice


def best_of_n_pairs(subsets: dict, answers: dict, scorer, count_tokens, max_pair_tokens: int,
                    token_tolerance: float, gap_tolerance: float) -> dict:
    """Pairs for one constitution and one subset draw. `subsets`: level -> that level's questions (pool rows);
    `answers`: question text -> {"chosen": [...], "rejected": [...]}, the answers sampled in each side's context.
    Both sides' answers of a question form its candidates: the scorer, not the context an answer came from,
    decides which is chosen (a pair's `chosen_side`/`rejected_side` record where its answers came from).
    Returns level -> pair rows, matched across levels (`match_levels`)."""
    pooled, scores = {}, {}
    for t in {q["text"] for qs in subsets.values() for q in qs}:
        pooled[t] = list(dict.fromkeys(answers[t]["chosen"] + answers[t]["rejected"]))
        scores[t] = scorer.score(pooled[t])
    cands = {level: [candidate_pairs(q["text"], pooled[q["text"]], scores[q["text"]], count_tokens, max_pair_tokens)
                     for q in qs] for level, qs in subsets.items()}
    choice = match_levels(cands, token_tolerance, gap_tolerance)
    side = lambda t, a: "chosen" if a in answers[t]["chosen"] else "rejected"
    out = {}
    for level, qs in subsets.items():
        rows = []
        for q, cs, k in zip(qs, cands[level], choice[level]):
            t, c = q["text"], cs[k]
            chosen, rejected = pooled[t][c["chosen"]], pooled[t][c["rejected"]]
            rows.append({"id": q["id"], "trait_index": q["trait_index"], "cell": q["cell"], "prompt": t,
                         "chosen": chosen, "rejected": rejected, "chosen_score": float(scores[t][c["chosen"]]),
                         "rejected_score": float(scores[t][c["rejected"]]), "gap": c["gap"], "max_gap": cs[0]["gap"],
                         "n_tokens": c["n_tokens"], "chosen_side": side(t, chosen), "rejected_side": side(t, rejected)})
        out[level] = rows
    return out


def by_subset(rows: list[dict], subsets: dict) -> dict:
    """Teacher pairs (made once per distinct question) -> one list per subset key, in the subset's order; every
    question must have its pair (method 6.6: every level trains on the same N)."""
    by_id = {p["id"]: p for p in rows}
    out = {}
    for key, qs in subsets.items():
        missing = [q["id"] for q in qs if q["id"] not in by_id]
        if missing:
            raise ValueError(f"{key}: {len(missing)} question(s) never gave a pair that passes OCT's filters; raise "
                             "generate.max_new_tokens or max_pair_tokens")
        out[key] = [by_id[q["id"]] for q in qs]
    return out


def pair_signal(made: dict, scorers: dict, count_tokens) -> pd.DataFrame:
    """One row per pair file (constitution, level, replicate): pairs, training tokens (question + chosen +
    rejected) and, where the constitution has a scorer, the mean scores of chosen and rejected and their gap."""
    rows = []
    for (name, level, seed), pairs in made.items():
        row = {"constitution": name, "level": level, "char_seed": seed, "n_pairs": len(pairs),
               "train_tokens": sum(count_tokens(p["prompt"]) + count_tokens(p["chosen"]) + count_tokens(p["rejected"])
                                   for p in pairs)}
        if name in scorers:
            c = scorers[name].score([p["chosen"] for p in pairs])
            r = scorers[name].score([p["rejected"] for p in pairs])
            row.update(chosen_score=float(c.mean()), rejected_score=float(r.mean()), gap=float((c - r).mean()))
        rows.append(row)
    return pd.DataFrame(rows)


def level_balance(signal: pd.DataFrame) -> pd.DataFrame:
    """Per constitution and replicate, how far the levels' training tokens and mean gaps spread: largest /
    smallest - 1 (method 6.6: tokens within 5%; best-of-n gaps within its gap_tolerance)."""
    cols = [c for c in ("train_tokens", "gap") if c in signal]
    spread = lambda v: float(v.max() / v.min() - 1) if (v > 0).all() else float("nan")
    return signal.groupby(["constitution", "char_seed"])[cols].agg(spread).add_suffix("_spread").reset_index()
