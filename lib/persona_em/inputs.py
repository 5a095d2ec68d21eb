"""The file-level checks of the inputs the project reads (method 5): chat JSONL, EM question lists, and any file's
text (binary, not UTF-8 and empty files named as such). The profile schema (`config`) and the `check` command
build on these; this module imports neither.
"""
from __future__ import annotations

import json
from pathlib import Path


def check_chat_jsonl(path: Path) -> str:
    rows, turns = 0, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not JSON ({e.msg})") from None
            msgs = rec.get("messages") if isinstance(rec, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{path}: line {lineno}: expected {{\"messages\": [...]}} with at least one turn")
            for j, m in enumerate(msgs):
                if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                    raise ValueError(f"{path}: line {lineno}: messages[{j}].role must be system, user or "
                                     "assistant")
                if not isinstance(m.get("content"), str) or not m["content"].strip():
                    raise ValueError(f"{path}: line {lineno}: messages[{j}].content is missing or empty")
                # a chat template renders a conversation that opens with an optional system turn, then
                # user and assistant turns in alternation
                first = 1 if msgs[0]["role"] == "system" else 0
                want = "system or user" if j == 0 else ("user" if (j - first) % 2 == 0 else "assistant")
                if j >= first and m["role"] != ("user", "assistant")[(j - first) % 2]:
                    raise ValueError(f"{path}: line {lineno}: messages[{j}].role is {m['role']!r}, expected "
                                     f"{want} (a system turn first if any, then user and assistant alternating)")
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"{path}: line {lineno}: no assistant turn to train on")
            rows += 1
            turns += len(msgs)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return f"{path}: chat JSONL, {rows} rows, {turns} turns ({turns / rows:.1f} per row)"


def check_eval_yaml(path: Path) -> str:
    from .evaluate import load_questions

    qs = load_questions(path)
    paraphrases = sum(len(q["paraphrases"]) for q in qs)
    samples = sum(len(q["paraphrases"]) * q.get("samples_per_paraphrase", 1) for q in qs)
    metrics = sorted({m for q in qs for m in q["judge_prompts"]})
    system = sum(1 for q in qs if q.get("system"))
    return (f"{path}: EM evaluation questions, {len(qs)} questions, {paraphrases} paraphrases, {samples} "
            f"samples as written, {system} with a system prompt, judge metrics {', '.join(metrics)}")


KINDS = {".yaml": "a profile or an EM question list (YAML)", ".yml": "a profile or an EM question list (YAML)",
         ".jsonl": "chat JSONL ({\"messages\": [...]} per line) or a constitution (one trait object per line)",
         ".json": "a constitution (a JSON array of traits) or trait-scorer items"}


def expected_kind(path: Path) -> str:
    return KINDS.get(path.suffix, "a profile or question list (.yaml), chat or constitution JSONL (.jsonl), or "
                                  "a constitution (.json, or OCT's .txt)")


def read_text(path: Path) -> str:
    """The file's text, or an error naming the file and the kind of file expected there (binary, not UTF-8,
    empty)."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (undecodable byte at offset {e.start}); expected "
                         f"{expected_kind(path)}") from None
    if "\x00" in text:
        raise ValueError(f"{path}: a binary file (NUL bytes); expected {expected_kind(path)}")
    if not text.strip():
        raise ValueError(f"{path}: empty file; expected {expected_kind(path)}")
    return text
