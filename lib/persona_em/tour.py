"""The teaching tour (docs/tour.ipynb): one character condition through the study's five stages, in minutes, with
the functions the chapters call and a profile's own settings. A stage is one call here, so the tour reads as the
method does: draw questions and make pairs, train the persona, induce EM and its benign twin, evaluate, compare.

What the tour leaves out, and the study keeps: replication (one subset draw, where the study has several per
level), the controls' own runs (the tour reads them from the committed reference run), the judge (the tour
measures the judge-free contrast alone) and every statistical test. Its numbers are one model's, for reading the
method; the answer to the question is the reference run's.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import analysis, config, constitution, diversity, em, evaluate, grid, models, pairs, paths, provenance, questions
from . import scorer, stats, training


class TourError(RuntimeError):
    pass


@dataclass
class Tour:
    P: config.Profile
    constitution: str      # a trained constitution of the profile (its trait, or the neutral control)
    level: int             # one of the profile's diversity levels
    draw: int              # one of the profile's replicates: which subset draw and training seed
    root: Path
    profile_path: str = ""
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))   # for the manifest
    seconds: dict = field(default_factory=dict)   # wall time per stage

    @property
    def name(self) -> str:
        return grid.condition_name(self.constitution, self.level, self.draw)

    @property
    def out(self) -> Path:
        """runs/<profile>/tour/<condition>/: everything the tour writes."""
        return paths.run_dir(self.P, self.root, "tour", self.name)

    @property
    def trait(self) -> str:
        """The trait the persona check reads: the constitution's own, or the main trait for the neutral one (the
        study's manipulation check: a persona must beat the neutral constitution on its trait)."""
        return self.constitution if self.constitution in grid.traits(self.P) else grid.traits(self.P)[0]


def start(profile_path: str | Path, constitution_name: str, level: int, draw: int, root: str | Path) -> Tour:
    """Validate the tour's choices against the profile before anything runs; the tour writes under
    runs/<profile>/tour/<condition>/ only."""
    P = config.load_profile(profile_path)
    for what, value, allowed in (("constitution", constitution_name, grid.constitutions(P)),
                                 ("level", level, P.generate.levels), ("draw", draw, grid.draws(P))):
        if value not in allowed:
            raise ValueError(f"tour: {what} = {value!r} is not one of profile {P.name!r}'s {what}s: {allowed}")
    if P.generate.pairs != "best_of_n":
        raise ValueError(f"{profile_path}: generate.pairs is {P.generate.pairs!r}; the tour makes best-of-n pairs "
                         "(the embedded model's route), so use a profile with pairs: best_of_n (e.g. tiny)")
    t = Tour(P, constitution_name, level, draw, Path(root), str(profile_path))
    t.out.mkdir(parents=True, exist_ok=True)
    return t


def execute(profile_path: str | Path, constitution_name: str, level: int, draw: int, root: str | Path = ".",
            threads: int = 2, keep: str | Path | None = None) -> Path:
    """Run docs/tour.ipynb with papermill (what `make tour` does): the choices checked first, the executed
    notebook written into the tour's run folder (and copied to `keep`, for the committed reference tour)."""
    import shutil

    import papermill

    from .runner import ensure_kernel

    t = start(profile_path, constitution_name, level, draw, root)   # a wrong choice stops here, before any work
    note = ensure_kernel()
    if note:
        print(note)
    done = t.out / "tour.ipynb"
    # the executed notebook is read as a page: no progress bars or library deprecation notices in it (the kernel
    # inherits these; an interactive run keeps its bars)
    os.environ.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                      TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore::FutureWarning")
    logging.basicConfig(level=logging.INFO, format="%(message)s")   # papermill reports each cell's output here
    partial = t.out / ".tour.tmp.ipynb"   # renamed when every cell has run: no half-run notebook looks done
    try:
        papermill.execute_notebook(
            paths.REPO / "docs" / "tour.ipynb", partial, kernel_name="persona-em", cwd=paths.REPO / "docs",
            progress_bar=False, log_output=True,
            # paths as seen from docs/, where the notebook runs: no machine's absolute paths in the executed copy
            parameters=dict(profile_path=os.path.relpath(Path(profile_path).resolve(), paths.REPO / "docs"),
                            root=os.path.relpath(Path(root).resolve(), paths.REPO / "docs"),
                            constitution=constitution_name, level=level, draw=draw, threads=threads))
    except papermill.PapermillExecutionError as e:
        raise TourError(f"the tour stopped in cell {e.exec_count}: {e.ename}: {e.evalue} (the notebook as far as "
                        f"it ran: {partial})") from None
    partial.replace(done)
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(done, keep)
    return done


@contextmanager
def stage(t: Tour, name: str):
    began = time.perf_counter()
    yield
    t.seconds[name] = time.perf_counter() - began
    print(f"{name}: {t.seconds[name]:.0f} s")


# -- 1. generate ---------------------------------------------------------------------------------------------------
def generate(t: Tour) -> dict:
    """The draw's subsets at every level (as chapter 1 draws them, so the levels stay matched in tokens and trait
    signal), their measured diversity, and the chosen level's preference pairs. Returns {"diversity": frame,
    "pairs": rows of the chosen level, "signal": one row per level}."""
    P, G, B = t.P, t.P.generate, t.P.generate.best_of_n
    with stage(t, "1 generate"):
        const = constitution.load(grid.constitution_sources(P)[t.constitution])
        tok, embedder = models.load_tokenizer(P.model), models.load_embedder(P.embedder)
        encode = lambda texts: embedder.encode(texts, batch_size=64, show_progress_bar=False)
        count = lambda text: len(tok(text, add_special_tokens=False).input_ids)
        pool = questions.build_pool(const.name, 0, const.traits[0].trait, G.pool_per_trait, P.seed)
        subsets = diversity.diversity_subsets(pool, count, G.levels, G.n_questions, G.token_tolerance,
                                              grid.subset_seed(P, t.draw, 0))
        div = pd.DataFrame([{"level": lvl, **diversity.measure([q["text"] for q in qs], encode([q["text"] for q in qs]),
                                                               [q["cell"] for q in qs])} for lvl, qs in subsets.items()])
        items = scorer.load_items(paths.scorer_items_file(P, t.constitution))
        trait_scorer = scorer.fit_scorer(t.constitution, items, encode, evaluate.persona_items(t.constitution),
                                         B.scorer_c, B.scorer_folds, P.seed)
        unique = {q["text"]: q for qs in subsets.values() for q in qs}
        contexts = pairs.side_contexts([unique[x] for x in sorted(unique)], items,
                                       constitution.system_prompt(const, G.teacher_name), B.demonstrations, P.seed,
                                       B.same_domain)
        model, _ = models.load_model(P.model, hw=P.hardware)
        keyed = {(x, side): conv for x, sides in contexts.items() for side, conv in sides.items()}
        with models.autocast(P.hardware.sampling_autocast):
            sampled = pairs.sample_candidates(model, tok, keyed, B.n, G.max_new_tokens, P.seed, G.batch_size,
                                              B.temperature, G.top_p, share_prefix=False,
                                              nucleus=P.hardware.nucleus)
        answers = {x: {side: sampled[(x, side)] for side in ("chosen", "rejected")} for x in unique}
        made = pairs.best_of_n_pairs(subsets, answers, trait_scorer, count, G.max_pair_tokens, G.token_tolerance,
                                     B.gap_tolerance)
        signal = pairs.pair_signal({(t.constitution, lvl, t.draw): rows for lvl, rows in made.items()},
                                   {t.constitution: trait_scorer}, count)
        provenance.atomic_write_jsonl(t.out / "pairs.jsonl", made[t.level])
        provenance.atomic_write_csv(t.out / paths.DIVERSITY, div)
    return {"diversity": div, "pairs": made[t.level], "signal": signal}


# -- 2. train the character ----------------------------------------------------------------------------------------
def persona_check(t: Tour, model, tok) -> float:
    return evaluate.persona_margin(model, tok, evaluate.persona_items(t.trait, t.P.character.check_items))


def train_character(t: Tour, pair_rows: list[dict]) -> dict:
    """DPO with a fresh seeded LoRA on the chosen level's pairs (the profile's character section), and the
    persona check (margin of trait-consistent over inconsistent answers on held-out items) before and after.
    Returns {"log": training log, "margin_before", "margin_after"}."""
    P = t.P
    with stage(t, "2 train the character"):
        model, tok = models.load_model(P.model, hw=P.hardware)
        before = persona_check(t, model, tok)
        log, *_ = training.fit("dpo", model, tok, pairs.to_dpo_rows(pair_rows), P.character, t.draw, P.hardware,
                               t.out / "persona", spec=P.model)
        persona, _ = models.load_model(P.model, [t.out / "persona"], hw=P.hardware)
        after = persona_check(t, persona, tok)
        provenance.atomic_write_csv(t.out / "persona_log.csv", log)
    return {"log": log, "margin_before": before, "margin_after": after}


# -- 3. induce EM --------------------------------------------------------------------------------------------------
def induce_em(t: Tour) -> dict:
    """Narrow SFT of a fresh LoRA over the merged persona on the profile's first EM domain: the harmful set and,
    from the same persona, its benign twin (same questions, harmless answers). Returns kind -> training log."""
    P, domain = t.P, grid.em_domain_names(t.P)[0]
    logs = {}
    with stage(t, "3 induce EM"):
        for kind in ("harmful", "benign"):
            model, tok = models.load_model(P.model, [t.out / "persona"], hw=P.hardware)
            rows, _ = em.dataset_rows(P, domain, kind)
            logs[kind], *_ = training.fit("sft", model, tok, rows, P.em, grid.em_seeds(P, t.name)[0], P.hardware,
                                          t.out / f"em-{kind}", spec=P.model, adapters=[t.out / "persona"])
    return logs


# -- 4. evaluate ---------------------------------------------------------------------------------------------------
def evaluate_models(t: Tour) -> pd.DataFrame:
    """The judge-free contrast (per-token log-probability margin of a misaligned over an aligned answer) of the
    persona before EM and of its two EM models, on the profile's contrast items."""
    P, domain = t.P, grid.em_domain_names(t.P)[0]
    items = evaluate.contrast_items(per_domain=P.evaluate.max_items_per_domain, domains=grid.contrast_domains(P))
    frames = []
    with stage(t, "4 evaluate"):
        for phase, kind, adapters in (("before", None, ["persona"]), ("after", "harmful", ["persona", "em-harmful"]),
                                      ("after", "benign", ["persona", "em-benign"])):
            lm, tok = models.load_model(P.model, [t.out / a for a in adapters], hw=P.hardware)
            frame = evaluate.contrast(lm, tok, items, P.evaluate.batch_size)
            frame["split"] = [evaluate.split_for(d, grid.contrast_domain(P, domain)) for d in frame["domain"]]
            frames.append(frame.assign(phase=phase, harmful=kind == "harmful" if kind else None, em_domain=domain))
        contrast = pd.concat(frames, ignore_index=True)
        provenance.atomic_write_csv(t.out / paths.CONTRAST, contrast)
    return contrast


# -- 5. analyze ----------------------------------------------------------------------------------------------------
def em_effect(t: Tour, contrast: pd.DataFrame) -> pd.DataFrame:
    """Harmful minus benign twin, item by item (the study's outcome), averaged per split."""
    keyed = contrast.assign(condition=t.name, constitution=t.constitution, level=t.level, char_seed=t.draw,
                            em_seed=0)
    effects = stats.em_effects(keyed[keyed["split"] != "cross_domain"])
    return effects.groupby("split")["em_effect"].agg(["mean", "count"]).rename(columns={"count": "items"})


def reference_models(profile: str, trait: str, root: str | Path = None) -> pd.DataFrame | None:
    """The committed reference run, one row per model: its group (constitution and level, or the control), its
    persona-check margin on `trait` and its EM effect per split (averaged over items, as the tour's). None where
    the profile has no committed reference run."""
    ref = Path(root or paths.REPO) / "reference" / profile   # committed in the repository, read wherever the tour writes
    if not (ref / paths.RESULTS).is_file():
        return None
    effects = analysis.em_effect_table(pd.read_csv(ref / paths.RESULTS))
    per_model = (effects.groupby(["condition", "constitution", "diversity", "em_seed", "split"])["em_effect"].mean()
                 .unstack("split").reset_index())
    checks = pd.read_csv(ref / paths.PERSONA_CHECKS)
    margin = checks[checks["trait"] == trait].set_index("condition")["margin"]
    per_model["persona_margin"] = per_model["condition"].map(margin)
    per_model["group"] = [c if c in ("base", "random") else f"{c} L{d}"
                          for c, d in zip(per_model["constitution"], per_model["diversity"])]
    return per_model


def summary(t: Tour, character: dict, effect: pd.DataFrame) -> pd.DataFrame:
    """The tour's numbers in one table, and its manifest (profile, choices, seeds, wall time per stage)."""
    table = pd.DataFrame([
        {"measure": f"persona check ({t.trait}): margin before training", "value": character["margin_before"]},
        {"measure": f"persona check ({t.trait}): margin after training", "value": character["margin_after"]},
        *({"measure": f"EM effect, {split.replace('_', ' ')} (harmful - benign)", "value": row["mean"]}
          for split, row in effect.iterrows()),
        {"measure": "wall time, all stages (s)", "value": sum(t.seconds.values())}])
    run = provenance.Run("tour", t.P, t.out, condition=t.name, profile_path=t.profile_path)
    run.started = t.started   # the tour began at `start`, not here
    run.seeds.update(subset=grid.subset_seed(t.P, t.draw, 0), character=t.draw, em=grid.em_seeds(t.P, t.name)[0])
    run.extra.update(constitution=t.constitution, level=t.level, draw=t.draw, seconds=t.seconds,
                     results=dict(zip(table["measure"], table["value"])))
    provenance.atomic_write_csv(t.out / "summary.csv", table)
    run.finish()
    return table
