"""Trait scorers: how trait-consistent an answer is, independent of the persona check.

A scorer is a logistic regression on sentence embeddings of answers, fitted on project-written items
(`data/scorer_items/<constitution>.json`: a question, trait-consistent and trait-inconsistent answers). Those
items share no question with the held-out persona-check items (`data/persona_items/`), so the check that
later asks "was the persona learned?" never reads the data that chose the training pairs.

Two held-out figures say how good a scorer is: the AUC of cross-validation that holds out whole items (an
answer is never scored by a model fitted on another answer to its own question), and the AUC on the
persona-check items' answers, which the scorer never saw.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paths
from .diversity import unit
from .inputs import read_text

DATA = paths.DATA / "scorer_items"


def items_path(constitution: str) -> Path:
    return DATA / f"{constitution}.json"


def load_items(path: str | Path) -> list[dict]:
    """Scorer items, validated: each {question, consistent: [str...], inconsistent: [str...]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scorer items (a best-of-n pair needs a trait scorer for every trained "
                                "constitution)")
    try:
        items = json.loads(read_text(path))   # binary, not UTF-8 and empty files named as such
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(items, list) or len(items) < 4:
        raise ValueError(f"{path}: expected a list of at least 4 scorer items")
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("question"), str):
            raise ValueError(f"{path}: item {i}: expected an object with a 'question' string")
        for key in ("consistent", "inconsistent"):
            answers = it.get(key)
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip()
                                                                      for a in answers):
                raise ValueError(f"{path}: item {i}: '{key}' must be a non-empty list of answers")
    return items


def answer_table(items: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(answers, label 1 = consistent, item index) over every answer of every item."""
    texts, labels, groups = [], [], []
    for g, it in enumerate(items):
        for key, y in (("consistent", 1), ("inconsistent", 0)):
            for a in it[key]:
                texts.append(a)
                labels.append(y)
                groups.append(g)
    return texts, np.array(labels), np.array(groups)


def _classifier(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000, random_state=seed)


def grouped_cv_auc(x: np.ndarray, y: np.ndarray, groups: np.ndarray, C: float, folds: int, seed: int) -> float:
    """AUC of out-of-fold scores, folds holding out whole items."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    scores = np.zeros(len(y))
    for train, test in GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups):
        scores[test] = _classifier(C, seed).fit(x[train], y[train]).decision_function(x[test])
    return float(roc_auc_score(y, scores))


@dataclass
class TraitScorer:
    """A fitted scorer for one constitution: `score(answers)` is the probability of 'trait-consistent'."""
    constitution: str
    clf: object
    embed: object
    report: dict = field(default_factory=dict)

    def score(self, answers: list[str]) -> np.ndarray:
        return self.clf.predict_proba(unit(self.embed(list(answers))))[:, 1]


def fit_scorer(constitution: str, items: list[dict], embed, check_items: list[dict] = (), C: float = 1.0,
               folds: int = 5, seed: int = 0) -> TraitScorer:
    """Fit on every scorer item; report the grouped cross-validated AUC and, when the constitution has persona
    check items, the AUC on their consistent/inconsistent answers (never used in fitting)."""
    from sklearn.metrics import roc_auc_score

    texts, y, groups = answer_table(items)
    x = unit(embed(texts))
    report = {"constitution": constitution, "n_items": len(items), "n_answers": len(texts),
              "cv_auc": grouped_cv_auc(x, y, groups, C, min(folds, len(items)), seed)}
    clf = _classifier(C, seed).fit(x, y)
    scorer = TraitScorer(constitution, clf, embed)
    if check_items:
        answers = [it["consistent"] for it in check_items] + [it["inconsistent"] for it in check_items]
        labels = [1] * len(check_items) + [0] * len(check_items)
        report["check_auc"] = float(roc_auc_score(labels, scorer.score(answers)))
        report["n_check_items"] = len(check_items)
    scorer.report = report
    return scorer


def disjoint_from(items: list[dict], check_items: list[dict]) -> list[str]:
    """Questions the scorer items share with the persona-check items (must be none)."""
    held_out = {it["question"].strip().lower() for it in check_items}
    return [it["question"] for it in items if it["question"].strip().lower() in held_out]
