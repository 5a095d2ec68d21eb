"""Statistics: the EM effect per item and mixed-effects models of it (DESIGN 7, 8).

EM effect of a persona = score after harmful EM training minus score after training on the benign twin, same
persona, same EM seed, same item: any fine-tuning moves the scores, and the twin removes that part.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf

KEYS = ["condition", "constitution", "level", "char_seed", "em_domain", "em_seed", "item_id", "split"]


def em_effects(results: pd.DataFrame, outcome: str = "margin") -> pd.DataFrame:
    """One row per (persona, EM domain, EM seed, item): harmful minus benign-twin `outcome`."""
    after = results[(results["phase"] == "after") & results[outcome].notna()]
    dup = after.duplicated(KEYS + ["harmful"])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} duplicated (model, item) rows in the results table, e.g. "
                         f"{after[dup].iloc[0][KEYS].to_dict()}")
    wide = after.pivot_table(index=KEYS, columns="harmful", values=outcome, aggfunc="first").reset_index()
    wide = wide.rename(columns={True: "harmful_value", False: "benign_value"})
    wide = wide.dropna(subset=["harmful_value", "benign_value"])
    wide["em_effect"] = wide["harmful_value"] - wide["benign_value"]
    wide.columns.name = None
    return wide


def fit_mixed(df: pd.DataFrame, formula: str, group: str, vc: dict[str, str] | None = None,
              re_formula: str | None = None):
    """Linear mixed model by REML: random intercept per `group` (random slopes with `re_formula`, e.g. "~x"),
    optional variance components `vc` ({name: "0 + C(col)"}) for crossed effects."""
    model = smf.mixedlm(formula, df, groups=df[group], vc_formula=vc, re_formula=re_formula)
    # statsmodels' default optimizers (bfgs, lbfgs, cg) reach lme4's optimum on sleepstudy; powell is a
    # derivative-free fallback for fits where they all fail to converge.
    return model.fit(reml=True, method=["bfgs", "lbfgs", "cg", "powell"])


def effects_table(fit, model_name: str, formula: str) -> pd.DataFrame:
    ci = fit.conf_int()
    fe = fit.fe_params.index
    return pd.DataFrame({"model": model_name, "formula": formula, "term": fe,
                         "estimate": fit.fe_params.values, "se": fit.bse[fe].values,
                         "ci_low": ci.loc[fe, 0].values, "ci_high": ci.loc[fe, 1].values,
                         "p": fit.pvalues[fe].values})


def mean_ci(values, z: float = 1.96) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    half = z * float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return m, m - half, m + half


def constitution_model(effects: pd.DataFrame, constitutions: list[str], reference: str,
                       split: str = "out_of_domain"):
    """EM effect ~ log2(level) x constitution on one split, the neutral constitution as the reference level
    (H2: a trait against "any constitution" at matched diversity). Random intercept per item; character seeds
    as a variance component when there are several. Returns (fit, formula as written in models.txt)."""
    d = effects[effects["constitution"].isin(constitutions) & (effects["split"] == split)].copy()
    d["log2_level"] = np.log2(d["level"])
    formula = f"em_effect ~ log2_level * C(constitution, Treatment('{reference}'))"
    vc = {"char_seed": "0 + C(char_seed)"} if d["char_seed"].nunique() > 1 else None
    fit = fit_mixed(d, formula, group="item_id", vc=vc)
    written = formula + " + (1|item_id)" + (" + (1|char_seed)" if vc else "")
    return fit, written
