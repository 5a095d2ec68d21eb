"""Where things are, each named once: the package's data files, the repository it was installed from, and the
layout of a run (method 9): runs/<profile>/<stage>[/<run>]/, the stages' folder names and the names of the files
each stage writes and a later stage, the Snakefile or `reference` reads. Which runs there are and what they are
called is `grid`'s; every name that becomes a path component passes `check_name`.

Module-level imports are the standard library's only: `constitution`, `scorer`, `em` and `evaluate` read DATA
from here, and `config` the name rule and the layout.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Profile

PACKAGE = Path(__file__).resolve().parent
DATA = PACKAGE / "data"          # constitutions, question facets, contrast items, scorer items, EM templates
REPO = PACKAGE.parents[1]        # the repository of an editable install (`make setup`): docs/, reference/

# The one rule for every name that becomes a path component (profile, constitution, condition, EM dataset, run,
# stage): no separator, no '..', no leading dot or dash, so no name can lead outside the run's own folders.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def check_name(value, what: str) -> str:
    """`value` if it is a safe path component, else a ValueError naming `what` and the rule."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{what} {value!r} cannot name a folder: use letters, digits, '_', '.' or '-', starting "
                         "with a letter or digit, no '..', at most 200 characters")
    return value


# -- the stages: one folder under runs/<profile>/ each, named after its notebook (notebooks/<stage>.ipynb) --------
GENERATE = "01_generate"
TRAIN_CHARACTER = "02_train_character"   # one run folder per character condition
INDUCE_EM = "03_induce_em"               # one per EM run
EVALUATE = "04_evaluate"                 # one per evaluated model and direction run
ANALYZE = "05_analyze"
STAGES = (GENERATE, TRAIN_CHARACTER, INDUCE_EM, EVALUATE, ANALYZE)


def notebook_name(stage: str) -> str:
    """A stage's chapter, notebooks/<stage>.ipynb, and the name of its executed copy in each of its run folders."""
    return f"{stage}.ipynb"


# -- the files of a run folder -------------------------------------------------------------------------------------
MANIFEST = "manifest.json"                # every run: provenance, written last (the Snakefile's outputs)
# 01_generate
QUESTIONS = "questions.jsonl"             # the question pool
SUBSETS = "subsets.jsonl"                 # every replicate's nested subsets
DIVERSITY = "diversity.csv"               # measured diversity per constitution, level and replicate
DIVERSITY_SEEDS = "diversity_seeds.csv"   # the spread of measured diversity over subset seeds
POOL_MAP = "pool_map.csv"                 # the 2-D map of the pool
SCORERS = "scorers.csv"                   # the trait scorers' cross-validated fit
CANDIDATES = "candidates"                 # folder: best-of-n candidates, <constitution>.json
PAIRS = "pairs"                           # folder: chosen/rejected pairs, <condition>.jsonl (`pairs_file`)
PAIR_SIGNAL = "pair_signal.csv"
PAIR_BALANCE = "pair_balance.csv"
TEACHER_CHECK = "teacher_check.csv"       # also chapter 5's copy
# 02_train_character, 03_induce_em
ADAPTER = "adapter"                       # folder: the LoRA adapter a run trained
INTROSPECTION_ADAPTER = "introspection_adapter"
INTROSPECTION = "introspection.jsonl"     # the introspection transcripts
MODEL = "model.json"                      # a character condition: its base model and adapters, in merge order
TRAIN_LOG = "train_log.csv"
CHECKS = "checks.json"                    # persona margins and forgetting, before and after training
DATASET = "dataset.jsonl"                 # an EM run's training data
# 04_evaluate
CONTRAST = "contrast.csv"
ANSWERS = "answers.jsonl"
CALIBRATION = "calibration.csv"
SCORES = "scores.csv"
RATES = "rates.csv"
ACTIVATIONS = "activations.safetensors"   # a direction run's per-item activations
READOUT = "readout.csv"                   # an evaluated model's projections on the direction
# 05_analyze
RESULTS = "results.csv"
PERSONA_CHECKS = "persona_checks.csv"
REWARDS = "rewards.csv"
GATE = "gate.csv"
GATE_JSON = "gate.json"
TESTS = "tests.csv"
EFFECTS = "effects.csv"
MODELS = "models.txt"                     # every fitted model's summary
SPREAD_EFFECTS = "spread_effects.csv"
DIRECTION = "direction.safetensors"       # the direction with its provenance
DIRECTION_STABILITY = "direction_stability.csv"
DIRECTION_SEPARATION = "direction_separation.csv"
DIRECTION_VALIDATION = "direction_validation.csv"
PERSONA_SUMMARY = "persona_summary.csv"
POWER = "power.csv"
POWER_MDE = "power_mde.csv"


# -- the profiles ------------------------------------------------------------------------------------------------
def profile_file(name: str, root: str | Path) -> Path:
    """params/<name>.yaml: a profile of the repository."""
    return Path(root) / "params" / f"{check_name(name, 'profile name')}.yaml"


# -- what a profile's analysis writes outside runs/: its figures and the paper's generated LaTeX ----------------
PAPER_SOURCE = "paper.tex"                # paper/paper.tex, one source for every profile
NUMBERS = "numbers.tex"                   # every number the paper quotes, as macros (chapter 5)
TESTS_TEX = "tests.tex"                   # the pre-registered tests' table (chapter 5)
COST_TEX = "cost.tex"                     # what the run cost (chapter 5)
H5_LENGTH_TEX = "h5_length.tex"           # H5 over training length (`make h5`)


def figures_dir(profile: str, root: str | Path) -> Path:
    """figures/<profile>: every figure of one profile's run, PNG and PDF."""
    return Path(root) / "figures" / check_name(profile, "profile name")


def generated_dir(profile: str, root: str | Path) -> Path:
    """paper/generated/<profile>: the LaTeX one profile's analysis writes for the paper (`NUMBERS`, ...)."""
    return Path(root) / "paper" / "generated" / check_name(profile, "profile name")


def paper_source(root: str | Path) -> Path:
    return Path(root) / "paper" / PAPER_SOURCE


def paper_pdf(profile: str, root: str | Path) -> Path:
    """paper/paper-<profile>.pdf: the paper built on one profile's numbers and figures."""
    return Path(root) / "paper" / f"paper-{check_name(profile, 'profile name')}.pdf"


def run_root(P: Profile, root: str | Path) -> Path:
    """runs/<profile>: every stage's folder of one profile's run."""
    return Path(root) / "runs" / check_name(P.name, "profile name")


def run_dir(P: Profile, root: str | Path, stage: str, name: str | None = None) -> Path:
    """runs/<profile>/<stage>[/<name>]: the folder one notebook run writes (method 9). A stage or run name
    that could leave it (a separator, '..') is refused."""
    d = run_root(P, root) / check_name(stage, "stage")
    return d / check_name(name, "run name") if name else d


def base_checks_file(P: Profile, root: str | Path, key: str) -> Path:
    """runs/<profile>/02_train_character/base_checks-<hash of key>.json: the untrained base's persona and
    forgetting checks, beside the character runs that share them."""
    return run_dir(P, root, TRAIN_CHARACTER) / f"base_checks-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def pairs_file(P: Profile, root: str | Path, constitution: str, level: int, char_seed: int) -> Path:
    """The chosen/rejected pairs chapter 1 writes for one constitution, level and replicate (its subset
    draw), and chapter 2 reads."""
    from .grid import condition_name   # grid reads constitutions, which read DATA from here

    return (run_dir(P, root, GENERATE) / PAIRS
            / check_name(condition_name(constitution, level, char_seed) + ".jsonl", "pairs file"))


def adapters(P: Profile, root: str | Path, model: str) -> list[Path]:
    """The adapters to merge, in order, for an evaluated model id: the persona's (from its 02 run's
    model.json), then the EM run's. A missing adapter is an error, never a silent fall back to the base."""
    from .grid import direction_runs, eval_models, parse_model

    if model not in eval_models(P) + direction_runs(P):
        raise ValueError(f"model {model!r} is not one of profile {P.name!r}'s evaluated models "
                         f"(e.g. {eval_models(P)[:2]})")
    info = parse_model(model)
    ref = run_dir(P, root, TRAIN_CHARACTER, info["condition"]) / MODEL
    if not ref.is_file():
        raise FileNotFoundError(f"{ref}: the character run of {info['condition']!r} has not finished")
    persona = json.loads(ref.read_text())["adapter"]   # None, one adapter, or DPO then introspection
    out = [ref.parent / a for a in ([persona] if isinstance(persona, str) else persona or [])]
    if info["phase"] == "after":
        out.append(run_dir(P, root, INDUCE_EM, model) / ADAPTER)
    for a in out:
        if not (a / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{a}: adapter missing (its run did not finish)")
    return out


def scorer_items_file(P: Profile, constitution: str) -> Path:
    """The items a constitution's trait scorer is fitted on: the profile's file, else the packaged one."""
    from .scorer import items_path

    given = P.generate.best_of_n.scorer_items.get(constitution) if P.generate.best_of_n else None
    return Path(given) if given else items_path(constitution)
