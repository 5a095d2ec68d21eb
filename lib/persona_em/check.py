"""`python -m persona_em check FILE...`: validate any input the project reads (method 5).

One summary line per valid file (its kind and counts), or a clear error naming the file and the field.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from . import constitution, grid
from .config import ProfileError, load_profile
from .inputs import check_chat_jsonl, check_eval_yaml, read_text  # noqa: F401 (the checks, re-exported)


def check_file(path: str | Path) -> str:
    path = Path(path)
    text = read_text(path)
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if isinstance(data, list):
            return check_eval_yaml(path)
        p = load_profile(path)
        return (f"{path}: profile '{p.name}', {len(grid.character_conditions(p))} character conditions, "
                f"{len(grid.em_runs(p))} EM runs, {len(grid.eval_models(p))} evaluated models")
    first = text.lstrip()[:2000]
    if path.suffix == ".jsonl" and '"messages"' in first:
        return check_chat_jsonl(path)
    c = constitution.load(path)
    return f"{path}: constitution '{c.name}', {len(c.traits)} traits, {c.n_questions} questions"


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python -m persona_em check FILE...")
        return 2
    status = 0
    for p in paths:
        try:
            print(check_file(p))
        except (ValueError, ProfileError, constitution.ConstitutionError, FileNotFoundError) as e:
            print(f"error: {e}")
            status = 1
    return status
