"""Chapter 5's computations: the tables it reads from stages 1-4, the tests PREREGISTRATION.md fixes, and the
numbers the paper quotes. The notebook calls these in order and shows what they return.

Order of the analysis (and of the paper's results): the manipulation check (gate) first, then the primary test,
then the secondary tests (Holm-adjusted, labelled secondary), then power.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import evaluate, grid, paths, stats, training


# -- the tables --------------------------------------------------------------------------------------------------
def results_table(P, root) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per evaluated model x contrast item (`measure = contrast`) and per scored answer (`measure =
    judge`), every condition as columns, measured diversity (Vendi) of the condition's own subset joined from
    stage 1. Returns (results, diversity)."""
    div = pd.read_csv(paths.run_dir(P, root, paths.GENERATE) / paths.DIVERSITY)
    frames = []
    for m in grid.eval_models(P):
        run_dir = paths.run_dir(P, root, paths.EVALUATE, m)
        info = grid.parse_model(m)
        frames.append(pd.read_csv(run_dir / paths.CONTRAST).assign(measure="contrast", model=m, **info))
        judged = pd.read_csv(run_dir / paths.SCORES).rename(columns={"question_id": "item_id"})
        frames.append(judged.assign(measure="judge", split="out_of_domain", domain="general", model=m, **info))
    results = pd.concat(frames, ignore_index=True)
    return with_design(P, results, div, results["measure"] == "contrast"), div


def with_design(P, frame: pd.DataFrame, div: pd.DataFrame, itemised: pd.Series) -> pd.DataFrame:
    """After EM, "in domain" is the domain of the EM dataset that model was trained on: the `itemised` rows' split
    re-read from their item's domain; and the measured diversity (Vendi) of each condition's own subset joined."""
    after = (frame["phase"] == "after") & itemised
    frame.loc[after, "split"] = [evaluate.split_for(d, grid.contrast_domain(P, e)) for d, e in
                                 zip(frame.loc[after, "domain"], frame.loc[after, "em_domain"])]
    return frame.merge(div[["constitution", "level", "char_seed", "vendi"]], on=["constitution", "level", "char_seed"],
                       how="left")


def readout_frame(P, tables: dict[str, pd.DataFrame], div: pd.DataFrame) -> pd.DataFrame:
    """Models' readouts (model id -> chapter 4's `readout.csv` table) as `measure = direction` rows shaped like the
    results table: the model's design columns, each item's split, the condition's Vendi score."""
    from . import direction

    split_of = {it["id"]: it["split"] for it in direction.items(P)}
    out = pd.concat([t.assign(measure="direction", model=m, **grid.parse_model(m)) for m, t in tables.items()],
                    ignore_index=True)
    out["split"] = out["item_id"].map(split_of)
    return with_design(P, out, div, pd.Series(True, index=out.index))


def readout_table(P, root, div: pd.DataFrame, layer: int | None = None) -> pd.DataFrame:
    """Every evaluated model's projections on the misalignment direction (chapter 4's readout fold), one row per
    model x item x layer (`layer`: that layer only), as `measure = direction` rows shaped like the results
    table. Raises if two models read different directions (their manifests record its digest)."""
    tables, digests, seconds = {}, {}, []
    for m in grid.eval_models(P):
        run_dir = paths.run_dir(P, root, paths.EVALUATE, m)
        manifest = json.loads((run_dir / paths.MANIFEST).read_text())
        digests[m] = manifest.get("direction_digest")
        seconds.append(manifest.get("direction_seconds", np.nan))
        frame = pd.read_csv(run_dir / paths.READOUT)
        tables[m] = frame if layer is None else frame[frame["layer"] == layer]
    if len(set(digests.values())) != 1:
        first = next(iter(digests))
        other = next(m for m, d in digests.items() if d != digests[first])
        raise ValueError(f"models read different misalignment directions: {first} {digests[first]}, "
                         f"{other} {digests[other]} (re-run chapter 4 for the stale ones)")
    out = readout_frame(P, tables, div)
    out.attrs["direction_digest"] = next(iter(digests.values()))
    out.attrs["seconds_per_model"] = float(np.nanmean(seconds))   # the readout's added cost in chapter 4
    return out


def direction_layer(stability: pd.DataFrame) -> int:
    """The layer read out: where directions estimated from disjoint EM seeds agree most (mean cosine over seed
    pairs), i.e. where the direction runs determine the direction best. Only the direction runs on the direction
    half of the items play a part in the choice."""
    return int(stability.groupby("layer")["cosine"].mean().idxmax())


def separation_layer(separation: pd.DataFrame) -> int:
    """The layer the registered rule chose (reported beside the one read out): where the direction runs' harmful
    models sit furthest above their benign twins along the direction of the other seeds, in standard errors over
    the direction half's items."""
    return int(separation.loc[separation["t"].idxmax(), "layer"])


def direction_by_layer(readout: pd.DataFrame) -> pd.DataFrame:
    """Per layer, out of domain, how far harmful EM and its benign twin move the untrained base and the random-LoRA
    controls along the direction: mean projection after EM minus before (the projection itself is dominated by
    what every model shares), the figure of the readout's controls."""
    d = readout[readout["constitution"].isin(["base", "random"]) & (readout["split"] == "out_of_domain")].copy()
    d["model_label"] = np.where(d["constitution"] == "base", "untrained base", "random LoRA")
    d["state"] = np.select([d["phase"] == "before", d["harmful"] == True], ["before EM", "after harmful EM"],  # noqa: E712
                           "after benign twin")
    means = d.groupby(["model_label", "state", "layer"], as_index=False)["projection"].mean()
    before = means[means["state"] == "before EM"].set_index(["model_label", "layer"])["projection"]
    after = means[means["state"] != "before EM"].copy()
    after["shift"] = after["projection"] - before.reindex(list(zip(after["model_label"], after["layer"]))).to_numpy()
    return after


def diversity_label(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(np.select([frame["constitution"] == "base", frame["constitution"] == "random"],
                               ["untrained", "random LoRA"], frame["level"].astype(str)), index=frame.index)


def em_effect_table(results: pd.DataFrame, measure: str = "contrast", outcome: str = "margin") -> pd.DataFrame:
    """Harmful minus benign twin, item by item (stats.em_effects), with a diversity label and the randomised
    unit each row belongs to: the subset draw for a persona, the EM seed for the untrained controls. `measure`,
    `outcome`: the likelihood contrast's margin, or the projection on the misalignment direction."""
    contrast = results[(results["measure"] == measure) & (results["split"] != "cross_domain")]
    effects = stats.em_effects(contrast, outcome)
    vendi = results.drop_duplicates(["condition"]).set_index("condition")["vendi"]
    effects["vendi"] = effects["condition"].map(vendi)
    effects["diversity"] = diversity_label(effects)
    control = effects["constitution"].isin(["base", "random"])
    effects["unit"] = np.where(control, "em seed " + effects["em_seed"].astype(str),
                               "draw " + effects["char_seed"].astype(str))
    return effects


def level_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Mean EM effect per constitution, diversity label and split with its 95% t interval over the randomised
    units (subset draws, or EM seeds for the controls), never over items."""
    rows = []
    for (const, div, split), g in effects.groupby(["constitution", "diversity", "split"]):
        m, lo, hi, k = stats.cluster_mean_ci(g["em_effect"], g["unit"])
        rows.append({"constitution": const, "diversity": div, "split": split, "mean": m, "ci_low": lo,
                     "ci_high": hi, "n_units": k, "n_rows": len(g)})
    return pd.DataFrame(rows)


def persona_checks(P, root) -> pd.DataFrame:
    """One row per character condition x trait with persona-check items: the margin after training, before
    (the untrained base: every condition starts there), and the change in neutral log-likelihood."""
    neutral, rows = grid.neutral(P), []
    for cond in grid.character_conditions(P):
        ck = json.loads((paths.run_dir(P, root, paths.TRAIN_CHARACTER, cond) / paths.CHECKS).read_text())
        info = grid.parse_condition(cond)
        for trait, margin in ck["after"]["persona_margins"].items():
            rows.append({**info, "condition": cond, "trait": trait, "margin": margin,
                         "margin_before": ck["before"]["persona_margins"][trait],
                         "forgetting_change": ck["after"]["forgetting_loglik"] - ck["before"]["forgetting_loglik"]})
    checks = pd.DataFrame(rows)
    checks["trained_as"] = np.select([checks["constitution"] == checks["trait"], checks["constitution"] == neutral,
                                      checks["constitution"] == "base", checks["constitution"] == "random"],
                                     ["own trait", "neutral constitution", "untrained base", "random LoRA"],
                                     "other trait")
    checks["level_label"] = np.where(checks["level"] > 0, checks["level"].astype(str), "-")
    return checks


def trained_conditions(P) -> list[str]:
    return [c for c in grid.character_conditions(P) if grid.parse_condition(c)["constitution"] in grid.constitutions(P)]


def last_rewards(P, root) -> pd.DataFrame:
    """DPO reward accuracy (and margin) at the last logged step of every trained condition."""
    rows = []
    for cond in trained_conditions(P):
        log = pd.read_csv(paths.run_dir(P, root, paths.TRAIN_CHARACTER, cond) / paths.TRAIN_LOG)
        dpo = log[log["stage"] == "dpo"] if "stage" in log else log
        last = dpo.iloc[-1]
        rows.append({**grid.parse_condition(cond), "condition": cond, "step": int(last["step"]),
                     "reward_accuracy": float(last["reward_accuracy"]),
                     "reward_margin": float(last.get("reward_margin", np.nan))})
    return pd.DataFrame(rows)


def training_setups(P, root) -> dict:
    """method 6.3 from the manifests: the trainer, optimizer and precision each training stage's runs report
    (read off the live trainers), one per stage for the whole profile; raises ValueError if runs differ."""
    stage_runs = {"character (DPO)": [(paths.TRAIN_CHARACTER, c) for c in trained_conditions(P)],
                  "EM (SFT)": [(paths.INDUCE_EM, r) for r in grid.em_runs(P)]}
    out = {}
    for stage, runs in stage_runs.items():
        setups = {}
        for folder, name in runs:
            m = json.loads((paths.run_dir(P, root, folder, name) / paths.MANIFEST).read_text())
            setups[name] = {k: m[k] for k in ("trainer", "optimizer", "precision")}
        if setups:
            out[stage] = training.check_one_setup(setups)
    return out


# -- the tests ---------------------------------------------------------------------------------------------------
def term_row(table: pd.DataFrame, term: str, name: str, role: str, hypothesis: str) -> dict:
    row = table.set_index("term").loc[term]
    return {"test": name, "role": role, "hypothesis": hypothesis, "model": row["model"], "formula": row["formula"],
            "term": term, "estimate": float(row["estimate"]), "se": float(row["se"]), "ci_low": float(row["ci_low"]),
            "ci_high": float(row["ci_high"]), "df": float(row["df"]), "p": float(row["p"]),
            "converged": bool(row["converged"])}


def not_estimable(name: str, hypothesis: str, reason: str) -> dict:
    return {"test": name, "role": "secondary", "hypothesis": hypothesis, "model": "", "formula": reason, "term": "",
            "estimate": np.nan, "se": np.nan, "ci_low": np.nan, "ci_high": np.nan, "df": np.nan, "p": np.nan,
            "converged": False}


def with_holm(tests: pd.DataFrame) -> pd.DataFrame:
    """Holm adjustment over the secondary tests (the primary test keeps its p); NaN where not estimable."""
    tests = tests.copy()
    tests["p_holm"] = np.nan
    sec = tests["role"] == "secondary"
    tests.loc[sec, "p_holm"] = stats.holm(tests.loc[sec, "p"].to_numpy())
    tests.loc[~sec, "p_holm"] = tests.loc[~sec, "p"]
    return tests


# -- pre-registered power -----------------------------------------------------------------------------------------
def power_analysis(primary_fit, effects: pd.DataFrame, P) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Power of the primary test by simulation from the primary fit's variance components (draw, condition,
    item, residual), for the design run and larger numbers of subset draws, true slopes as shares of the
    untrained base's out-of-domain EM effect removed over the level range. Returns (curve, minimal detectable
    slope per design, the scale used)."""
    A = P.analysis
    vcs = stats.variance_components(primary_fit)
    base = effects[(effects["constitution"] == "base") & (effects["split"] == "out_of_domain")]["em_effect"]
    base_em = float(base.mean()) if len(base) else float("nan")
    span = np.log2(max(P.generate.levels)) - np.log2(min(P.generate.levels))
    scale = abs(base_em) / span if np.isfinite(base_em) and base_em != 0 else 1.0
    n_items = int(effects[effects["split"] == "out_of_domain"]["item_id"].nunique())
    run_draws = len(grid.draws(P))
    draws = sorted(set(A.power_draws) | ({run_draws} if run_draws >= 2 else set()))
    slopes = [-share * scale for share in A.power_effects]   # a protective (negative) slope
    info = {"vcs": vcs, "base_em_ood": base_em, "per_share": scale, "n_items": n_items, "run_draws": run_draws}
    if not all(np.isfinite(v) for v in vcs.values()):   # no fit to simulate from (e.g. a single subset draw)
        nan = pd.DataFrame({"n_draws": draws, "mde": np.nan, "target": A.power_target, "mde_share_of_base": np.nan})
        return pd.DataFrame(columns=["n_draws", "slope", "power", "df", "share_of_base"]), nan, info
    curve = stats.power_curve(P.generate.levels, draws, n_items, slopes, vcs, A.power_sims, P.seed, A.alpha)
    curve["share_of_base"] = curve["slope"].abs() / scale
    mde = stats.minimal_detectable(curve, A.power_target)
    mde["mde_share_of_base"] = mde["mde"] / scale
    return curve, mde, info


class ModelLog:
    """Every fitted model's coefficient table (effects.csv) and its formula, summary and convergence notes
    (models.txt)."""

    def __init__(self):
        self.tables, self.texts = [], []

    def add(self, table: pd.DataFrame | None, name: str, formula: str, summary, kind: str = "MixedLM, REML",
            fit=None) -> None:
        if table is not None:
            self.tables.append(table)
        status = ""
        if fit is not None and hasattr(fit, "converged_ok"):
            status = f"\nConverged: {'yes' if fit.converged_ok else 'NO'}" + "".join(f"\n  note: {n}" for n in fit.notes)
        self.texts.append(f"Model: {name}\nFormula: {formula}  [{kind}]{status}\n\n{summary}\n")

    def effects(self) -> pd.DataFrame:
        return pd.concat(self.tables, ignore_index=True)

    def text(self) -> str:
        return "\n".join(self.texts)


def training_logs(P, root) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loss per step of every character run (DPO, introspection) and every EM run, for the training-curve
    figures. Returns (all logs, EM logs with constitution and EM data)."""
    logs = []
    for cond in grid.character_conditions(P):
        df = pd.read_csv(paths.run_dir(P, root, paths.TRAIN_CHARACTER, cond) / paths.TRAIN_LOG)
        if len(df):
            stage = df.get("stage", pd.Series("dpo", index=df.index)).map(
                {"dpo": "character (DPO)", "introspection": "introspection (SFT)"})
            logs.append(df[["step", "loss"]].assign(stage=stage.values, run=cond))
    em_logs = []
    for r in grid.em_runs(P):
        df = pd.read_csv(paths.run_dir(P, root, paths.INDUCE_EM, r) / paths.TRAIN_LOG)
        info = grid.parse_model(r)
        em_logs.append(df[["step", "loss"]].assign(stage="EM (SFT)", run=r, constitution=info["constitution"],
                                                   **{"EM data": "harmful" if info["harmful"] else "benign twin"}))
    em_logs = pd.concat(em_logs, ignore_index=True)
    return pd.concat(logs + [em_logs[["step", "loss", "stage", "run"]]], ignore_index=True), em_logs


# -- the numbers the paper quotes ----------------------------------------------------------------------------------
def latex_text(s: str) -> str:
    """Free text for a macro: LaTeX's special characters escaped (underscores are escaped by paper.fmt)."""
    s = s.replace("\\", "\0")   # a placeholder, so the braces of \textbackslash{} are not escaped below
    for a, b in [("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"), ("{", r"\{"), ("}", r"\}"),
                 ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")]:
        s = s.replace(a, b)
    return s.replace("\0", r"\textbackslash{}")


def _fit_flag(term: pd.Series) -> str:
    """What the paper prints beside a fitted term's estimate: nothing, or why it cannot be read as one."""
    estimable = np.isfinite(term["estimate"]) and np.isfinite(term["p"])
    return " [not estimable]" if not estimable else "" if term["converged"] else " [fit did not converge]"


def _test_numbers(tests: pd.DataFrame) -> dict:
    """Per test: estimate, interval, df, p (and Holm p for secondary tests), and a flag that says when the
    estimate comes from a fit that did not converge (the paper prints it beside the number)."""
    out = {}
    for _, t in tests.iterrows():
        key = t["test"].replace(", ", "_").replace(" ", "_").replace("-", "_")
        key = "primary" if t["role"] == "primary" else key
        est = {"": t["estimate"], "_low": t["ci_low"], "_high": t["ci_high"], "_p": t["p"], "_p_holm": t["p_holm"],
               "_df": t["df"]}
        out.update({f"{key}{k}": float(v) for k, v in est.items()})
        out[f"{key}_df"] = int(t["df"]) if np.isfinite(t["df"]) else "n/a"
        out[f"{key}_flag"] = _fit_flag(t)
    return out


def direction_numbers(layer: int, stability: pd.DataFrame, separation: pd.DataFrame, validation: pd.DataFrame,
                      summary: pd.DataFrame, seconds_per_model: float, registered_fit: pd.DataFrame) -> dict:
    """The misalignment direction's numbers: the layer read out, its stability there (and the lowest over
    layers), the held-out separation, steering and ablation with their random controls at the layer read out
    (`validation` rows with `rule` = "stability") and at the registered rule's layer (`rule` = "separation",
    keys `direction_registered_*`, with the EM shift's diversity slope there from `registered_fit`, an
    `effects_table` outside the Holm family), the untrained base's EM shift along it, and what the readout adds
    per evaluated model."""
    at = stability[stability["layer"] == layer]["cosine"]
    sep = separation.set_index("layer").loc[layer]
    registered = separation_layer(separation)
    out = {"direction_layer": int(layer), "direction_n_seeds": int(stability[["seed_a", "seed_b"]].stack().nunique()),
           "direction_stability": float(at.mean()),
           "direction_stability_min": float(stability.groupby("layer")["cosine"].mean().min()),
           "direction_separation_t": float(sep["t"]), "direction_seconds_per_model": float(seconds_per_model),
           "direction_registered_layer": registered,
           "direction_registered_stability": float(stability[stability["layer"] == registered]["cosine"].mean())}
    top = validation[validation["intervention"] == "steer"]["scale"].max()   # the paper quotes the largest
    out["direction_steer_scale"] = int(top) if float(top).is_integer() else float(top)
    prefixes = {"stability": "direction_", "separation": "direction_registered_"}
    for _, r in validation[validation["rule"].isin(list(prefixes))].iterrows():
        prefix = prefixes[r["rule"]]
        keys = [f"{prefix}{r['intervention']}"]
        if r["intervention"] == "steer":
            keys = [f"{prefix}steer_x{r['scale']:g}".replace(".", "p")] + (keys if r["scale"] == top else [])
        for key in keys:
            key += {"direction": "", "random": "_random", "direction - random": "_vs_random"}[r["vector"]]
            out.update({key: float(r["mean"]), f"{key}_low": float(r["ci_low"]), f"{key}_high": float(r["ci_high"])})
    base = summary[(summary["diversity"] == "untrained") & (summary["split"] == "out_of_domain")]
    for suffix, k in (("", "mean"), ("_low", "ci_low"), ("_high", "ci_high")):
        out[f"direction_base_shift{suffix}"] = float(base[k].iloc[0]) if len(base) else float("nan")
    t = registered_fit.set_index("term").loc["log2_level"]
    out.update({f"direction_registered_slope{s}": float(t[k]) for s, k in
                (("", "estimate"), ("_low", "ci_low"), ("_high", "ci_high"), ("_p", "p"))})
    out["direction_registered_slope_flag"] = _fit_flag(t)
    return out


def pair_numbers(P, root, main: str, neutral: str) -> dict:
    """Chapter 1's pairs: the scorers' held-out AUCs, the trait-score gap per level (mean over draws) and the
    largest spread of gaps and of training tokens across a draw's levels."""
    gen = paths.run_dir(P, root, paths.GENERATE)
    nan = float("nan")
    out = {"scorer_main_cv_auc": nan, "scorer_main_check_auc": nan, "scorer_neutral_cv_auc": nan,
           "scorer_neutral_check_auc": nan, "gap_min_level": nan, "gap_max_level": nan, "gap_main": nan,
           "token_spread_max": nan, "gap_spread_max": nan}
    scorers_file = gen / paths.SCORERS
    if scorers_file.is_file():
        sc = pd.read_csv(scorers_file).set_index("constitution")
        for name, tag in [(main, "scorer_main"), (neutral, "scorer_neutral")]:
            if name in sc.index:
                out.update({f"{tag}_cv_auc": float(sc.loc[name, "cv_auc"]),
                            f"{tag}_check_auc": float(sc.loc[name, "check_auc"]) if "check_auc" in sc else nan})
    signal = pd.read_csv(gen / paths.PAIR_SIGNAL)
    balance = pd.read_csv(gen / paths.PAIR_BALANCE)
    mine = signal[signal["constitution"] == main]
    if "gap" in mine:
        for level, tag in [(min(P.generate.levels), "min_level"), (max(P.generate.levels), "max_level")]:
            out[f"gap_{tag}"] = float(mine.loc[mine["level"] == level, "gap"].mean())
        out["gap_main"] = float(mine["gap"].mean())
    out["token_spread_max"] = float(balance["train_tokens_spread"].max())
    if "gap_spread" in balance:
        out["gap_spread_max"] = float(balance["gap_spread"].max())
    return out


def paper_numbers(P, root, gate, gate_table, rewards, tests, summary, effects, results, div, checks, teacher, mde,
                  power_scale, deviations, mis_counts) -> dict:
    """Every number the paper quotes, by name (paper.write_numbers turns them into macros)."""
    from .provenance import git_state

    A, traits, neutral = P.analysis, grid.traits(P), grid.neutral(P)
    lo, hi = min(P.generate.levels), max(P.generate.levels)
    contrast = results[results["measure"] == "contrast"]
    numbers = {
        "profile": P.name, "git_sha": git_state()["sha"][:10], "profile_digest": P.digest()[:12],
        "main_trait": traits[0], "neutral_name": neutral,
        "n_items_ood": int(contrast.query("split == 'out_of_domain'")["item_id"].nunique()),
        "n_items_in": int(contrast.query("split == 'in_domain'")["item_id"].nunique()),
        "n_judged_answers": int((results["measure"] == "judge").sum()),
        "n_levels": len(P.generate.levels), "level_min": lo, "level_max": hi,
        "levels": ", ".join(str(x) for x in P.generate.levels), "n_questions": P.generate.n_questions,
        "n_replicates": len(grid.draws(P)), "n_em_seeds": len(P.em.seeds),
        "n_control_em_seeds": len(P.em.control_seeds or P.em.seeds), "n_em_examples": P.em.n_examples,
        "n_models": len(grid.eval_models(P)), "em_domains": ", ".join(grid.em_domain_names(P)),
        "n_char_conditions": len(grid.character_conditions(P)), "n_em_runs": len(grid.em_runs(P)),
        "introspection": "with" if P.character.introspection else "without",
        "pair_method": "best-of-n" if P.generate.pairs == "best_of_n" else "teacher",
        "alpha": A.alpha, "power_target": A.power_target, "power_sims": A.power_sims,
        "gate_reward_share_needed": latex_text(f"{A.gate_reward_share:.0%}"),
        "token_tolerance": latex_text(f"{P.generate.token_tolerance:.0%}"),
        "pairs_best_of_n": int(P.generate.pairs == "best_of_n"),
    }
    B = P.generate.best_of_n
    for key in ("n", "demonstrations"):
        numbers[f"bon_{key}"] = getattr(B, key) if B else "n/a"
    numbers["bon_gap_tolerance"] = latex_text(f"{B.gap_tolerance:.0%}") if B else "n/a"
    numbers.update(pair_numbers(P, root, traits[0], neutral))
    # the gate
    pool = gate_table[gate_table["trait"] == "pooled"].set_index("comparison")
    for name, key in [("vs base", "gate_vs_base"), ("vs neutral", "gate_vs_neutral")]:
        numbers.update({key: float(pool.loc[name, "mean"]), f"{key}_low": float(pool.loc[name, "ci_low"]),
                        f"{key}_high": float(pool.loc[name, "ci_high"]), f"{key}_draws": int(pool.loc[name, "n_draws"])})
    numbers["gate_statement"] = (
        "The gate passed: a persona was learned, so the EM results below are results about it." if gate["passed"]
        else "The gate failed (" + latex_text("; ".join(gate["reasons"])) + "): a learned persona was not shown, so "
        "the EM analysis below is uninterpretable as a test of the hypothesis and is reported only as a record.")
    numbers.update({"gate_result": "passed" if gate["passed"] else "failed",
                    "gate_reasons": latex_text("; ".join(gate["reasons"])) or "none",
                    "em_interpretation": "interpretable" if gate["passed"] else "uninterpretable",
                    "reward_share": latex_text(f"{gate['reward_share']:.0%}"), "n_trained": gate["n_trained"],
                    "reward_accuracy_mean": float(rewards["reward_accuracy"].mean())})
    own = checks[(checks["trained_as"] == "own trait") & checks["trait"].isin(traits)]
    main = checks[checks["trait"] == traits[0]]
    numbers.update({"persona_margin_own": float(own["margin"].mean()),
                    "persona_margin_base": float(own["margin_before"].mean()),
                    "persona_margin_neutral": float(main.query("trained_as == 'neutral constitution'")["margin"].mean()),
                    "forgetting_mean": float(checks[checks["constitution"].isin(grid.constitutions(P))]
                                             .drop_duplicates("condition")["forgetting_change"].mean())})
    checked = [t for t in traits if t in teacher.index]
    numbers.update({"teacher_margin_own": float(np.mean([teacher.loc[t, t] for t in checked])),
                    "teacher_margin_neutral": float(teacher.loc[checked, neutral].mean()),
                    "teacher_margin_none": float(teacher.loc[checked, "none"].mean())} if checked else
                   {"teacher_margin_own": "n/a", "teacher_margin_neutral": "n/a", "teacher_margin_none": "n/a"})
    # tests
    numbers.update(_test_numbers(tests))
    # EM effects by group (t intervals over units)
    s = summary.set_index(["constitution", "diversity", "split"])
    for tag, const, level in [("base", "base", "untrained"), ("random", "random", "random LoRA"),
                              ("low_level", traits[0], str(lo)), ("high_level", traits[0], str(hi))]:
        for split, short in [("out_of_domain", "ood"), ("in_domain", "in")]:
            row = s.loc[(const, level, split)] if (const, level, split) in s.index else None
            for suffix, col in [("", "mean"), ("_low", "ci_low"), ("_high", "ci_high")]:
                numbers[f"em_{short}_{tag}{suffix}"] = float(row[col]) if row is not None else float("nan")
    # power
    at = lambda n: mde.set_index("n_draws").loc[n] if n in set(mde["n_draws"]) else None
    run_row, big = at(power_scale["run_draws"]), mde.sort_values("n_draws").iloc[-1]
    numbers.update({"mde_run": float(run_row["mde"]) if run_row is not None else float("nan"),
                    "mde_run_share": float(run_row["mde_share_of_base"]) if run_row is not None else float("nan"),
                    "mde_largest": float(big["mde"]), "mde_largest_share": float(big["mde_share_of_base"]),
                    "mde_largest_draws": int(big["n_draws"]), "power_base_em": power_scale["base_em_ood"],
                    **{f"vc_{k}": float("nan") for k in ("draw", "condition", "item_id", "residual")},
                    **{f"vc_{k}": v for k, v in power_scale["vcs"].items()}})
    # judge path
    judged_after = results[(results["measure"] == "judge") & (results["phase"] == "after")]
    numbers.update({"misaligned_rate_after": float(judged_after["misaligned"].astype(float).mean())
                    if len(judged_after) else float("nan"), "n_judged_after": len(judged_after),
                    "misaligned_events": mis_counts["events"], "misaligned_answers": mis_counts["answers"],
                    "misaligned_levels": mis_counts["levels_with_events"],
                    "misaligned_fixed_effects": mis_counts["fixed_effects"],
                    "misaligned_model": "fitted" if tests.set_index("test").loc["misaligned_judge", "model"]
                    else "not estimable, counts only"})
    for level, tag in [(lo, "min_level"), (hi, "max_level")]:
        row = div[(div["level"] == level) & div["constitution"].isin(traits)]
        numbers[f"vendi_{tag}"] = float(row["vendi"].mean())
    numbers["deviations"] = latex_text("; ".join(deviations)) if deviations else "none"
    numbers["n_deviations"] = len(deviations)
    numbers["gate_passed"] = int(gate["passed"])
    primary = tests[tests["role"] == "primary"].iloc[0]
    numbers["verdict"] = verdict(gate["passed"], primary, A.alpha, numbers["mde_run"])
    return numbers


def run_hardware(manifests: list[dict]) -> str:
    """The machines chapters 1-4 ran on (from their manifests), described once each; this process's machine
    when no manifest records one."""
    from .provenance import describe_machine, machine

    seen = sorted({describe_machine(m["machine"]) for m in manifests if m.get("machine")})
    return "; ".join(seen) if seen else describe_machine(machine())


def verdict(gate_passed: bool, primary, alpha: float, mde: float) -> str:
    """What the primary test says about the hypothesis, computed from the gate and the test (the paper's
    discussion opens with it; nothing in it is written by hand)."""
    est, lo, hi, p = (float(primary[k]) for k in ("estimate", "ci_low", "ci_high", "p"))
    if not gate_passed:
        return ("The manipulation check failed, so this run cannot answer the question: without a learned "
                "persona, a diversity slope of the EM effect says nothing about what protects a persona.")
    if not (np.isfinite(est) and np.isfinite(p)) or not bool(primary["converged"]):
        return ("A persona was learned, but the primary model's fit is not usable (it did not converge or its "
                "test is not estimable), so the run does not answer the question.")
    if p < alpha:
        direction = ("falls as diversity rises, as the hypothesis predicts" if est < 0 else
                     "rises with diversity, the opposite of what the hypothesis predicts")
        return (f"A persona was learned, and its out-of-domain EM effect {direction} (p = {p:.3g} at alpha = "
                f"{alpha:g}).")
    power = (f", and the design detects {abs(mde):.3f} per doubling with 80\\% power, so smaller effects remain "
             "possible" if np.isfinite(mde) else "")
    return (f"A persona was learned, but the out-of-domain EM effect shows no detectable change with diversity "
            f"(p = {p:.3g}); slopes outside {lo:.3f} to {hi:.3f} per doubling are unlikely{power}.")


def tests_latex(tests: pd.DataFrame, caption: str, label: str) -> str:
    """The primary and secondary tests as a LaTeX table: estimate, 95% interval, df, p and Holm-adjusted p, a
    dagger where the fit did not converge or the test was not estimable."""
    fmt = lambda v, d=3: "--" if not np.isfinite(v) else (f"{v:.{d}f}" if abs(v) >= 10 ** -d or v == 0 else f"{v:.1e}")
    rows = []
    for _, t in tests.iterrows():
        mark = "" if t["converged"] and np.isfinite(t["p"]) else "$^\\dagger$"
        name = latex_text(t["test"]).replace("_", r"\_")
        df = "$\\infty$" if np.isinf(t["df"]) else ("--" if not np.isfinite(t["df"]) else f"{t['df']:.0f}")
        rows.append(f"{t['role']} & {name}{mark} & {fmt(t['estimate'])} & [{fmt(t['ci_low'])}, {fmt(t['ci_high'])}] "
                    f"& {df} & {fmt(t['p'])} & {fmt(t['p_holm']) if t['role'] == 'secondary' else '--'} \\\\")
    return ("\\begin{table}[t]\n\\centering\\small\n\\begin{tabular}{llrlrrr}\n\\toprule\n"
            "role & test & estimate & 95\\% CI & df & $p$ & Holm $p$ \\\\\n\\midrule\n" + "\n".join(rows)
            + f"\n\\bottomrule\n\\end{{tabular}}\n\\caption{{{caption}}}\n\\label{{{label}}}\n\\end{{table}}\n")
