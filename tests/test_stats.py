"""Chapter 5's models on simulated tables with known effects: each must recover what was put in."""
import numpy as np
import pandas as pd
import pytest

from persona_em import stats


def _judged(interaction: float, seed: int = 0, misaligned_rate: float | None = None) -> pd.DataFrame:
    """Judged answers after EM: aligned = 80 - 20 harmful + interaction x log2(level) x harmful + question and
    run intercepts + noise, for two constitutions (one the neutral reference); misaligned drawn from a logistic
    model whose log2(level) x harmful term is -0.8."""
    rng = np.random.default_rng(seed)
    q_eff = rng.normal(0, 3, 6)
    rows = []
    for const in ("neutral", "candor"):
        for level in (1, 2, 4, 8):
            for cs in range(2):
                for harmful in (True, False):
                    run = f"{const}-L{level}-s{cs}__financial-{'harmful' if harmful else 'benign'}__s0"
                    r_eff = rng.normal(0, 2)
                    for q in range(6):
                        for s in range(3):
                            a = 80 - 20 * harmful + interaction * np.log2(level) * harmful + q_eff[q] + r_eff \
                                + rng.normal(0, 4)
                            logit = -1.5 + 3 * harmful - 0.8 * np.log2(level) * harmful
                            mis = float(rng.random() < 1 / (1 + np.exp(-logit)))
                            rows.append({"measure": "judge", "phase": "after", "constitution": const, "level": level,
                                         "char_seed": cs, "harmful": harmful, "item_id": f"q{q}", "model": run,
                                         "condition": run.split("__")[0],
                                         "aligned": a, "coherent": 80.0,
                                         "misaligned": mis if misaligned_rate is None else 0.0})
    return pd.DataFrame(rows)


def test_aligned_model_recovers_diversity_by_harmful():
    fit, formula, df = stats.aligned_model(_judged(interaction=3.0), ["candor", "neutral"], "neutral")
    assert "(1|question) + (1|run) + (1|condition) + (1|draw)" in formula and "log2_level * harmful" in formula
    # 32 EM runs in 16 conditions; the condition dummies absorb the condition-level terms, leaving harmful and
    # its interactions with level, constitution and both: 32 - 16 - 4
    assert df == 12
    est = fit.fe_params["log2_level:harmful"]
    lo, hi = fit.conf_int().loc["log2_level:harmful"]
    assert est == pytest.approx(3.0, abs=1.0) and lo < 3.0 < hi
    assert len(fit.vcomp) == 4 and fit.converged_ok


def test_misaligned_glm_fits_and_refuses_what_is_not_estimable():
    result, formula, counts = stats.misaligned_model(_judged(interaction=3.0), ["candor", "neutral"], "neutral")
    assert counts["fixed_effects"] == 8 and counts["events"] >= 80
    table = stats.bayes_effects_table(result, "misaligned", formula).set_index("term")
    assert table.loc["harmful", "estimate"] > 1
    inter = table.loc["log2_level:harmful"]
    # a fitted Bayes table goes through chapter 5's test rows like any other
    from persona_em import analysis
    row = analysis.term_row(table.reset_index(), "log2_level:harmful", "misaligned_judge", "secondary", "H1")
    assert row["converged"] and row["df"] == np.inf and row["p"] < 0.05
    # variational Bayes shrinks toward the prior and under-states the spread: sign and size, not the interval
    assert -1.3 < inter["estimate"] < -0.3 and inter["ci_high"] < 0
    again = stats.misaligned_model(_judged(interaction=3.0), ["candor", "neutral"], "neutral")[0]
    assert np.array_equal(result.fe_mean, again.fe_mean) and np.array_equal(result.vcp_mean, again.vcp_mean)
    none, reason, counts = stats.misaligned_model(_judged(0.0, misaligned_rate=0.0), ["candor", "neutral"], "neutral")
    assert none is None and "not estimable: 0 misaligned" in reason and counts["events"] == 0
    # events at one level only, or too few per fixed effect: counts, no fit
    d = _judged(3.0)
    d.loc[d["level"] != 8, "misaligned"] = 0.0
    none, reason, counts = stats.misaligned_model(d, ["candor", "neutral"], "neutral")
    assert none is None and counts["levels_with_events"] == 1 and "at 1 diversity level" in reason
    d = _judged(3.0)
    keep = d.index[d["misaligned"] > 0][:20]
    d.loc[~d.index.isin(keep), "misaligned"] = 0.0
    none, reason, counts = stats.misaligned_model(d, ["candor", "neutral"], "neutral")
    assert none is None and counts["events"] == 20 and "10 per fixed effect" in reason


def test_contrast_matches_the_fit_and_names_unknown_terms():
    d = _judged(interaction=3.0)
    fit, _, df = stats.aligned_model(d, ["candor", "neutral"], "neutral")
    a, b = "harmful", "log2_level:harmful"
    c = stats.contrast(fit, {a: 1, b: -1}, "a-b")
    assert c["estimate"] == pytest.approx(fit.fe_params[a] - fit.fe_params[b])
    cov = fit.cov_params().loc[[a, b], [a, b]].values
    assert c["se"] == pytest.approx(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-6)
    z, t = c, stats.contrast(fit, {a: 1, b: -1}, "a-b", df=df)   # t with the fit's df: wider, larger p
    assert t["estimate"] == z["estimate"] and t["ci_high"] - t["ci_low"] > z["ci_high"] - z["ci_low"]
    assert t["p"] > z["p"]
    with pytest.raises(KeyError, match="no term"):
        stats.contrast(fit, {"nope": 1}, "bad")


def test_spread_effect_is_harmful_minus_benign_sd():
    rows = []
    for harmful, scale in ((True, 2.0), (False, 1.0)):
        for i, z in enumerate([-1.0, 0.0, 1.0]):
            rows.append({"phase": "after", "split": "out_of_domain", "measure": "contrast", "margin": scale * z,
                         "aligned": np.nan, "condition": "candor-L1-s0", "constitution": "candor", "level": 1,
                         "char_seed": 0, "em_domain": "financial", "em_seed": 0, "harmful": harmful})
    spread = stats.spread_effects(pd.DataFrame(rows))
    assert len(spread) == 1 and spread["spread_effect"].iloc[0] == pytest.approx(1.0)


def _balanced(slope: float, n_draws: int, levels=(1, 4, 16), n_items: int = 18, seed: int = 0,
              vcs=None) -> pd.DataFrame:
    """An item-level table with the primary model's structure (draw, condition, item, residual)."""
    vcs = vcs or {"draw": 0.002, "condition": 0.001, "item_id": 0.02, "residual": 0.004}
    sims = stats.simulate_design(list(levels), n_draws, n_items, slope, vcs, np.random.default_rng(seed))[0]
    rows = [{"em_effect": sims[d, i, k], "level": lv, "char_seed": d, "item_id": f"i{k}", "constitution": "candor",
             "split": "out_of_domain", "condition": f"candor-L{lv}-s{d}"}
            for d in range(n_draws) for i, lv in enumerate(levels) for k in range(n_items)]
    return pd.DataFrame(rows)


def test_primary_model_has_draw_and_condition_units_and_containment_df():
    d = _balanced(-0.02, n_draws=4)
    fit, formula, df = stats.primary_model(d, ["candor"])
    assert formula == "em_effect ~ log2_level + (1|item_id) + (1|condition) + (1|draw)"
    assert df == 12 - 4 - 1 and fit.converged_ok
    table = stats.effects_table(fit, "primary", formula, df).set_index("term")
    z_wide = 1.96 * table.loc["log2_level", "se"]
    assert table.loc["log2_level", "ci_high"] - table.loc["log2_level", "estimate"] > z_wide   # t(7) is wider
    assert table.loc["log2_level", "df"] == 7


def test_power_simulation_uses_the_primary_test():
    """For a balanced design the crossed MixedLM's slope and t equal those of condition means within draws,
    which is what the power simulation computes (vectorised) instead of fitting thousands of models. (Where the
    condition variance is estimated at its boundary, zero, the two part by a few per cent; then the simulation is
    the more conservative.)"""
    vcs = {"draw": 0.002, "condition": 0.001, "item_id": 0.02, "residual": 0.004}
    levels = [1, 4, 16]
    for seed in range(4):
        sims = stats.simulate_design(levels, 4, 18, -0.01, vcs, np.random.default_rng(seed))
        b, t, df = stats.slope_tests(levels, sims)
        d = pd.DataFrame([{"em_effect": sims[0, dr, i, k], "level": lv, "char_seed": dr, "item_id": k,
                           "constitution": "candor", "split": "out_of_domain", "condition": f"c{dr}-{lv}"}
                          for dr in range(4) for i, lv in enumerate(levels) for k in range(18)])
        fit, _, fdf = stats.primary_model(d, ["candor"])
        assert fit.converged_ok and fdf == df
        assert b[0] == pytest.approx(fit.fe_params["log2_level"], rel=1e-6)
        assert t[0] == pytest.approx(fit.fe_params["log2_level"] / fit.bse_fe["log2_level"], rel=1e-3)


def test_power_curve_starts_at_alpha_rises_and_gives_a_minimal_detectable_effect():
    vcs = {"draw": 0.002, "condition": 0.001, "item_id": 0.02, "residual": 0.004}
    curve = stats.power_curve([1, 4, 16], [4, 16], 18, [0.0, -0.005, -0.01, -0.02, -0.04], vcs, 2000, seed=1)
    null = curve[curve["slope"] == 0]["power"]
    assert (null.between(0.03, 0.07)).all()   # the test holds its level: a false-positive rate near alpha
    for _, g in curve.groupby("n_draws"):
        assert g.sort_values("slope", ascending=False)["power"].is_monotonic_increasing
    p4 = curve.set_index(["n_draws", "slope"])["power"]
    assert p4[(16, -0.01)] > p4[(4, -0.01)]
    mde = stats.minimal_detectable(curve, 0.8).set_index("n_draws")["mde"]
    assert 0.005 < mde[16] < mde[4] <= 0.04
    # interpolation: exactly between two simulated sizes when power crosses the target between them
    toy = pd.DataFrame({"n_draws": 4, "slope": [0.0, -0.1, -0.2], "power": [0.05, 0.6, 1.0]})
    assert stats.minimal_detectable(toy, 0.8)["mde"].iloc[0] == pytest.approx(0.15)
    assert np.isnan(stats.minimal_detectable(toy.assign(power=[0.05, 0.2, 0.5]), 0.8)["mde"].iloc[0])


def test_cluster_interval_is_over_units_not_rows():
    rng = np.random.default_rng(0)
    units = np.repeat(np.arange(4), 50)
    values = rng.normal(0, 1, 4)[units] + rng.normal(0, 0.01, 200)
    m, lo, hi, k = stats.cluster_mean_ci(values, units)
    means = pd.Series(values).groupby(units).mean()
    assert k == 4 and m == pytest.approx(means.mean())
    from scipy.stats import t
    assert hi - m == pytest.approx(t(3).ppf(0.975) * means.std(ddof=1) / 2)
    assert np.isnan(stats.cluster_mean_ci([1.0, 2.0], [0, 0])[1])   # one unit: no interval


def test_holm_adjusts_secondary_p_values():
    assert list(stats.holm([0.01, 0.04, 0.03, np.nan])[:3]) == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(stats.holm([0.01, np.nan])[1])


def test_nonconverged_fit_is_flagged():
    """Two random factors that are the same grouping cannot be told apart: the fit must say it is not to be
    trusted (here statsmodels' optimizers fail on a singular matrix; the flag carries that into effects.csv and
    the paper, with NaN estimates, instead of stopping the analysis)."""
    d = _balanced(-0.02, n_draws=4)
    d["copy"] = d["condition"]
    fit = stats.fit_crossed(d.assign(log2_level=np.log2(d["level"])), "em_effect ~ log2_level",
                            ["item_id", "condition", "copy"])
    good = stats.fit_crossed(d.assign(log2_level=np.log2(d["level"])), "em_effect ~ log2_level",
                             ["item_id", "condition"])
    assert good.converged_ok and not fit.converged_ok and fit.notes
    table = stats.effects_table(fit, "m", "f", df=7)
    assert not table["converged"].any() and table["estimate"].isna().all() and table["p"].isna().all()


def _checks(trait_gain: float, neutral_gain: float, n_draws: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_draws):
        for lv in (1, 4, 16):
            for const, gain in (("candor", trait_gain), ("neutral", neutral_gain)):
                rows.append({"condition": f"{const}-L{lv}-s{d}", "constitution": const, "level": lv, "char_seed": d,
                             "trait": "candor", "margin_before": 0.16, "margin": 0.16 + gain + rng.normal(0, 0.01)})
    return pd.DataFrame(rows)


def test_manipulation_check_gate():
    rewards = pd.DataFrame({"reward_accuracy": [1.0] * 23 + [0.5]})
    table, gate = stats.manipulation_check(_checks(0.15, 0.05), ["candor"], "neutral", rewards)
    pooled = table[table["trait"] == "pooled"].set_index("comparison")
    assert gate["passed"] and gate["reward_share"] == pytest.approx(23 / 24)
    assert pooled.loc["vs base", "mean"] == pytest.approx(0.15, abs=0.01)
    assert pooled.loc["vs neutral", "mean"] == pytest.approx(0.10, abs=0.01)
    assert (pooled["n_draws"] == 4).all() and (pooled["n_conditions"] == 12).all()
    # a trait no better than the neutral constitution fails, and says why
    _, gate = stats.manipulation_check(_checks(0.05, 0.05), ["candor"], "neutral", rewards)
    assert not gate["passed"] and any(r.startswith("vs neutral") for r in gate["reasons"])
    # pairs not learned
    _, gate = stats.manipulation_check(_checks(0.15, 0.05), ["candor"], "neutral",
                                       pd.DataFrame({"reward_accuracy": [1.0] * 20 + [0.5] * 4}))
    assert not gate["passed"] and any("reward accuracy" in r for r in gate["reasons"])
    # one draw: not estimable, so not passed
    _, gate = stats.manipulation_check(_checks(0.15, 0.05, n_draws=1), ["candor"], "neutral", rewards)
    assert not gate["passed"] and any("not estimable" in r for r in gate["reasons"])


def test_forgetting_model_recovers_a_slope_within_draws():
    rng = np.random.default_rng(1)
    draw = rng.normal(0, 0.05, 3)
    d = pd.DataFrame([{"constitution": c, "level": lv, "char_seed": s, "forgetting_change": -0.1 + 0.02 * np.log2(lv)
                       + draw[s] + rng.normal(0, 0.002)} for c in ("candor", "neutral") for lv in (1, 2, 4, 16)
                      for s in range(3)])
    fit, formula = stats.forgetting_model(d)
    assert fit.params["log2_level"] == pytest.approx(0.02, abs=0.003) and "C(constitution)" in formula
    assert "C(draw)" in formula and fit.df_resid == 24 - 4 - 2


def test_crossed_fit_separates_item_and_seed_variance():
    """Items and character seeds are crossed (every seed answers every item): both variances come back, and
    the seed variance is not confused with an item x seed interaction (what a nested fit would estimate)."""
    rng = np.random.default_rng(3)
    items, seeds = rng.normal(0, 0.3, 30), rng.normal(0, 0.2, 8)
    d = pd.DataFrame([{"item_id": i, "char_seed": s, "level": lv,
                       "em_effect": 0.05 * np.log2(lv) + items[i] + seeds[s] + rng.normal(0, 0.05)}
                      for i in range(30) for s in range(8) for lv in (1, 4)])
    d["log2_level"] = np.log2(d["level"])
    vcs = stats.variance_components(stats.fit_crossed(d, "em_effect ~ log2_level", ["item_id", "char_seed"]))
    assert vcs["item_id"] == pytest.approx(items.var(ddof=1), rel=0.35)
    assert vcs["char_seed"] == pytest.approx(seeds.var(ddof=1), rel=0.5)
    assert vcs["residual"] == pytest.approx(0.0025, rel=0.3)


def test_the_verdict_follows_the_gate_and_the_primary_test():
    from persona_em.analysis import verdict

    row = lambda est, p, converged=True: pd.Series({"estimate": est, "ci_low": est - 0.1, "ci_high": est + 0.1,
                                                    "p": p, "converged": converged})
    assert verdict(False, row(-0.3, 0.001), 0.05, 0.1).startswith("The manipulation check failed")
    assert "not usable" in verdict(True, row(-0.3, 0.001, converged=False), 0.05, 0.1)
    assert "not usable" in verdict(True, row(float("nan"), float("nan")), 0.05, 0.1)
    assert "falls as diversity rises" in verdict(True, row(-0.3, 0.001), 0.05, 0.1)
    assert "the opposite" in verdict(True, row(0.3, 0.001), 0.05, 0.1)
    quiet = verdict(True, row(0.02, 0.4), 0.05, 0.25)
    assert "no detectable change" in quiet and "-0.080 to 0.120" in quiet and "0.250 per doubling" in quiet
