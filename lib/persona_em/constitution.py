"""Constitutions: first-person trait statements, each with seed questions that probe it.

Reads both Open Character Training formats (method 5): the hand-written JSON array
`[{"trait", "questions"}]` and the expanded JSON lines with `additional_questions` (an old `clarification`
key is accepted and ignored). The project's own constitutions live in `persona_em/data/constitutions/`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .inputs import read_text

DATA = paths.DATA / "constitutions"
ALLOWED_KEYS = {"trait", "questions", "additional_questions", "clarification"}


class ConstitutionError(ValueError):
    pass


@dataclass(frozen=True)
class Trait:
    trait: str
    questions: tuple[str, ...]
    additional_questions: tuple[str, ...] = field(default=())

    @property
    def all_questions(self) -> tuple[str, ...]:
        return self.questions + self.additional_questions


@dataclass(frozen=True)
class Constitution:
    name: str
    traits: tuple[Trait, ...]
    path: Path

    @property
    def n_questions(self) -> int:
        return sum(len(t.all_questions) for t in self.traits)


def packaged() -> list[str]:
    return sorted(p.stem for p in DATA.glob("*.json"))


def resolve(name_or_path: str) -> Path:
    """A packaged constitution name ('candor') or a path to a file in either OCT format."""
    p = Path(name_or_path)
    if p.suffix and p.is_file():
        return p
    q = DATA / f"{name_or_path}.json"
    if q.is_file():
        return q
    raise FileNotFoundError(f"no constitution {name_or_path!r}: not a file, and not one of the packaged "
                            f"constitutions {packaged()}")


def _records(path: Path, text: str) -> list:
    """Either a JSON array (hand-written) or one JSON object per line (expanded)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConstitutionError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
        return data
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConstitutionError(f"{path}: line {lineno} is not JSON ({e.msg}); expected a JSON array of "
                                    "traits or one JSON object per line") from None
    return records


def _questions(path: Path, i: int, rec: dict, key: str) -> tuple[str, ...]:
    qs = rec.get(key, [])
    if not isinstance(qs, list):
        raise ConstitutionError(f"{path}: trait {i}: '{key}' must be a list of strings")
    for j, q in enumerate(qs):
        if not isinstance(q, str):
            raise ConstitutionError(f"{path}: trait {i}: {key}[{j}] is {type(q).__name__}, expected a string")
        if not q.strip():
            raise ConstitutionError(f"{path}: trait {i}: {key}[{j}] is empty")
    return tuple(q.strip() for q in qs)


def load(name_or_path: str | Path) -> Constitution:
    path = resolve(str(name_or_path))
    try:
        text = read_text(path)
    except ValueError as e:
        raise ConstitutionError(str(e)) from None
    records = _records(path, text)
    if not isinstance(records, list) or not records:
        raise ConstitutionError(f"{path}: expected a non-empty list of traits")
    traits, seen = [], set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ConstitutionError(f"{path}: trait {i}: expected an object with 'trait' and 'questions'")
        unknown = set(rec) - ALLOWED_KEYS
        if unknown:
            raise ConstitutionError(f"{path}: trait {i}: unknown key(s) {sorted(unknown)}; "
                                    f"allowed: {sorted(ALLOWED_KEYS)}")
        statement = rec.get("trait")
        if not isinstance(statement, str) or not statement.strip():
            raise ConstitutionError(f"{path}: trait {i}: missing or empty 'trait' (a first-person statement)")
        if statement.strip() in seen:
            raise ConstitutionError(f"{path}: trait {i}: duplicate trait (same statement as an earlier one)")
        seen.add(statement.strip())
        qs = _questions(path, i, rec, "questions")
        if not qs:
            raise ConstitutionError(f"{path}: trait {i}: 'questions' is missing or empty")
        traits.append(Trait(statement.strip(), qs, _questions(path, i, rec, "additional_questions")))
    return Constitution(path.stem, tuple(traits), path)


def system_prompt(c: Constitution, name: str) -> str:
    """The teacher's system prompt, in OCT's shape: name, numbered core traits, do not disclose them."""
    traits = "\n".join(f"{i}: {t.trait}" for i, t in enumerate(c.traits, 1))
    return (f"The assistant is {name}. {name} is an AI model that talks with people in text, and everything "
            f"{name} says comes from these core character traits:\n{traits}\n"
            f"{name} lets these traits shape every answer, in every kind of conversation. "
            f"{name} does not publicly disclose their character traits, or talk about them, unless the user "
            "asks directly.")


def persona_items(constitution: str, limit: int | None = None) -> list[dict]:
    """Held-out persona-check items of a packaged constitution; [] for one without (no persona margin). Here,
    not in `evaluate`, so that validating a profile does not import torch."""
    path = paths.DATA / "persona_items" / f"{constitution}.json"
    return json.loads(path.read_text(encoding="utf-8"))[:limit] if path.is_file() else []
