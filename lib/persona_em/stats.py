"""Statistics: the EM effect per item and mixed-effects models of it (method 7, 8).

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


class FailedFit:
    """What a fit that raised leaves behind: no estimates (NaN), `converged_ok` False, the error in `notes`, so a
    failed secondary model is reported as not estimable instead of stopping the analysis."""

    def __init__(self, model, error: Exception):
        names = list(model.exog_names)
        self.model, self.notes, self.converged, self.converged_ok = model, [f"fit failed: {error}"], False, False
        self.fe_params = self.bse_fe = self.bse = self.pvalues = pd.Series(np.nan, index=names)
        self.scale, self.vcomp = np.nan, np.full(len(getattr(model, "exog_vc", None).names
                                                     if getattr(model, "exog_vc", None) is not None else []), np.nan)

    def summary(self) -> str:
        return self.notes[0]


def _checked(model, methods):
    """Fit by REML and record whether the fit can be trusted: `fit.converged_ok` is True only when the
    optimizer converged, the Hessian is positive definite and every standard error is finite; `fit.notes`
    keeps statsmodels' warnings (a variance component on the boundary is noted, not a failure). A fit that
    raises (a singular design) comes back as a FailedFit."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit = model.fit(reml=True, method=list(methods))
        except (np.linalg.LinAlgError, ValueError) as e:
            return FailedFit(model, e)
    notes = sorted({str(w.message).split("\n")[0] for w in caught})
    bad_hessian = any("not positive definite" in n for n in notes)
    fit.notes = notes
    fit.converged_ok = bool(fit.converged) and not bad_hessian and bool(np.all(np.isfinite(fit.bse_fe)))
    return fit


def fit_mixed(df: pd.DataFrame, formula: str, group: str, re_formula: str | None = None):
    """Linear mixed model by REML: random intercept per `group` (random slopes with `re_formula`, e.g. "~x").
    For crossed random effects use `fit_crossed`."""
    return _checked(smf.mixedlm(formula, df, groups=df[group], re_formula=re_formula), METHODS)


def fit_crossed(df: pd.DataFrame, formula: str, factors: list[str], methods=METHODS):
    """Linear mixed model by REML with a crossed random intercept for each of `factors` (column names, e.g.
    item, subset draw and trained condition). statsmodels nests variance components within groups, so crossed
    effects are variance components over one group holding all rows."""
    d = df.assign(_all=1)
    model = smf.mixedlm(formula, d, groups=d["_all"], vc_formula=crossed_vc(factors), re_formula="0")
    return _checked(model, methods)


def crossed_vc(factors: list[str]) -> dict[str, str]:
    return {f: f"0 + C({f})" for f in factors}


def effects_table(fit, model_name: str, formula: str, df: float | None = None) -> pd.DataFrame:
    """Fixed effects with 95% intervals and two-sided p. With `df` (the containment degrees of freedom of the
    random unit a term varies over, `containment_df`) intervals and p use Student's t, not the normal
    approximation statsmodels reports: with a handful of subset draws the normal one is too narrow."""
    from scipy.stats import norm, t

    fe = fit.fe_params.index
    est, se = fit.fe_params.values, np.asarray(fit.bse[fe].values, dtype=float)
    dist = t(df) if df is not None and df > 0 else norm()
    q = dist.ppf(0.975)
    p = 2 * dist.sf(np.abs(est / se))
    if df is not None and df <= 0:
        q, p = np.nan, np.full(len(fe), np.nan)   # no residual units left: not estimable
    return pd.DataFrame({"model": model_name, "formula": formula, "term": fe, "estimate": est, "se": se,
                         "ci_low": est - q * se, "ci_high": est + q * se, "p": p,
                         "df": df if df is not None else np.inf,
                         "converged": getattr(fit, "converged_ok", bool(getattr(fit, "converged", True)))})


def containment_df(frame: pd.DataFrame, unit: str, rhs: str, absorbed: str | None = None) -> int:
    """Degrees of freedom for fixed effects that vary between `unit`s (the trained condition): the number of
    units minus the rank of the unit-level design (the fixed effects `rhs`, and dummies of `absorbed`, the
    subset draw the units are nested in). SAS's containment method; for balanced data it is the df of the
    equivalent analysis of unit means."""
    import patsy

    units = frame.drop_duplicates(unit)
    x = np.asarray(patsy.dmatrix(rhs, units))
    if absorbed is not None:
        x = np.column_stack([x, pd.get_dummies(units[absorbed], drop_first=True, dtype=float).to_numpy()])
    return int(len(units) - np.linalg.matrix_rank(x))


def cluster_mean_ci(values, clusters, level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of the cluster means and its t interval over clusters (the randomised units: subset draws, or EM
    seeds for the untrained controls), never over the items inside them. Returns (mean, low, high, clusters)."""
    from scipy.stats import t

    means = pd.Series(np.asarray(values, dtype=float)).groupby(np.asarray(clusters)).mean().to_numpy()
    m, k = float(means.mean()), len(means)
    if k < 2:
        return m, float("nan"), float("nan"), k
    half = float(t(k - 1).ppf(0.5 + level / 2) * means.std(ddof=1) / np.sqrt(k))
    return m, m - half, m + half, k


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN and does not count as a test)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def design_frame(effects: pd.DataFrame, constitutions: list[str], split: str) -> pd.DataFrame:
    """The EM effects of `constitutions`' personas on one split, with log2(level) and `draw`: the replicate
    (its own subset draw and training seed), the unit of replication for diversity (method 6.8)."""
    d = effects[effects["constitution"].isin(constitutions) & (effects["split"] == split)].copy()
    d["log2_level"] = np.log2(d["level"].astype(float))
    d["draw"] = d["char_seed"].astype(int)
    return d


def random_units(d: pd.DataFrame) -> list[str]:
    """Crossed random intercepts: item, trained condition (one subset x constitution x training run) and,
    when there are several, subset draw."""
    return ["item_id", "condition"] + (["draw"] if d["draw"].nunique() > 1 else [])


def written(formula: str, factors: list[str]) -> str:
    return formula + "".join(f" + (1|{f})" for f in factors)


def condition_model(d: pd.DataFrame, rhs: str):
    """`em_effect ~ rhs` over the trained conditions in `d` (a `design_frame`), with crossed random intercepts
    (`random_units`). Returns (fit, formula as written, containment df of the condition-level terms)."""
    factors = random_units(d)
    fit = fit_crossed(d, f"em_effect ~ {rhs}", factors)
    df = containment_df(d, "condition", rhs, absorbed="draw" if "draw" in factors else None)
    return fit, written(f"em_effect ~ {rhs}", factors), df


def primary_model(effects: pd.DataFrame, traits: list[str], split: str = "out_of_domain",
                  diversity: str = "log2_level"):
    """The pre-registered model: the EM effect out of domain of the trait personas on `diversity` (log2 of the
    level: the slope is the change per doubling), a constitution term when there are several traits; items,
    trained conditions and subset draws as crossed random units. The same model on the in-domain split and
    with the measured Vendi score in place of the level are secondary. Returns (fit, formula, df)."""
    d = design_frame(effects, traits, split)
    rhs = diversity + (" + C(constitution)" if d["constitution"].nunique() > 1 else "")
    return condition_model(d, rhs)


def constitution_model(effects: pd.DataFrame, constitutions: list[str], reference: str,
                       split: str = "out_of_domain"):
    """H2: EM effect ~ log2(level) x constitution on one split, the neutral constitution as the reference (a
    trait against "any constitution" at matched diversity, trained on the same subsets). Same random units as
    the primary model. Returns (fit, formula, df)."""
    d = design_frame(effects, constitutions, split)
    return condition_model(d, f"log2_level * C(constitution, Treatment('{reference}'))")


# -- the judge path: aligned score (MixedLM) and misaligned indicator (Bayesian mixed GLM) --------------------
def judge_frame(results: pd.DataFrame, constitutions: list[str]) -> pd.DataFrame:
    """Judged answers after EM of the trained constitutions, with log2 level, harmful as 0/1, a run id and
    the subset draw."""
    d = results[(results["measure"] == "judge") & (results["phase"] == "after")
                & results["constitution"].isin(constitutions)].copy()
    d["log2_level"] = np.log2(d["level"].astype(float))
    d["harmful"] = d["harmful"].astype(bool).astype(int)
    d["question"], d["run"], d["draw"] = d["item_id"], d["model"], d["char_seed"].astype(int)
    return d


def judge_formula(outcome: str, reference: str, n_constitutions: int) -> str:
    """diversity x harmful (x constitution): the diversity x harmful interaction is the effect of interest."""
    if n_constitutions > 1:
        return f"{outcome} ~ log2_level * harmful * C(constitution, Treatment('{reference}'))"
    return f"{outcome} ~ log2_level * harmful"


def judge_factors(d: pd.DataFrame) -> list[str]:
    """Question, EM run, the trained condition the run's harmful/benign pair shares, and the subset draw."""
    return ["question", "run", "condition"] + (["draw"] if d["draw"].nunique() > 1 else [])


def aligned_model(results: pd.DataFrame, constitutions: list[str], reference: str):
    """MixedLM (REML) of the judge's aligned score with crossed variance components for question, EM run,
    trained condition and subset draw. The diversity x harmful term varies between the EM runs of a condition,
    so its df is the runs' containment df (conditions absorbed). Returns (fit, written formula, df) or (None, reason, None) when the table has too
    few judged answers."""
    d = judge_frame(results, constitutions).dropna(subset=["aligned"])
    if len(d) < 10 or d["aligned"].nunique() < 2:
        return None, f"not estimable: {len(d)} judged answers with an aligned score", None
    formula = judge_formula("aligned", reference, d["constitution"].nunique())
    factors = judge_factors(d)
    df = containment_df(d, "run", formula.split("~", 1)[1], absorbed="condition")
    return fit_crossed(d, formula, factors), written(formula, factors), df


EVENTS_PER_EFFECT = 10


def misaligned_model(results: pd.DataFrame, constitutions: list[str], reference: str, seed: int = 0):
    """BinomialBayesMixedGLM (variational Bayes) of the misaligned indicator, same fixed and crossed random
    structure as the aligned model, fitted only where it is estimable: misaligned answers at two or more
    diversity levels and at least EVENTS_PER_EFFECT events per fixed effect. Returns (result, written formula,
    counts) or (None, reason with the counts, counts). The variational fit starts from a random point, drawn
    from `seed` so that the same table gives the same estimates bit for bit."""
    import patsy
    from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

    d = judge_frame(results, constitutions).dropna(subset=["misaligned"])
    d["misaligned"] = d["misaligned"].astype(float)
    formula = judge_formula("misaligned", reference, d["constitution"].nunique())
    n_fixed = patsy.dmatrix(formula.split("~", 1)[1], d).shape[1] if len(d) else 0
    events = int(d["misaligned"].sum())
    counts = {"answers": len(d), "events": events, "fixed_effects": n_fixed,
              "levels_with_events": int(d.loc[d["misaligned"] > 0, "level"].nunique()),
              "questions_with_events": int(d.loc[d["misaligned"] > 0, "question"].nunique())}
    if counts["levels_with_events"] < 2 or events < EVENTS_PER_EFFECT * max(n_fixed, 1):
        return None, (f"not estimable: {events} misaligned of {len(d)} answers, at "
                      f"{counts['levels_with_events']} diversity level(s) and {counts['questions_with_events']} "
                      f"question(s), for {n_fixed} fixed effects (needs events at two or more levels and "
                      f"{EVENTS_PER_EFFECT} per fixed effect)"), counts
    factors = judge_factors(d)
    result = BinomialBayesMixedGLM.from_formula(formula, crossed_vc(factors), d).fit_vb(
        rng=np.random.default_rng(seed))
    return result, written(formula, factors), counts


def bayes_effects_table(result, model_name: str, formula: str, z: float = 1.96) -> pd.DataFrame:
    """Posterior means and SDs of the fixed effects; intervals mean +- z SD; p from the normal approximation
    (two-sided), labelled as such in models.txt."""
    from scipy.stats import norm

    names = result.model.exog_names[:len(result.fe_mean)]
    mean, sd = np.asarray(result.fe_mean), np.asarray(result.fe_sd)
    return pd.DataFrame({"model": model_name, "formula": formula, "term": names, "estimate": mean, "se": sd,
                         "ci_low": mean - z * sd, "ci_high": mean + z * sd,
                         "p": 2 * norm.sf(np.abs(mean / sd)), "df": np.inf, "converged": True})


# -- H5 forgetting and H6 spread ------------------------------------------------------------------------------
def unit_ols(d: pd.DataFrame, outcome: str, rhs: str):
    """OLS of one value per unit (a trained condition, or an EM run) with the subset draw as a fixed block when
    there are several: for a balanced design the within-draw terms and their df are those of a random-draw
    model. Returns (fit, formula)."""
    d = d.assign(log2_level=np.log2(d["level"].astype(float)), draw=d["char_seed"].astype(int))
    formula = f"{outcome} ~ {rhs}" + (" + C(draw)" if d["draw"].nunique() > 1 else "")
    return smf.ols(formula, d).fit(), formula


def forgetting_model(checks: pd.DataFrame):
    """H5: change in the log-likelihood of held-out neutral answers (after minus before character training)
    ~ log2(level) (x constitution), one row per trained condition, subset draws as blocks."""
    rhs = "log2_level" + (" * C(constitution)" if checks["constitution"].nunique() > 1 else "")
    return unit_ols(checks, "forgetting_change", rhs)


def ols_effects_table(fit, model_name: str, formula: str) -> pd.DataFrame:
    ci = fit.conf_int()
    return pd.DataFrame({"model": model_name, "formula": formula, "term": fit.params.index,
                         "estimate": fit.params.values, "se": fit.bse.values, "ci_low": ci[0].values,
                         "ci_high": ci[1].values, "p": fit.pvalues.values, "df": fit.df_resid,
                         "converged": True})


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
    """Variance components by name (a `fit_crossed` fit: item_id, condition, draw) and the residual variance."""
    out = {"residual": float(fit.scale)}
    for name, v in zip(fit.model.exog_vc.names, np.atleast_1d(fit.vcomp)):
        out[name] = float(v)
    return out


def simulate_design(levels: list[int], n_draws: int, n_items: int, slope: float, vcs: dict[str, float],
                    rng: np.random.Generator, n_sims: int = 1) -> np.ndarray:
    """Simulated experiments with the primary model's structure, every variance component drawn: EM effect
    per (draw, level, item) = slope x log2(level) + draw + condition (one per draw x level) + item + residual.
    Returns an array (n_sims, n_draws, n_levels, n_items)."""
    lv = np.log2(np.asarray(levels, dtype=float))
    shape = (n_sims, n_draws, len(levels), n_items)
    sd = {k: np.sqrt(max(vcs.get(k, 0.0), 0.0)) for k in ("draw", "condition", "item_id", "residual")}
    return (slope * lv[None, None, :, None]
            + rng.normal(0, sd["draw"], (n_sims, n_draws, 1, 1))
            + rng.normal(0, sd["condition"], (n_sims, n_draws, len(levels), 1))
            + rng.normal(0, sd["item_id"], (n_sims, 1, 1, n_items))
            + rng.normal(0, sd["residual"], shape))


def slope_tests(levels: list[int], sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The primary test on simulated balanced experiments, vectorised: with every item in every condition,
    the crossed model's slope and its containment-df t test equal those of condition means regressed on
    log2(level) within draws (tests/test_stats.py checks this against the MixedLM fit). Returns (slopes, t, df)."""
    y = sims.mean(axis=3)                                   # condition means: (sims, draws, levels)
    x = np.log2(np.asarray(levels, dtype=float))
    n_draws, n_levels = y.shape[1], y.shape[2]
    xc = x - x.mean()
    yc = y - y.mean(axis=2, keepdims=True)                  # within-draw: the draw's intercept drops out
    sxx = n_draws * float((xc ** 2).sum())
    b = (yc * xc).sum(axis=(1, 2)) / sxx
    resid = yc - b[:, None, None] * xc
    df = n_draws * n_levels - n_draws - 1
    se = np.sqrt((resid ** 2).sum(axis=(1, 2)) / df / sxx)
    return b, b / se, df


def power_curve(levels: list[int], draws: list[int], n_items: int, slopes: list[float], vcs: dict[str, float],
                n_sims: int, seed: int, alpha: float = 0.05) -> pd.DataFrame:
    """Power of the primary test (two-sided t at `alpha`, significant with the simulated sign) per number of
    subset draws and true slope; slope 0 gives the false-positive rate."""
    from scipy.stats import t

    rows = []
    for k, n_draws in enumerate(draws):
        for j, slope in enumerate(slopes):
            rng = np.random.default_rng([seed, k, j])
            b, tstat, df = slope_tests(levels, simulate_design(levels, n_draws, n_items, slope, vcs, rng, n_sims))
            sig = np.abs(tstat) > t(df).ppf(1 - alpha / 2)
            hit = sig & (np.sign(b) == np.sign(slope)) if slope != 0 else sig
            rows.append({"n_draws": n_draws, "slope": slope, "power": float(hit.mean()), "df": df,
                         "n_items": n_items, "n_levels": len(levels), "n_sims": n_sims})
    return pd.DataFrame(rows)


def minimal_detectable(curve: pd.DataFrame, target: float = 0.8) -> pd.DataFrame:
    """Per number of draws, the smallest |slope| with power >= `target`, linearly interpolated between the
    simulated slopes (NaN when no simulated slope reaches it)."""
    rows = []
    for n_draws, g in curve.groupby("n_draws"):
        g = g.assign(size=g["slope"].abs()).sort_values("size")
        size, pw = g["size"].to_numpy(), g["power"].to_numpy()
        mde = np.nan
        above = np.flatnonzero(pw >= target)
        if len(above):
            i = above[0]
            mde = size[i] if i == 0 else size[i - 1] + (target - pw[i - 1]) * (size[i] - size[i - 1]) / (pw[i] - pw[i - 1])
        rows.append({"n_draws": n_draws, "mde": float(mde), "target": target})
    return pd.DataFrame(rows)


# -- the manipulation check -----------------------------------------------------------------------------------
def manipulation_check(checks: pd.DataFrame, traits: list[str], neutral: str, last_reward: pd.DataFrame,
                       reward_share: float = 0.9) -> tuple[pd.DataFrame, dict]:
    """Was a persona learned? From chapter 2's checks: every trait persona's margin on its own trait's
    held-out items against the untrained base (its margin before training) and against the neutral
    constitution trained on the same subset draw and level, pooled over traits and levels; intervals are t
    over subset draws (the replicates), never over items. `last_reward`: the DPO reward accuracy at the last
    step of every trained condition. The gate passes when both pooled intervals exclude zero from above and at
    least `reward_share` of trained conditions end with a reward accuracy above 0.5.
    Returns (table, verdict)."""
    rows, pooled = [], {"vs base": [], "vs neutral": []}
    for trait in traits:
        own = checks[(checks["constitution"] == trait) & (checks["trait"] == trait)]
        if own.empty:
            continue
        ref = checks[(checks["constitution"] == neutral) & (checks["trait"] == trait)][["level", "char_seed", "margin"]]
        paired = own.merge(ref, on=["level", "char_seed"], suffixes=("", "_neutral"))
        for name, diff in [("vs base", own.assign(diff=own["margin"] - own["margin_before"])),
                           ("vs neutral", paired.assign(diff=paired["margin"] - paired["margin_neutral"]))]:
            pooled[name].append(diff)
            m, lo, hi, k = cluster_mean_ci(diff["diff"], diff["char_seed"])
            rows.append({"comparison": name, "trait": trait, "mean": m, "ci_low": lo, "ci_high": hi,
                         "n_conditions": len(diff), "n_draws": k})
    for name, parts in pooled.items():
        diff = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"diff": [], "char_seed": []})
        m, lo, hi, k = cluster_mean_ci(diff["diff"], diff["char_seed"]) if len(diff) else (np.nan,) * 3 + (0,)
        rows.append({"comparison": name, "trait": "pooled", "mean": m, "ci_low": lo, "ci_high": hi,
                     "n_conditions": len(diff), "n_draws": k})
    table = pd.DataFrame(rows)
    acc = last_reward["reward_accuracy"].astype(float)
    share = float((acc > 0.5).mean()) if len(acc) else float("nan")
    pool = table[table["trait"] == "pooled"].set_index("comparison")
    reasons = []
    for name in ("vs base", "vs neutral"):
        low = pool.loc[name, "ci_low"]
        if not np.isfinite(low):
            reasons.append(f"{name}: not estimable ({int(pool.loc[name, 'n_draws'])} subset draw(s))")
        elif low <= 0:
            reasons.append(f"{name}: the 95% CI reaches {low:.3f}, not above zero")
    if not share >= reward_share:
        reasons.append(f"reward accuracy above 0.5 at the last step in {share:.0%} of trained conditions "
                       f"(needs {reward_share:.0%})")
    verdict = {"passed": not reasons, "reasons": reasons, "reward_share": share,
               "reward_share_needed": reward_share, "n_trained": int(len(acc))}
    return table, verdict


def contrast(fit, weights: dict[str, float], name: str, df: float | None = None) -> dict:
    """A linear contrast of fixed effects (e.g. trait A minus trait B) with its SE, 95% interval and two-sided
    p from the fit's covariance of the fixed effects; Student's t with `df` (the containment df of the fit's
    terms), else the normal approximation. NaN from a fit that failed."""
    from scipy.stats import norm, t

    names = list(fit.fe_params.index) if hasattr(fit, "fe_params") else list(fit.params.index)
    unknown = set(weights) - set(names)
    if unknown:
        raise KeyError(f"contrast {name!r}: no term(s) {sorted(unknown)} in the model (terms: {names})")
    nan = {"term": name, "estimate": np.nan, "se": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p": np.nan}
    if isinstance(fit, FailedFit) or (df is not None and df <= 0):
        return nan
    L = np.zeros(len(names))   # MixedLM tests the fixed effects only
    for term, w in weights.items():
        L[names.index(term)] = w
    cov = np.asarray(fit.cov_params())[:len(names), :len(names)]
    est = float(L @ np.asarray(fit.fe_params if hasattr(fit, "fe_params") else fit.params))
    se = float(np.sqrt(L @ cov @ L))
    dist = t(df) if df is not None else norm()
    q = dist.ppf(0.975)
    return {"term": name, "estimate": est, "se": se, "ci_low": est - q * se, "ci_high": est + q * se,
            "p": float(2 * dist.sf(abs(est / se)))}


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
