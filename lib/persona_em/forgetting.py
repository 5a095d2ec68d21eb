"""H5 across training lengths: does forgetting grow more slowly with training when the questions are more
diverse? Two profiles that train the same conditions for different lengths (`tiny` and `tiny-long`, which
differ in `character.epochs`) are read from their chapter-2 `checks.json` and fitted together:

    forgetting_change ~ log2_level * longer (+ C(constitution))

`forgetting_change` is the change in the log-likelihood of held-out neutral answers (after minus before;
negative = forgetting), `longer` is 1 for the longer run. H5 predicts a positive `log2_level:longer`: the extra
training costs less at higher diversity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

from . import grid, paths
from .grid import parse_condition

SAME = ("model", "hardware", "character.check_items", "character.lora", "character.lr", "character.batch_size",
        "generate.levels", "generate.n_questions")


def _get(profile, dotted: str):
    value = profile
    for key in dotted.split("."):
        value = getattr(value, key)
    return value.model_dump() if hasattr(value, "model_dump") else value


def gather(short, long, root: str | Path = ".") -> pd.DataFrame:
    """One row per trained condition the two profiles share: level, constitution, seed, epochs, the change in
    neutral log-likelihood and in the own-trait persona margin. Refuses profiles that differ in more than
    training length, or runs that have not reached chapter 2."""
    differ = [k for k in SAME if _get(short, k) != _get(long, k)]
    if differ:
        raise ValueError(f"profiles {short.name!r} and {long.name!r} must differ only in training length; they "
                         f"also differ in {', '.join(differ)}")
    if long.character.epochs <= short.character.epochs:
        raise ValueError(f"profile {long.name!r} (character.epochs {long.character.epochs}) does not train longer "
                         f"than {short.name!r} ({short.character.epochs})")
    shared = [c for c in grid.character_conditions(long) if c in grid.character_conditions(short)
              and parse_condition(c)["constitution"] in grid.constitutions(long)]
    if not shared:
        raise ValueError(f"profiles {short.name!r} and {long.name!r} share no trained condition")
    rows = []
    for profile in (short, long):
        for cond in shared:
            path = paths.run_dir(profile, root, paths.TRAIN_CHARACTER, cond) / paths.CHECKS
            if not path.is_file():
                raise FileNotFoundError(f"{path}: profile {profile.name!r} has not trained {cond} yet (`make h5` "
                                        "runs tiny-long's chapters 1-2)")
            ck = json.loads(path.read_text())
            rows.append({"profile": profile.name, "epochs": profile.character.epochs,
                         "longer": int(profile is long), "condition": cond, **parse_condition(cond),
                         "forgetting_change": ck["after"]["forgetting_loglik"] - ck["before"]["forgetting_loglik"],
                         "margin_change": ck["after"]["persona_margin"] - ck["before"]["persona_margin"]})
    return pd.DataFrame(rows)


def fit(rows: pd.DataFrame):
    """OLS of the forgetting change on diversity, training length and their interaction; returns (fit, formula)."""
    d = rows.assign(log2_level=np.log2(rows["level"]))
    formula = "forgetting_change ~ log2_level * longer" + (" + C(constitution)" if d["constitution"].nunique() > 1
                                                          else "")
    return smf.ols(formula, d).fit(), formula


def compare(short, long, root: str | Path, dest: str | Path, paper: bool = True) -> str:
    """Gather, fit and write `forgetting_rows.csv`, `forgetting_effects.csv`, the model and a manifest into
    `dest`, the figure `forgetting_by_length` into figures/<short profile>/ and (`paper`) the paper's macros
    into paper/generated/<short profile>/h5_length.tex; returns a short report."""
    from . import plots
    from .paper import write_numbers
    from .provenance import (atomic_write_csv, atomic_write_json, atomic_write_text, file_hash, git_state,
                             package_versions)
    from .stats import ols_effects_table

    rows = gather(short, long, root)
    result, formula = fit(rows)
    table = ols_effects_table(result, "forgetting_by_length", formula)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(dest / "forgetting_rows.csv", rows)
    atomic_write_csv(dest / "forgetting_effects.csv", table)
    atomic_write_text(dest / "forgetting_model.txt", str(result.summary()))
    plots.set_style()
    plots.save(plots.forgetting_by_length(rows), paths.figures_dir(short.name, root) if paper else dest,
               "forgetting_by_length")
    read = [paths.run_dir(profile, root, paths.TRAIN_CHARACTER, c) / paths.CHECKS
            for profile in (short, long) for c in rows.loc[rows["profile"] == profile.name, "condition"]]
    inputs = {str(path): file_hash(path) for path in read}
    atomic_write_json(dest / "forgetting_manifest.json", {
        "git": git_state(root), "profiles": {p.name: {"digest": p.digest(), "params": p.model_dump(mode="json")}
                                             for p in (short, long)},
        "packages": package_versions(), "inputs": inputs, "formula": formula})
    term = table.set_index("term").loc["log2_level:longer"]
    means = rows.groupby("epochs")["forgetting_change"].mean()
    if paper:
        ratio = long.character.epochs / short.character.epochs
        write_numbers({"h5_long_profile": long.name, "h5_length_ratio": int(ratio) if ratio.is_integer() else ratio,
                       "h5_long_mean": float(means[long.character.epochs]),
                       "h5_short_mean": float(means[short.character.epochs]),
                       "h5_length_interaction": float(term["estimate"]), "h5_length_interaction_p": float(term["p"]),
                       "h5_length_conditions": len(rows) // 2,
                       # the paper quotes this only beside the run it was made from (same profile digest)
                       "h5_short_digest": short.digest()[:12]},
                      paths.generated_dir(short.name, root) / paths.H5_LENGTH_TEX,
                      source="python -m persona_em forgetting")
    return (f"H5 over training length ({short.name}: {short.character.epochs} epoch(s), {long.name}: "
            f"{long.character.epochs}), {len(rows) // 2} shared conditions: mean neutral log-lik change "
            + ", ".join(f"{e:g} epoch(s) {v:+.4f}" for e, v in means.items())
            + f"; log2_level:longer {term['estimate']:+.4f} [{term['ci_low']:+.4f}, {term['ci_high']:+.4f}], "
            f"p = {term['p']:.3f} (H5 predicts > 0). Written to {dest}/")
