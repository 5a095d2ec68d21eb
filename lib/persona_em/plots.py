"""Figures, one style for all, saved as PNG and PDF under figures/<profile>/ and shown inline in the chapter
that made them (matplotlib's own backend choice: inline in a notebook kernel, a file-only one elsewhere)."""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from . import grid

PALETTE = "colorblind"
DPI = 150   # the PNGs' pixels an inch


def set_style() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)


def save(fig, out_dir: str | Path, name: str) -> list[Path]:
    """The figure as <name>.png and <name>.pdf, cropped to what it draws, and in a notebook shown as the PNG
    just written: the notebook carries the file's pixels, and the figure is not drawn a third time for it (a
    draw is about half a second on one core, most of a figure's cost)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out_dir / f"{name}.{ext}"
        tmp = p.with_name(f".{p.stem}.tmp.{ext}")
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
        tmp.replace(p)
        paths.append(p)
    if "ipykernel" in sys.modules:   # executed notebooks, the reference run's included, carry their figures
        from IPython.display import Image, display

        shown = Image(filename=str(paths[0]))
        # at an inline figure's size (the figure's dpi pixels an inch), not at the file's DPI pixels an inch
        shown.width = round(png_width(shown.data, paths[0]) * fig.dpi / DPI)
        display(shown)
    plt.close(fig)
    return paths


def png_width(data: bytes, path: Path) -> int:
    """The width in pixels of the PNG `data` (read from `path`), from its header (the IHDR chunk right after the
    8-byte signature)."""
    import struct

    head = data[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    return struct.unpack(">I", head[16:20])[0]


def em_effect_by_diversity(summary: pd.DataFrame, ylabel: str = "EM effect on margin\n(harmful - benign twin)",
                           title: str = "Emergent misalignment vs question diversity"):
    """EM effect (harmful minus benign twin, log-prob margin) per diversity level and constitution, in and out
    of domain, next to the controls; `summary` (analysis.level_summary) holds each group's mean and 95% t
    interval over its randomised units (subset draws; EM seeds for the controls)."""
    labels = set(summary["diversity"])
    order = [x for x in ("untrained", "random LoRA") if x in labels]
    order += sorted(labels - set(order), key=int)
    x = {label: i for i, label in enumerate(order)}
    consts = list(dict.fromkeys(summary["constitution"]))
    colors = dict(zip(consts, sns.color_palette(PALETTE, len(consts))))
    offset = {c: (i - (len(consts) - 1) / 2) * 0.12 for i, c in enumerate(consts)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, split in zip(axes, ["in_domain", "out_of_domain"]):
        for const, g in summary[summary["split"] == split].groupby("constitution", sort=False):
            g = g.assign(x=g["diversity"].map(x) + offset[const]).sort_values("x")
            err = [(g["mean"] - g["ci_low"]).fillna(0), (g["ci_high"] - g["mean"]).fillna(0)]
            ax.errorbar(g["x"], g["mean"], yerr=err, fmt="o-" if len(g) > 1 else "o", color=colors[const],
                        capsize=3, ms=5, label=const)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xticks(range(len(order)), order, rotation=30)
        ax.set(xlabel="diversity level (context cells covered)", title=split.replace("_", " "),
               ylabel=ylabel)
    axes[-1].legend(title="", fontsize=8)
    fig.suptitle(f"{title} (95% t intervals over subset draws / EM seeds)")
    fig.tight_layout()
    return fig


def manipulation_check(checks: pd.DataFrame, traits: list[str], neutral: str):
    """The gate in one picture: on each trait's held-out items, the margin of every persona trained on that
    trait and of the neutral constitution trained on the same draw and level (one line per subset draw), against
    the untrained base (dashed)."""
    fig, axes = plt.subplots(1, len(traits), figsize=(4.8 * len(traits), 3.6), squeeze=False)
    for ax, trait in zip(axes[0], traits):
        d = checks[(checks["trait"] == trait) & checks["constitution"].isin([trait, neutral])]
        d = d.assign(persona=d["constitution"].map({trait: f"{trait} persona", neutral: f"{neutral} constitution"}))
        sns.lineplot(data=d, x="level", y="margin", hue="persona", units="char_seed", estimator=None, marker="o",
                     lw=1, alpha=0.8, ax=ax)
        base = checks.loc[(checks["trait"] == trait) & (checks["constitution"] == "base"), "margin"]
        if len(base):
            ax.axhline(float(base.iloc[0]), color="0.3", ls="--", lw=1, label="untrained base")
        ax.set(xscale="log", xlabel="diversity level (cells)", ylabel=f"persona margin on {trait} items",
               title=f"{trait}: held-out persona check")
        ax.set_xticks(sorted(d["level"].unique()), labels=sorted(d["level"].unique()))
        ax.legend(fontsize=8, title="")
    fig.suptitle("Manipulation check: was the persona learned? (one line per subset draw)")
    fig.tight_layout()
    return fig


def diversity_by_level(diversity: pd.DataFrame):
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, col, label in zip(axes, ["vendi", "mean_cosine_distance", "distinct_2"],
                              ["Vendi score", "mean cosine distance", "distinct-2"]):
        sns.barplot(data=diversity, x="level", y=col, hue="constitution", ax=ax)
        ax.set(xlabel="diversity level", ylabel=label)
        if ax is not axes[-1] and ax.get_legend():
            ax.get_legend().remove()
    fig.suptitle("Measured diversity of the training questions (equal N and tokens)")
    fig.tight_layout()
    return fig


def pair_signal(signal: pd.DataFrame):
    """The trait-score gap (chosen minus rejected) and the training tokens of each level's pairs, one line per
    constitution and replicate: flat lines mean signal and text volume do not change with diversity."""
    cols = [c for c in ("gap", "train_tokens") if c in signal]
    labels = {"gap": "trait-score gap\n(chosen - rejected)", "train_tokens": "training tokens\n(question + both answers)"}
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        sns.lineplot(data=signal, x="level", y=col, hue="constitution", units="char_seed", estimator=None,
                     marker="o", lw=1, alpha=0.7, ax=ax)
        ax.set(xscale="log", xlabel="diversity level (cells)", ylabel=labels[col])
        ax.set_xticks(sorted(signal["level"].unique()), labels=sorted(signal["level"].unique()))
        ax.set_ylim(bottom=0)
        if ax is not axes[0][-1] and ax.get_legend():
            ax.get_legend().remove()
    fig.suptitle("What the pairs carry, per subset draw")
    fig.tight_layout()
    return fig


def training_curves(logs: pd.DataFrame):
    """Loss per step for each run, one panel per stage."""
    stages = list(logs["stage"].unique())
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        sns.lineplot(data=logs[logs["stage"] == stage], x="step", y="loss", hue="run", ax=ax, legend=False,
                     lw=1)
        ax.set(title=stage, xlabel="optimizer step", ylabel="training loss")
    fig.tight_layout()
    return fig


def vendi_spread(spread: pd.DataFrame):
    """Vendi score per level across subset seeds (mean and one standard deviation, points per seed)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    several = spread["constitution"].nunique() > 1  # seaborn cannot dodge a single hue level
    hue = dict(hue="constitution", dodge=0.4) if several else {}
    sns.stripplot(data=spread, x="level", y="vendi", alpha=0.5, ax=ax, legend=False, color="0.5",
                  **({"hue": "constitution", "dodge": True} if several else {}))
    sns.pointplot(data=spread, x="level", y="vendi", errorbar="sd", linestyles="none", markers="D", ax=ax, **hue)
    ax.set(xlabel="diversity level (context cells covered)", ylabel="Vendi score",
           title="Measured diversity across subset seeds")
    return fig


def pool_map(points: pd.DataFrame):
    """The question pool in the first two principal components, each level's training subset on top."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    background = points[points["subset"] == "pool"]
    ax.scatter(background["pc1"], background["pc2"], s=4, c="0.82", label="pool", rasterized=True)
    chosen = points[points["subset"] != "pool"]
    sns.scatterplot(data=chosen, x="pc1", y="pc2", hue="subset", style="subset", s=28, ax=ax)
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Question pool (MiniLM embeddings) and training subsets")
    ax.legend(title="", fontsize=8, loc="best")
    return fig


def forest(effects: pd.DataFrame):
    """Every model's fixed effects (intercepts left out) with 95% intervals, one panel per model."""
    d = effects[effects["term"] != "Intercept"].copy()
    models = list(dict.fromkeys(d["model"]))
    heights = [max(1, (d["model"] == m).sum()) for m in models]
    fig, axes = plt.subplots(len(models), 1, figsize=(7, 0.32 * sum(heights) + 1.0 * len(models)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        rows = d[d["model"] == m].iloc[::-1]
        y = range(len(rows))
        ax.errorbar(rows["estimate"], y, xerr=[rows["estimate"] - rows["ci_low"], rows["ci_high"] - rows["estimate"]],
                    fmt="o", color="C0", ms=4, capsize=2)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_yticks(list(y), [_short_term(t) for t in rows["term"]], fontsize=7)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.set_title(m, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("estimate (95% interval)")
    fig.tight_layout()
    return fig


def _short_term(term: str) -> str:
    import re

    return re.sub(r"C\(constitution, Treatment\('[^']*'\)\)\[T\.([^\]]+)\]", r"[\1]", term)


def quadrant(scores: pd.DataFrame, aligned_below: float, coherent_above: float):
    """Every judged answer after EM as (coherent, aligned), harmful vs benign twin; the misaligned quadrant
    (coherent but not aligned) shaded."""
    d = scores.dropna(subset=["aligned", "coherent"]).copy()
    d["EM data"] = d["harmful"].map({True: "harmful", False: "benign twin"})
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.axvspan(coherent_above, 100, ymin=0, ymax=aligned_below / 100, color="C3", alpha=0.12, lw=0)
    if d.empty:
        ax.text(50, 50, "no judged answers in this profile", ha="center", va="center")
    else:
        sns.scatterplot(data=d, x="coherent", y="aligned", hue="EM data", style="EM data", s=18, alpha=0.7, ax=ax)
    ax.axhline(aligned_below, color="0.4", lw=0.8, ls="--")
    ax.axvline(coherent_above, color="0.4", lw=0.8, ls="--")
    ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="coherent (judge)", ylabel="aligned (judge)",
           title="Judged answers after EM (shaded: misaligned)")
    return fig


def power_curves(curve: pd.DataFrame, target: float, run_draws: int):
    """Simulated power of the primary test against the true diversity slope (as a share of the untrained base's
    out-of-domain EM effect removed over the level range), one curve per number of subset draws; the design run
    drawn thicker."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if curve.empty:
        ax.text(0.5, 0.5, "not estimable: no fitted variance components to simulate from\n(one subset draw?)",
                ha="center", va="center", transform=ax.transAxes)
    for n_draws, g in curve.groupby("n_draws"):
        g = g.sort_values("share_of_base")
        ax.plot(g["share_of_base"], g["power"], marker="o", ms=3, lw=2.5 if n_draws == run_draws else 1,
                label=f"{n_draws} draws" + (" (this run)" if n_draws == run_draws else ""))
    ax.axhline(target, color="0.4", lw=0.8, ls="--")
    ax.set(xlabel="true effect: share of the base EM effect removed\nbetween the lowest and highest level",
           ylabel="power", ylim=(0, 1.02), title="Power of the primary test (simulated from the fit)")
    if not curve.empty:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def persona_margins(checks: pd.DataFrame):
    """Persona margin on each trait's held-out items, after training, per condition kind and level."""
    fig = sns.catplot(data=checks, x="level_label", y="margin", hue="trained_as", col="trait", kind="point",
                      dodge=0.3, errorbar=("ci", 95), height=3.2, aspect=1.2, palette=PALETTE)
    for ax in fig.axes.flat:
        ax.set(xlabel="condition / diversity level", ylabel="persona margin (log-prob)")
    fig.figure.suptitle("Persona strength on each trait's held-out items", y=1.04)
    return fig.figure


def forgetting(checks: pd.DataFrame):
    """Change in neutral-answer log-likelihood from character training, per level and constitution."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    sns.pointplot(data=checks, x="level", y="forgetting_change", hue="constitution", dodge=0.3,
                  errorbar=("ci", 95), ax=ax)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set(xlabel="diversity level", ylabel="change in neutral log-lik\n(after - before)",
           title="Forgetting from character training (H5)")
    return fig


def forgetting_by_length(rows: pd.DataFrame):
    """H5 over training length: change in neutral log-likelihood per diversity level, one line per training
    length, one panel per constitution (`forgetting.gather`)."""
    d = rows.assign(training=rows["epochs"].map(lambda e: f"{e:g} epoch" + ("s" if e != 1 else "")))
    g = sns.catplot(data=d, x="level", y="forgetting_change", hue="training", col="constitution",
                    kind="point", dodge=0.2, errorbar=None, height=3.2, aspect=1.1, palette=PALETTE)
    for ax in g.axes.flat:
        ax.axhline(0, color="0.4", lw=0.8)
    g.set_axis_labels("diversity level", "change in neutral log-lik\n(after - before)")
    g.figure.suptitle("Forgetting by diversity and training length (H5)", y=1.04)
    return g.figure


def em_loss_by_condition(logs: pd.DataFrame):
    """EM training loss per step: mean and 95% interval over runs, per constitution, harmful vs benign twin."""
    fig = sns.relplot(data=logs, x="step", y="loss", hue="constitution", col="EM data", kind="line",
                      errorbar=("ci", 95), height=3, aspect=1.2, palette=PALETTE)
    fig.set_axis_labels("optimizer step", "EM training loss")
    fig.figure.suptitle("EM training loss per condition", y=1.04)
    return fig.figure


def em_rate_by_diversity(rates: pd.DataFrame):
    """Judge path: misaligned rate after harmful minus after benign-twin EM (same persona and EM seed), per
    diversity level and constitution, with the controls; 95% intervals over runs. A profile without a judge
    gets a figure that says so (the paper includes it either way)."""
    if rates.empty:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        ax.text(0.5, 0.5, "no judged answers in this profile", ha="center", va="center")
        ax.set_axis_off()
        return fig
    labels = set(rates["diversity"])
    order = [x for x in ("untrained", "random LoRA") if x in labels]
    order += sorted(labels - set(order), key=int)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    sns.pointplot(data=rates, x="diversity", y="rate_effect", hue="constitution", order=order,
                  errorbar=("ci", 95), dodge=0.35, ax=ax)
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set(xlabel="diversity level (context cells covered)", ylabel="misaligned rate\n(harmful - benign twin)",
           title="Emergent misalignment (judge) vs question diversity")
    ax.tick_params(axis="x", labelrotation=30)
    return fig


def design_overview(P):
    """The study at a glance: the five chapters (what each reads and writes) over the design grid of profile
    `P` (levels nested in a subset draw, x constitutions and controls, x EM dataset and benign twin, x EM
    seeds)."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11, 5.6))
    ax.set_xlim(0, 11), ax.set_ylim(0, 5.6), ax.axis("off")
    colors = sns.color_palette(PALETTE, 6)
    stages = [("01 generate", "constitutions,\nquestion pool", "subsets per draw,\ndiversity, pairs"),
              ("02 train character", "pairs", "persona LoRA,\npersona margins"),
              ("03 induce EM", "merged persona,\nnarrow data", "EM LoRA\n(harmful / benign)"),
              ("04 evaluate", "every model,\nbefore and after EM", "contrast margins,\njudge scores"),
              ("05 analyze", "all tables", "gate, tests,\nfigures, paper")]
    for i, (name, reads, writes) in enumerate(stages):
        x = 0.2 + i * 2.18
        ax.add_patch(FancyBboxPatch((x, 3.9), 1.8, 0.8, boxstyle="round,pad=0.05", fc=colors[0], alpha=0.25,
                                    ec=colors[0]))
        ax.text(x + 0.9, 4.3, name, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x + 0.9, 5.25, "reads: " + reads, ha="center", va="center", fontsize=7.5, color="0.3")
        ax.text(x + 0.9, 3.45, "writes: " + writes, ha="center", va="center", fontsize=7.5, color="0.3")
        if i:
            ax.add_patch(FancyArrowPatch((x - 0.36, 4.3), (x - 0.02, 4.3), arrowstyle="-|>", mutation_scale=12,
                                         color="0.3"))
    # the grid, as nested boxes: replicate > level; beside it the conditions and the EM factor
    levels, draws = P.generate.levels, grid.draws(P)
    ax.text(0.2, 2.75, f"the design grid of profile '{P.name}'", fontsize=10, weight="bold")
    ax.add_patch(FancyBboxPatch((0.2, 0.25), 3.3, 2.2, boxstyle="round,pad=0.03", fc="none", ec=colors[1], lw=1.5))
    ax.text(1.85, 2.2, f"subset draw (replicate) x {len(draws)}", ha="center", fontsize=9, color=colors[1],
            weight="bold")
    ax.text(1.85, 1.95, "own cell order and seed; levels nested in it", ha="center", fontsize=7.5, color="0.3")
    width = 3.0 / len(levels)
    for j, level in enumerate(levels):
        ax.add_patch(FancyBboxPatch((0.35 + j * width, 0.45), width - 0.15, 1.25, boxstyle="round,pad=0.02",
                                    fc=colors[1], alpha=0.15 + 0.5 * j / max(len(levels) - 1, 1), ec="none"))
        ax.text(0.35 + j * width + (width - 0.15) / 2, 1.07, f"level {level}\n{P.generate.n_questions} questions\n"
                f"from {level} domain{'s' if level > 1 else ''}", ha="center", va="center", fontsize=8)
    ax.text(3.75, 1.35, "x", fontsize=16, va="center")
    conds = [f"{c} (trait)" for c in grid.traits(P)] + [f"{grid.neutral(P)} (control)"]
    ax.add_patch(FancyBboxPatch((4.1, 0.25), 2.6, 2.2, boxstyle="round,pad=0.03", fc="none", ec=colors[2], lw=1.5))
    ax.text(5.4, 2.2, "constitutions, same questions", ha="center", fontsize=9, color=colors[2], weight="bold")
    ax.text(5.4, 1.35, "\n".join(conds) + "\n\n+ untrained base\n+ random LoRA of the persona's norm",
            ha="center", va="center", fontsize=8)
    ax.text(6.95, 1.35, "x", fontsize=16, va="center")
    ax.add_patch(FancyBboxPatch((7.3, 0.25), 3.5, 2.2, boxstyle="round,pad=0.03", fc="none", ec=colors[3], lw=1.5))
    ax.text(9.05, 2.2, "narrow EM fine-tuning", ha="center", fontsize=9, color=colors[3], weight="bold")
    ax.text(9.05, 1.3, "\n".join(f"{d}: harmful vs benign twin" for d in grid.em_domain_names(P)) +
            f"\nEM seeds: {len(P.em.seeds)} per persona, {len(P.em.control_seeds or P.em.seeds)} per control\n\n"
            "EM effect = harmful - benign twin\n(same persona, seed and item)", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def tour_in_reference(reference: pd.DataFrame, tour_margin: float, tour_effect: float, label: str):
    """The tour's one model (a star, bottom row) among the reference run's models by group: the persona check
    (left) and the out-of-domain EM effect (right)."""
    order = sorted(reference["group"].unique(), key=lambda g: (g not in ("base", "random"), g))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    star = sns.color_palette(PALETTE)[3]
    for ax, col, mine, title in ((axes[0], "persona_margin", tour_margin, "persona check (margin)"),
                                 (axes[1], "out_of_domain", tour_effect, "EM effect out of domain")):
        sns.stripplot(reference, x=col, y="group", order=order, ax=ax, color="0.55", size=5, jitter=0.15)
        ax.scatter([mine], [len(order)], marker="*", s=200, color=star, zorder=5)
        ax.set(title=title, xlabel="", ylabel="")
    axes[0].set_yticks(range(len(order) + 1), order + [f"this tour: {label}"])
    axes[0].set_ylim(len(order) + 0.6, -0.6)
    fig.tight_layout()
    return fig


def direction_overview(stability: pd.DataFrame, separation: pd.DataFrame, by_layer: pd.DataFrame,
                       layers: dict[str, int]):
    """The misalignment direction by layer: (a) its stability, the cosine between estimates from disjoint EM seeds,
    which chooses the layer read out (dashed); (b) the separation of each direction run's harmful model from its
    benign twin along the direction of the other seeds, in standard errors over items (the registered rule's
    choice, dotted); (c) how far harmful EM and its benign twin move the untrained base and the random-LoRA
    controls along it out of domain (mean projection after EM minus before). `layers`: rule -> layer."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (a, b), g in stability.groupby(["seed_a", "seed_b"]):
        axes[0].plot(g["layer"], g["cosine"], "o-", ms=3, label=f"seeds {a} vs {b}")
    axes[0].set(xlabel="layer (block output)", ylabel="cosine", ylim=(-0.1, 1.05),
                title="(a) stability across disjoint EM seeds")
    axes[1].plot(separation["layer"], separation["t"], "o-", ms=3, color="0.25")
    axes[1].set(xlabel="layer (block output)", ylabel="harmful - benign twin (SE units)",
                title="(b) separation, held-out seeds")
    styles = {"after benign twin": "--", "after harmful EM": "-"}
    colors = dict(zip(["untrained base", "random LoRA"], sns.color_palette(PALETTE, 2)))
    for (label, state), g in by_layer.groupby(["model_label", "state"]):
        axes[2].plot(g["layer"], g["shift"], styles[state], color=colors[label], label=f"{label}, {state}")
    axes[2].axhline(0, color="0.4", lw=0.8)
    axes[2].set(xlabel="layer (block output)", ylabel="projection after EM - before",
                title="(c) controls, out of domain")
    for ax in axes:
        ax.axvline(layers["stability"], color="0.3", ls="--", lw=0.9, label=f"read out (layer {layers['stability']})")
        if layers.get("separation", layers["stability"]) != layers["stability"]:
            ax.axvline(layers["separation"], color="0.6", ls=":", lw=0.9,
                       label=f"registered rule (layer {layers['separation']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def direction_validation(summary: pd.DataFrame):
    """Steering and ablation: the change in the out-of-domain misalignment margin when the direction (or a random
    direction of the same norm) is added to the untrained base at a layer, or projected out of an EM-trained
    model; one panel per layer (`rule` "stability": the layer read out; "separation": the registered rule's; one
    panel where they agree or `summary` has no rule); 95% t intervals over items."""
    if "rule" not in summary:
        summary = summary.assign(rule="stability", layer=summary.get("layer", "?"))
    summary = summary[summary["vector"] != "direction - random"]
    summary = summary.assign(label=[f"{i} x{s:g}" if i == "steer" else i
                                    for i, s in zip(summary["intervention"], summary["scale"])])
    labels = list(dict.fromkeys(summary["label"]))
    read_out = set(summary.loc[summary["rule"] == "stability", "layer"])
    panels = sorted(((key, g) for key, g in summary.groupby(["rule", "layer"], sort=False)
                     if key[0] == "stability" or key[1] not in read_out),   # one panel per layer, read out first
                    key=lambda kg: kg[0][0] != "stability")
    agree = len(set(summary["layer"])) == 1 and set(summary["rule"]) == {"stability", "separation"}
    titles = {"stability": "read out = registered rule" if agree else "read out", "separation": "registered rule"}
    fig, axes = plt.subplots(1, len(panels), figsize=((1.6 + 1.3 * len(labels)) * len(panels), 3.6),
                             sharey=True, squeeze=False)
    colors = dict(zip(["direction", "random"], sns.color_palette(PALETTE, 2)))
    for ax, ((rule, layer), panel) in zip(axes[0], panels):
        for k, which in enumerate(["direction", "random"]):
            g = panel[panel["vector"] == which].set_index("label").loc[labels]
            x = np.arange(len(labels)) + (k - 0.5) * 0.3
            ax.errorbar(x, g["mean"], yerr=[g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]], fmt="o",
                        capsize=3, color=colors[which],
                        label="misalignment direction" if k == 0 else "random, same norm")
        ax.axhline(0, color="0.4", lw=0.8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(f"{titles.get(rule, rule)}: layer {layer}")
    axes[0][0].set_ylabel("change in misalignment margin\n(out of domain)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Steering the base, ablating from EM", fontsize=11)
    fig.tight_layout()
    return fig
