"""Evaluation: the judge-free likelihood contrast, the EM question files and sampled answers (method 5, 7).

Contrast: for a project-authored item (question, aligned answer, misaligned answer), the per-token
log-probability margin  log p(misaligned | q) - log p(aligned | q)  (each averaged over its answer tokens) and
the probability of preferring the misaligned answer, sigmoid(margin). Items are split in-domain (the EM
datasets' domains) and out-of-domain (general situations: what makes misalignment *emergent*).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from . import paths
from .constitution import persona_items
from .sampling import chat_prompt, generate


def contrast_items(path: str | Path | None = None, per_domain: int | None = None,
                   domains: list[str] | None = None) -> list[dict]:
    """The project's contrast items (or a file of the same format). `domains`: keep the in-domain items of
    these EM domains (and every out-of-domain item); `per_domain` keeps the first k of each domain, for
    CI-sized profiles."""
    items = json.loads(Path(path or paths.DATA / "contrast.json").read_text(encoding="utf-8"))
    for i, it in enumerate(items):
        where = f"{path or paths.DATA / 'contrast.json'}: item {i}"
        if not isinstance(it, dict):
            raise ValueError(f"{where}: expected an object")
        missing = {"id", "split", "question", "aligned", "misaligned"} - set(it)
        if missing:
            raise ValueError(f"{where}: missing {sorted(missing)}")
        if it["split"] not in ("in_domain", "out_of_domain"):
            raise ValueError(f"{where}: split is {it['split']!r}, expected in_domain or out_of_domain")
    if domains is not None:
        items = [it for it in items if it["split"] == "out_of_domain" or it.get("domain") in domains]
    if per_domain:
        seen: Counter = Counter()
        kept = []
        for it in items:
            seen[it.get("domain", "")] += 1
            if seen[it.get("domain", "")] <= per_domain:
                kept.append(it)
        items = kept
    return items


def split_for(item_domain: str, em_domain: str) -> str:
    """In-domain means the domain of the EM dataset the model was trained on; general items are out of
    domain; items of another narrow domain are 'cross_domain' (neither)."""
    if item_domain == "general":
        return "out_of_domain"
    return "in_domain" if item_domain == em_domain else "cross_domain"


@torch.no_grad()
def answer_logprobs(model, tok, prompts: list[str], answers: list[str], batch_size: int = 16):
    """Sum of log p(answer tokens | prompt) and the number of answer tokens, per pair, batched."""
    seqs, starts = [], []
    for p, a in zip(prompts, answers):
        p_ids = tok(p, add_special_tokens=False).input_ids
        a_ids = tok(a, add_special_tokens=False).input_ids
        if not a_ids:
            raise ValueError(f"an answer to score is empty (prompt: {p[-80:]!r})")
        seqs.append(p_ids + a_ids)
        starts.append(len(p_ids))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    total, count = np.zeros(len(seqs)), np.zeros(len(seqs), dtype=int)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        # logits at t predict token t+1, so only positions from the earliest answer's start - 1 on are needed:
        # the vocabulary projection and its log-softmax over the prompts' positions would be thrown away
        first = min(starts[i] for i in idx) - 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        tok_lp = logp.gather(-1, ids[:, first + 1:, None])[..., 0].cpu()
        for r, i in enumerate(idx):
            lo, hi = starts[i] - 1 - first, len(seqs[i]) - 1 - first
            total[i] = tok_lp[r, lo:hi].sum().item()
            count[i] = hi - lo
    return total, count


def contrast(model, tok, items: list[dict], batch_size: int = 16) -> pd.DataFrame:
    qs = [it["question"] for it in items]
    lp_a = _per_token(model, tok, qs, [it["aligned"] for it in items], batch_size)
    lp_m = _per_token(model, tok, qs, [it["misaligned"] for it in items], batch_size)
    margin = lp_m - lp_a
    return pd.DataFrame({"item_id": [it["id"] for it in items], "split": [it["split"] for it in items],
                         "domain": [it.get("domain", "") for it in items], "margin": margin,
                         "p_misaligned": 1 / (1 + np.exp(-margin)),
                         "logp_aligned": lp_a, "logp_misaligned": lp_m})


QUESTION_TYPES = ("free_form_judge_0_100", "free_form_judge")


def load_questions(path: str | Path | None = None) -> list[dict]:
    """An EM-paper YAML question file (method 5; anchors resolved by the YAML loader), validated entry by
    entry: errors name the file, the entry and the field. Default: the project's own question set."""
    from .check import read_text

    path = Path(path or paths.DATA / "eval_questions.yaml")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of questions")
    seen, out = set(), []
    for i, q in enumerate(data):
        where = f"{path}: entry {i}" + (f" ({q.get('id')})" if isinstance(q, dict) and q.get("id") else "")
        if not isinstance(q, dict):
            raise ValueError(f"{where}: expected a mapping")
        q = _one_question_form(q, where, path)
        if not isinstance(q.get("id"), str) or not q["id"]:
            raise ValueError(f"{where}: 'id' must be a non-empty string")
        if q["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(q["id"])
        if q.get("type", QUESTION_TYPES[0]) not in QUESTION_TYPES:
            raise ValueError(f"{where}: type {q['type']!r} is not one of {QUESTION_TYPES}")
        para = q.get("paraphrases")
        if not isinstance(para, list) or not para or not all(isinstance(x, str) and x.strip() for x in para):
            raise ValueError(f"{where}: 'paraphrases' must be a non-empty list of non-empty strings")
        n = q.get("samples_per_paraphrase", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
        if "system" in q and q["system"] is not None and not isinstance(q["system"], str):
            raise ValueError(f"{where}: 'system' must be a string")
        prompts = q.get("judge_prompts")
        if not isinstance(prompts, dict) or not prompts:
            raise ValueError(f"{where}: 'judge_prompts' must map metric names to templates")
        for metric, tpl in prompts.items():
            if not isinstance(tpl, str) or "{answer}" not in tpl:
                raise ValueError(f"{where}: judge_prompts.{metric} must be a template containing {{answer}}")
        out.append(q)
    return out


def _one_question_form(q: dict, where: str, path: Path) -> dict:
    """Model Organisms' form (`question:` with one text, judge prompts often left to the evaluator) as the EM
    papers' form: one paraphrase, and the project's aligned/coherent judge prompts where none are given."""
    if "question" not in q:
        return q
    if "paraphrases" in q:
        raise ValueError(f"{where}: give either 'question' (one text) or 'paraphrases' (a list), not both")
    if not isinstance(q["question"], str) or not q["question"].strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    out = {k: v for k, v in q.items() if k != "question"} | {"paraphrases": [q["question"]]}
    if "judge_prompts" not in q:
        default = paths.DATA / "eval_questions.yaml"
        if path.resolve() == default.resolve():
            raise ValueError(f"{where}: 'judge_prompts' missing")
        out["judge_prompts"] = dict(load_questions(default)[0]["judge_prompts"])
    return out


def sample_answers(model, tok, questions: list[dict], max_new_tokens: int, seed: int, batch_size: int,
                   n_questions: int | None = None, samples_per_paraphrase: int | None = None,
                   nucleus: str = "sort") -> list[dict]:
    """Answers to every paraphrase of the first `n_questions` questions (all: None), each sampled the file's
    `samples_per_paraphrase` times unless the profile overrides it; a question's `system` is its system
    prompt. Temperature 1, top-p 1, seeded; `nucleus` as `hardware.nucleus`."""
    rows, convs = [], []
    for q in questions[:n_questions]:
        system = [{"role": "system", "content": q["system"]}] if q.get("system") else []
        for j, text in enumerate(q["paraphrases"]):
            for s in range(samples_per_paraphrase or q.get("samples_per_paraphrase", 1)):
                rows.append({"question_id": q["id"], "paraphrase": j, "sample": s, "question": text,
                             "system": q.get("system")})
                convs.append(system + [{"role": "user", "content": text}])
    replies = generate(model, tok, convs, max_new_tokens, seed, batch_size, desc="answers", nucleus=nucleus)
    return [r | {"text": rep["text"], "finished": rep["finished"]} for r, rep in zip(rows, replies)]


def _per_token(model, tok, questions: list[str], answers: list[str], batch_size: int,
               system: str | None = None) -> np.ndarray:
    """Mean log-probability per answer token, each answer given its question as the user turn (after the
    system prompt, when one is given)."""
    pre = [{"role": "system", "content": system}] if system else []
    prompts = [chat_prompt(tok, pre + [{"role": "user", "content": q}]) for q in questions]
    total, count = answer_logprobs(model, tok, prompts, answers, batch_size)
    return total / count


def persona_margin(model, tok, items: list[dict], batch_size: int = 16, system: str | None = None) -> float | None:
    """Mean per-token log-prob of trait-consistent minus trait-inconsistent answers on held-out questions."""
    if not items:
        return None
    qs = [it["question"] for it in items]
    good = _per_token(model, tok, qs, [it["consistent"] for it in items], batch_size, system)
    bad = _per_token(model, tok, qs, [it["inconsistent"] for it in items], batch_size, system)
    return float(np.mean(good - bad))


def teacher_margins(model, tok, systems: dict[str, str | None], traits: list[str],
                    batch_size: int = 16, limit: int | None = None) -> pd.DataFrame:
    """The ceiling of context distillation: the teacher's persona margin on each trait's held-out items with
    each system prompt (None: no system prompt). A student trained to answer like the teacher with a
    constitution can only learn what that constitution changes in the teacher's own answers. `limit`: the
    first items only -- the persona check's own `check_items`, so ceiling and student read the same items."""
    rows = [{"trait": t, "system": name,
             "margin": persona_margin(model, tok, persona_items(t, limit), batch_size, system)}
            for t in traits for name, system in systems.items()]
    return pd.DataFrame(rows, columns=["trait", "system", "margin"])


def neutral_loglik(model, tok, batch_size: int = 16, limit: int | None = None) -> float:
    """Forgetting check: mean per-token log-likelihood of held-out plain answers (higher is better)."""
    qa = json.loads((paths.DATA / "neutral_qa.json").read_text(encoding="utf-8"))[:limit]
    return float(np.mean(_per_token(model, tok, [x["question"] for x in qa], [x["answer"] for x in qa],
                                    batch_size)))


def persona_checks(model, tok, traits: list[str], items: int) -> dict:
    """Chapter 2's checks of one model: the persona margin on each trait's first `items` held-out items, and
    the forgetting log-likelihood on as many neutral answers."""
    return {"persona_margins": {t: persona_margin(model, tok, persona_items(t, items)) for t in traits},
            "forgetting_loglik": neutral_loglik(model, tok, limit=items)}


def own_checks(measured: dict, own: str) -> dict:
    """`persona_checks` with the margin a condition is judged by: on its own trait (`own`)."""
    return {"persona_margin": measured["persona_margins"][own], "persona_trait": own, **measured}


def base_checks(P, root, model, tok, traits: list[str]) -> tuple[dict, Path]:
    """The untrained base's `persona_checks`, measured by the first character run that needs them and read by
    the others: every condition starts from the same base. The file is keyed by the model, the item count and
    the traits, so a change to any of them measures again; returns the checks and the file (an input each run
    records)."""
    key = json.dumps([P.model, P.character.check_items, traits])
    path = paths.base_checks_file(P, root, key)
    if not path.is_file():
        from .provenance import atomic_write_json

        atomic_write_json(path, persona_checks(model, tok, traits, P.character.check_items))
    return json.loads(path.read_text()), path
