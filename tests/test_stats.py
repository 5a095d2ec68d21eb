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
                                         "aligned": a, "coherent": 80.0,
                                         "misaligned": mis if misaligned_rate is None else 0.0})
    return pd.DataFrame(rows)


def test_aligned_model_recovers_diversity_by_harmful():
    fit, formula = stats.aligned_model(_judged(interaction=3.0), ["candor", "neutral"], "neutral")
    assert "(1|question) + (1|run)" in formula and "log2_level * harmful" in formula
    est = fit.fe_params["log2_level:harmful"]
    lo, hi = fit.conf_int().loc["log2_level:harmful"]
    assert est == pytest.approx(3.0, abs=1.0) and lo < 3.0 < hi
    assert {"question Var", "run Var"} <= set(fit.summary().tables[1].index) or len(fit.vcomp) == 2


def test_misaligned_glm_fits_and_refuses_a_constant_indicator():
    result, formula = stats.misaligned_model(_judged(interaction=3.0), ["candor", "neutral"], "neutral")
    table = stats.bayes_effects_table(result, "misaligned", formula).set_index("term")
    assert table.loc["harmful", "estimate"] > 1
    inter = table.loc["log2_level:harmful"]
    # variational Bayes shrinks toward the prior and under-states the spread: sign and size, not the interval
    assert -1.3 < inter["estimate"] < -0.3 and inter["ci_high"] < 0
    none, reason = stats.misaligned_model(_judged(0.0, misaligned_rate=0.0), ["candor", "neutral"], "neutral")
    assert none is None and "constant" in reason


def test_contrast_matches_the_fit_and_names_unknown_terms():
    d = _judged(interaction=3.0)
    fit, _ = stats.aligned_model(d, ["candor", "neutral"], "neutral")
    a, b = "harmful", "log2_level:harmful"
    c = stats.contrast(fit, {a: 1, b: -1}, "a-b")
    assert c["estimate"] == pytest.approx(fit.fe_params[a] - fit.fe_params[b])
    cov = fit.cov_params().loc[[a, b], [a, b]].values
    assert c["se"] == pytest.approx(np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-6)
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


def test_power_rises_with_effect_and_design_choice_is_cheapest():
    vcs = {"item_id": 0.01, "char_seed": 0.0001, "residual": 0.0025}
    assert stats.power([1, 2, 4, 16], 3, 16, -0.05, vcs, n_sims=4, seed=0) == 1.0
    assert stats.power([1, 2, 4, 16], 3, 16, 0.0, vcs, n_sims=4, seed=0) <= 0.5
    table = pd.DataFrame({"n_seeds": [3, 3, 5], "n_items": [16, 32, 16], "slope": [-0.1] * 3,
                          "power": [0.5, 0.85, 0.9]})
    assert stats.smallest_design(table, -0.1) == {"n_seeds": 3, "n_items": 32, "slope": -0.1, "power": 0.85,
                                                  "cost": 3032}
    assert stats.smallest_design(table, -0.1, target=0.95) is None


def test_forgetting_model_recovers_a_slope():
    rng = np.random.default_rng(1)
    d = pd.DataFrame([{"constitution": c, "level": lv, "forgetting_change": -0.1 + 0.02 * np.log2(lv)
                       + rng.normal(0, 0.002)} for c in ("candor", "neutral") for lv in (1, 2, 4, 16) for _ in range(3)])
    fit, formula = stats.forgetting_model(d)
    assert fit.params["log2_level"] == pytest.approx(0.02, abs=0.003) and "C(constitution)" in formula


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
