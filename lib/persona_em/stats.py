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


# statsmodels' default optimizers (bfgs, lbfgs, cg) reach lme4's optimum on sleepstudy; powell is a
# derivative-free fallback for fits where they all fail to converge.
METHODS = ("bfgs", "lbfgs", "cg", "powell")


def fit_mixed(df: pd.DataFrame, formula: str, group: str, re_formula: str | None = None):
    """Linear mixed model by REML: random intercept per `group` (random slopes with `re_formula`, e.g. "~x").
    For crossed random effects use `fit_crossed`."""
    return smf.mixedlm(formula, df, groups=df[group], re_formula=re_formula).fit(reml=True, method=list(METHODS))


def fit_crossed(df: pd.DataFrame, formula: str, factors: list[str], methods=METHODS):
    """Linear mixed model by REML with a crossed random intercept for each of `factors` (column names, e.g.
    item and character seed). statsmodels nests variance components within groups, so crossed effects are
    variance components over one group holding all rows."""
    d = df.assign(_all=1)
    model = smf.mixedlm(formula, d, groups=d["_all"], vc_formula=crossed_vc(factors), re_formula="0")
    return model.fit(reml=True, method=list(methods))


def crossed_vc(factors: list[str]) -> dict[str, str]:
    return {f: f"0 + C({f})" for f in factors}


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
    (H2: a trait against "any constitution" at matched diversity). Crossed random intercepts for item and, when
    there are several, character seed. Returns (fit, formula as written in models.txt)."""
    d = effects[effects["constitution"].isin(constitutions) & (effects["split"] == split)].copy()
    d["log2_level"] = np.log2(d["level"])
    formula = f"em_effect ~ log2_level * C(constitution, Treatment('{reference}'))"
    seeds = d["char_seed"].nunique() > 1
    fit = fit_crossed(d, formula, ["item_id"] + (["char_seed"] if seeds else []))
    written = formula + " + (1|item_id)" + (" + (1|char_seed)" if seeds else "")
    return fit, written


# -- the judge-free margin: main model and its Vendi sensitivity -----------------------------------------------
def margin_model(effects: pd.DataFrame, traits: list[str], diversity: str = "log2_level"):
    """EM effect ~ diversity x split (+ constitution when there are several traits) over the trained trait
    personas: crossed random intercepts for item and, when there are several, character seed.
    `diversity` is the nominal level (log2) or the measured Vendi score (the sensitivity analysis).
    Returns (fit, formula as written in models.txt)."""
    d = effects[effects["constitution"].isin(traits)].copy()
    d["log2_level"] = np.log2(d["level"])
    d["ood"] = (d["split"] == "out_of_domain").astype(int)
    formula = f"em_effect ~ {diversity} * ood" + (" + C(constitution)" if d["constitution"].nunique() > 1 else "")
    seeds = d["char_seed"].nunique() > 1
    fit = fit_crossed(d, formula, ["item_id"] + (["char_seed"] if seeds else []))
    return fit, formula + " + (1|item_id)" + (" + (1|char_seed)" if seeds else "")


# -- the judge path: aligned score (MixedLM) and misaligned indicator (Bayesian mixed GLM) --------------------
def judge_frame(results: pd.DataFrame, constitutions: list[str]) -> pd.DataFrame:
    """Judged answers after EM of the trained constitutions, with log2 level, harmful as 0/1 and a run id."""
    d = results[(results["measure"] == "judge") & (results["phase"] == "after")
                & results["constitution"].isin(constitutions)].copy()
    d["log2_level"] = np.log2(d["level"].astype(float))
    d["harmful"] = d["harmful"].astype(bool).astype(int)
    d["question"], d["run"] = d["item_id"], d["model"]
    return d


def judge_formula(outcome: str, reference: str, n_constitutions: int) -> str:
    """diversity x harmful (x constitution): the diversity x harmful interaction is the effect of interest."""
    if n_constitutions > 1:
        return f"{outcome} ~ log2_level * harmful * C(constitution, Treatment('{reference}'))"
    return f"{outcome} ~ log2_level * harmful"


JUDGE_FACTORS = ["question", "run"]


def aligned_model(results: pd.DataFrame, constitutions: list[str], reference: str):
    """MixedLM (REML) of the judge's aligned score with crossed variance components for question and run
    (one all-encompassing group, as statsmodels fits crossed effects). Returns (fit, written formula) or
    (None, reason) when the table has too few judged answers."""
    d = judge_frame(results, constitutions).dropna(subset=["aligned"])
    if len(d) < 10 or d["aligned"].nunique() < 2:
        return None, f"not estimable: {len(d)} judged answers with an aligned score"
    formula = judge_formula("aligned", reference, d["constitution"].nunique())
    return fit_crossed(d, formula, JUDGE_FACTORS), formula + " + (1|question) + (1|run)"


def misaligned_model(results: pd.DataFrame, constitutions: list[str], reference: str):
    """BinomialBayesMixedGLM (variational Bayes) of the misaligned indicator, same fixed and crossed random
    structure as the aligned model. Returns (result, written formula) or (None, reason) when the indicator
    does not vary (a model of a constant says nothing)."""
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    d = judge_frame(results, constitutions).dropna(subset=["misaligned"])
    d["misaligned"] = d["misaligned"].astype(float)
    if len(d) < 10 or d["misaligned"].nunique() < 2:
        return None, (f"not estimable: the misaligned indicator is constant ({int(d['misaligned'].sum())} of "
                      f"{len(d)} answers misaligned)")
    formula = judge_formula("misaligned", reference, d["constitution"].nunique())
    model = BinomialBayesMixedGLM.from_formula(formula, crossed_vc(JUDGE_FACTORS), d)
    result = model.fit_vb()
    return result, formula + " + (1|question) + (1|run)"


def bayes_effects_table(result, model_name: str, formula: str, z: float = 1.96) -> pd.DataFrame:
    """Posterior means and SDs of the fixed effects; intervals mean +- z SD; p from the normal approximation
    (two-sided), labelled as such in models.txt."""
    from scipy.stats import norm

    names = result.model.exog_names[:len(result.fe_mean)]
    mean, sd = np.asarray(result.fe_mean), np.asarray(result.fe_sd)
    return pd.DataFrame({"model": model_name, "formula": formula, "term": names, "estimate": mean, "se": sd,
                         "ci_low": mean - z * sd, "ci_high": mean + z * sd,
                         "p": 2 * norm.sf(np.abs(mean / sd))})


# -- H5 forgetting and H6 spread ------------------------------------------------------------------------------
def forgetting_model(checks: pd.DataFrame):
    """H5: change in the log-likelihood of held-out neutral answers (after minus before character training)
    ~ log2(level) (+ constitution), OLS over the trained conditions (one row per condition)."""
    d = checks.copy()
    d["log2_level"] = np.log2(d["level"])
    formula = "forgetting_change ~ log2_level" + (" * C(constitution)" if d["constitution"].nunique() > 1 else "")
    return smf.ols(formula, d).fit(), formula


def ols_effects_table(fit, model_name: str, formula: str) -> pd.DataFrame:
    ci = fit.conf_int()
    return pd.DataFrame({"model": model_name, "formula": formula, "term": fit.params.index,
                         "estimate": fit.params.values, "se": fit.bse.values, "ci_low": ci[0].values,
                         "ci_high": ci[1].values, "p": fit.pvalues.values})


SPREAD_KEYS = ["condition", "constitution", "level", "char_seed", "em_domain", "em_seed"]


def spread_effects(results: pd.DataFrame) -> pd.DataFrame:
    """H6: how widely EM scatters a persona. Per EM run, the SD across out-of-domain contrast items of the
    margin, and the SD across judged answers of the aligned score; the spread effect is harmful minus benign
    twin (same persona, EM seed), as for the mean."""
    after = results[(results["phase"] == "after") & (results["split"] == "out_of_domain")]
    rows = []
    for measure, value in [("contrast", "margin"), ("judge", "aligned")]:
        d = after[(after["measure"] == measure) & after[value].notna()]
        if d.empty:
            continue
        sd = d.groupby(SPREAD_KEYS + ["harmful"])[value].std().unstack("harmful")
        if True not in sd or False not in sd:
            continue
        out = (sd[True] - sd[False]).rename("spread_effect").reset_index()
        rows.append(out.assign(measure=measure, value=value).dropna(subset=["spread_effect"]))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=SPREAD_KEYS + ["spread_effect"])


# -- power ----------------------------------------------------------------------------------------------------
def variance_components(fit) -> dict[str, float]:
    """Variance components by name (a `fit_crossed` fit: item_id, char_seed) and the residual variance."""
    out = {"residual": float(fit.scale)}
    for name, v in zip(fit.model.exog_vc.names, np.atleast_1d(fit.vcomp)):
        out[name] = float(v)
    return out


def simulate_effects(levels: list[int], n_seeds: int, n_items: int, slope: float, vcs: dict[str, float],
                     rng: np.random.Generator) -> pd.DataFrame:
    """One simulated experiment with the main model's structure: EM effect per (level, seed, item) =
    slope x log2(level) + item intercept + seed intercept + residual."""
    lv = np.log2(np.asarray(levels, dtype=float))
    item = rng.normal(0, np.sqrt(vcs["item_id"]), n_items)
    seed = rng.normal(0, np.sqrt(vcs.get("char_seed", 0.0)), n_seeds)
    L, S, I = np.meshgrid(np.arange(len(levels)), np.arange(n_seeds), np.arange(n_items), indexing="ij")
    L, S, I = L.ravel(), S.ravel(), I.ravel()
    y = slope * lv[L] + item[I] + seed[S] + rng.normal(0, np.sqrt(vcs["residual"]), L.size)
    return pd.DataFrame({"em_effect": y, "log2_level": lv[L], "char_seed": S, "item_id": I})


def power(levels: list[int], n_seeds: int, n_items: int, slope: float, vcs: dict[str, float], n_sims: int,
          seed: int, alpha: float = 0.05) -> float:
    """Share of simulated experiments in which the fitted diversity slope is significant at `alpha` (two-sided)
    and has the simulated sign: MixedLM with crossed item and seed intercepts, as analysed."""
    import warnings

    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_sims):
        d = simulate_effects(levels, n_seeds, n_items, slope, vcs, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = fit_crossed(d, "em_effect ~ log2_level", ["item_id", "char_seed"], methods=("lbfgs",))
        hits += bool(fit.pvalues["log2_level"] < alpha and np.sign(fit.params["log2_level"]) == np.sign(slope))
    return hits / n_sims


def power_table(levels: list[int], seeds: list[int], items: list[int], slopes: list[float],
                vcs: dict[str, float], n_sims: int, seed: int) -> pd.DataFrame:
    from tqdm.auto import tqdm

    rows = []
    grid = [(s, i, b) for s in seeds for i in items for b in slopes]
    for k, (s, i, b) in enumerate(tqdm(grid, desc="power")):
        rows.append({"n_seeds": s, "n_items": i, "slope": b,
                     "power": power(levels, s, i, b, vcs, n_sims, seed + k)})
    return pd.DataFrame(rows)


def smallest_design(table: pd.DataFrame, slope: float, target: float = 0.8):
    """The cheapest (seeds x items) design reaching `target` power for `slope`, or None."""
    ok = table[(table["slope"] == slope) & (table["power"] >= target)].copy()
    if ok.empty:
        return None
    ok["cost"] = ok["n_seeds"] * 1000 + ok["n_items"]   # seeds cost training runs; items only evaluation
    return ok.sort_values("cost").iloc[0].to_dict()


def contrast(fit, weights: dict[str, float], name: str) -> dict:
    """A linear contrast of fixed effects (e.g. trait A minus trait B) with its SE, 95% interval and p, from
    the fit's covariance of the fixed effects."""
    names = list(fit.fe_params.index) if hasattr(fit, "fe_params") else list(fit.params.index)
    unknown = set(weights) - set(names)
    if unknown:
        raise KeyError(f"contrast {name!r}: no term(s) {sorted(unknown)} in the model (terms: {names})")
    L = np.zeros((1, len(names)))   # MixedLM tests the fixed effects only
    for term, w in weights.items():
        L[0, names.index(term)] = w
    t = fit.t_test(L)
    est, se = float(np.squeeze(t.effect)), float(np.squeeze(t.sd))
    lo, hi = np.squeeze(t.conf_int())
    return {"term": name, "estimate": est, "se": se, "ci_low": float(lo), "ci_high": float(hi),
            "p": float(np.squeeze(t.pvalue))}


def rate_effects(results: pd.DataFrame) -> pd.DataFrame:
    """Judge path, per persona and EM seed: misaligned rate (coherent answers, the EM papers' denominator is
    all answers here) after harmful minus after benign-twin EM."""
    d = results[(results["measure"] == "judge") & (results["phase"] == "after") & results["misaligned"].notna()]
    if d.empty:
        return pd.DataFrame(columns=SPREAD_KEYS + ["rate_effect"])
    rate = d.assign(misaligned=d["misaligned"].astype(float)).groupby(SPREAD_KEYS + ["harmful"])["misaligned"]
    wide = rate.mean().unstack("harmful")
    if True not in wide or False not in wide:
        return pd.DataFrame(columns=SPREAD_KEYS + ["rate_effect"])
    return (wide[True] - wide[False]).rename("rate_effect").reset_index().dropna(subset=["rate_effect"])
