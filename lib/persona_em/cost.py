"""What a profile costs: tokens, FLOPs and GPU-hours per stage, estimated from the profile alone (and, for a
profile that has run, set beside the measured wall time of its notebooks).

Conventions (stated in the table): inference 2 x N FLOPs per token, LoRA training 4 x N per non-pad token
(forward, and backward through the activations; no weight gradients for the frozen base), DPO adds a
reference forward (2 x N) per token. Token counts are upper bounds: every answer is counted at its token limit.
GPU-hours = FLOPs / (peak x utilisation), with the utilisation given per kind of work (training and the judge's
prompt-only prefill run near the training MFU; sampling is bound by memory bandwidth and reaches a small
fraction of peak).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from . import grid

# Parameters of the models the shipped profiles name (config arithmetic, embeddings included).
PARAMS = {"smollm2-135m": 134.5e6, "Qwen/Qwen2.5-7B-Instruct": 7.62e9, "Qwen/Qwen2.5-32B-Instruct": 32.8e9,
          "Qwen/Qwen2.5-72B-Instruct": 72.7e9, "meta-llama/Llama-3.1-8B-Instruct": 8.03e9}
PROMPT_TOKENS = 60         # a training question with its chat template
JUDGE_PROMPT_TOKENS = 350  # a judge template with question and answer
ANSWER_TOKENS = 22         # a contrast item's aligned or misaligned answer


def n_params(spec: str | None) -> float | None:
    if spec is None:
        return None
    if spec in PARAMS:
        return PARAMS[spec]
    cfg = Path(spec) / "config.json"
    if cfg.is_file():   # a local model folder: count from its config
        c = json.loads(cfg.read_text())
        h, layers, v, inter = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
        kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
        return float(layers * per_layer + v * h * (1 if c.get("tie_word_embeddings") else 2))
    return None


def estimate(P) -> pd.DataFrame:
    """One row per stage: runs, tokens processed, FLOPs (by the conventions above)."""
    N = n_params(P.model)
    teacher = n_params(P.generate.teacher) if P.generate.teacher else N
    g, c, e, ev = P.generate, P.character, P.em, P.evaluate
    rows = []
    # 1. pairs: every distinct question of every replicate's subsets (<= levels x N per constitution and draw);
    # teacher pairs: the teacher and the student answer it once; best-of-n: each side n times after its
    # demonstrations (a domain's shared context computed once, so the prompt counts about once per question)
    n_q = sum(len(grid.constitution_seeds(P, name)) for name in grid.constitutions(P)) * len(g.levels) * g.n_questions
    if g.pairs == "best_of_n":
        b = g.best_of_n
        samples = n_q * 2 * b.n
        rows.append(("generate: pairs", 1, samples * g.max_new_tokens + n_q * 2 * PROMPT_TOKENS,
                     (samples * g.max_new_tokens + n_q * 2 * PROMPT_TOKENS) * 2 * N))
    else:
        rows.append(("generate: pairs", 1, n_q * 2 * (PROMPT_TOKENS + g.max_new_tokens),
                     n_q * (PROMPT_TOKENS + g.max_new_tokens) * 2 * (teacher + N)))
    if g.pool == "expansion" and g.expansion is not None:
        x = g.expansion
        per_trait = x.target_per_trait / max(1, x.batch) * 2 * x.max_new_tokens   # ~2 tries per accepted batch
        from .constitution import load
        n_traits = sum(len(load(src).traits) for src in grid.constitution_sources(P).values())
        rows.append(("generate: expansion", 1, n_traits * per_trait, n_traits * per_trait * 2 * teacher))
    # 2. character training
    trained = [x for x in grid.character_conditions(P) if x != "base" and not x.startswith("random")]
    dpo_tokens = g.n_questions * (2 * PROMPT_TOKENS + 2 * g.max_new_tokens) * c.epochs
    rows.append(("character: DPO", len(trained), len(trained) * dpo_tokens, len(trained) * dpo_tokens * 6 * N))
    if c.introspection is not None:
        i = c.introspection
        n_refl = (i.reflection_prompts or 12) * i.samples_per_prompt
        gen = (n_refl + i.interactions * i.turns) * i.max_new_tokens
        sft = (n_refl + i.interactions) * i.max_new_tokens * (1 + i.turns / 2) * i.epochs
        rows.append(("character: introspection", len(trained), len(trained) * (gen + sft),
                     len(trained) * (gen * 2 * N + sft * 4 * N)))
    # 3. EM
    em_tokens = e.n_examples * min(e.max_length, 250) * e.epochs
    em_runs = len(grid.em_runs(P)) + len(grid.direction_runs(P))   # the study's, and the misalignment direction's
    rows.append(("EM: SFT", em_runs, em_runs * em_tokens, em_runs * em_tokens * 4 * N))
    # 4. evaluation: sampling, judge, contrast items
    from .evaluate import load_questions

    qs = load_questions(ev.questions)[:ev.sample_questions]
    answers = sum(len(q["paraphrases"]) * (ev.samples_per_paraphrase or q.get("samples_per_paraphrase", 1))
                  for q in qs)
    n_models = len(grid.eval_models(P)) + len(grid.direction_runs(P))
    rows.append(("evaluate: sampling", n_models, n_models * answers * ev.max_new_tokens,
                 n_models * answers * (PROMPT_TOKENS + ev.max_new_tokens) * 2 * N))
    if ev.judge is not None:
        judge = n_params(ev.judge.endpoint_model if ev.judge.backend == "endpoint" else (ev.judge.model or P.model))
        jt = n_models * answers * 2 * JUDGE_PROMPT_TOKENS
        rows.append(("evaluate: judge", n_models, jt, jt * 2 * (judge or N)))
    from .direction import items

    # the direction's activations: one forward pass over each contrast item's question and both its answers
    # (packed), every item for a direction run, the readout half (the larger) for an evaluated model
    n_items = len(items(P))
    item_reads = n_items * len(grid.direction_runs(P)) + (n_items - n_items // 2) * len(grid.eval_models(P))
    rt = item_reads * (PROMPT_TOKENS + 2 * ANSWER_TOKENS)
    rows.append(("evaluate: direction readout", n_models, rt, rt * 2 * N))
    frame = pd.DataFrame(rows, columns=["stage", "runs", "tokens", "flops"])
    # the judge reads a prompt and writes one token: prefill, compute-bound like training
    frame["kind"] = ["train" if any(k in st for k in ("DPO", "introspection", "SFT"))
                     else "prefill" if "judge" in st or "readout" in st else "sample" for st in frame["stage"]]
    return frame


def gpu_hours(frame: pd.DataFrame, peak_flops: float, train_mfu: float = 0.4, sample_mfu: float = 0.05):
    """GPU-hours per stage at the given peak (FLOP/s) and utilisations (prefill counted at the training MFU)."""
    util = frame["kind"].map({"train": train_mfu, "prefill": train_mfu, "sample": sample_mfu})
    return frame["flops"] / (peak_flops * util) / 3600


def measured_minutes(run_root: str | Path) -> pd.Series:
    """Wall minutes of a finished run per stage: the sum of its notebooks' papermill durations."""
    out = {}
    for nb in Path(run_root).glob("0*/**/0*.ipynb"):
        if nb.name.startswith(".tmp"):
            continue
        stage = nb.relative_to(run_root).parts[0]
        duration = json.loads(nb.read_text())["metadata"].get("papermill", {}).get("duration") or 0
        out[stage] = out.get(stage, 0.0) + duration / 60
    return pd.Series(out, name="measured_job_minutes").sort_index()


def latex_table(frame: pd.DataFrame, caption: str, label: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering\small", r"\begin{tabular}{lrrrr}", r"\toprule",
             r"stage & runs & tokens & FLOPs & GPU-hours \\", r"\midrule"]
    for _, r in frame.iterrows():
        lines.append(f"{r['stage']} & {int(r['runs']):,} & {r['tokens']:.2e} & {r['flops']:.2e} & "
                     f"{r['gpu_hours']:.2f} \\\\".replace(",", "{,}"))
    tot = frame[["tokens", "flops", "gpu_hours"]].sum()
    lines += [r"\midrule", f"total & & {tot['tokens']:.2e} & {tot['flops']:.2e} & {tot['gpu_hours']:.1f} \\\\",
              r"\bottomrule", r"\end{tabular}", f"\\caption{{{caption}}}", f"\\label{{{label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"
