"""The experimental grid, named once: which character conditions, EM runs and evaluated models a profile has, and
the names they carry (method 6.4, 9). The Snakefile, the notebooks and the library build every condition and run
name here, and read them back with `parse_condition` / `parse_model`.

The grid functions take the validated profile (`config.Profile`) as their first argument; where each run's files
lie is `paths`'s.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import constitution as constitution_mod

if TYPE_CHECKING:   # config imports this module (its validators check the grid's names)
    from .config import Profile

PAPER_SCALE = "gpu"   # the paper-scale profile (params/gpu.yaml), whose cost every analysis tabulates beside its own


def condition_name(constitution: str, level: int, char_seed: int) -> str:
    """A persona's condition name, the inverse of `parse_condition`: 'candor-L4-s0'."""
    return f"{constitution}-L{int(level)}-s{int(char_seed)}"


def em_run_name(condition: str, dataset: str, em_seed) -> str:
    """An EM run's name, the inverse of `parse_model`: '<condition>__<domain>-<kind>__s<seed>' (also with the
    Snakefile's wildcards for its parts)."""
    return f"{condition}__{dataset}__s{em_seed}"


def parse_condition(cond: str) -> dict:
    """'candor-L4-s0' -> {'constitution': 'candor', 'level': 4, 'char_seed': 0}; 'base' -> base;
    'random-s1' -> the random-LoRA control of character seed 1 (level 0)."""
    if cond == "base":
        return {"constitution": "base", "level": 0, "char_seed": -1}
    if cond.startswith("random-s"):
        return {"constitution": "random", "level": 0, "char_seed": int(cond[len("random-s"):])}
    name, level, seed = cond.rsplit("-", 2)
    return {"constitution": name, "level": int(level[1:]), "char_seed": int(seed[1:])}


def parse_model(model: str) -> dict:
    """An evaluated model id: a character condition, or '<condition>__<domain>-<kind>__s<seed>'."""
    parts = model.split("__")
    row = parse_condition(parts[0]) | {"condition": parts[0]}
    if len(parts) == 1:
        return row | {"phase": "before", "em_dataset": "", "em_domain": "", "harmful": "", "em_seed": -1}
    dataset, seed = parts[1], int(parts[2][1:])
    domain, kind = dataset.rsplit("-", 1)
    return row | {"phase": "after", "em_dataset": dataset, "em_domain": domain, "harmful": kind == "harmful",
                  "em_seed": seed}


def neutral(P: Profile) -> str:
    """Condition name of the neutral control constitution."""
    return constitution_mod.resolve(P.controls.neutral).stem


def constitutions(P: Profile) -> list[str]:
    """Condition names of every trained constitution: the traits, then the neutral control."""
    names = [constitution_mod.resolve(c).stem for c in P.generate.constitutions]
    return names + ([neutral(P)] if neutral(P) not in names else [])


def traits(P: Profile) -> list[str]:
    """Condition names of the trait constitutions (every trained constitution but the neutral control)."""
    return [n for n in constitutions(P) if n != neutral(P)]


def constitution_sources(P: Profile) -> dict[str, str]:
    """Condition name -> the packaged name or path it is loaded from."""
    sources = list(P.generate.constitutions) + [P.controls.neutral]
    return {constitution_mod.resolve(c).stem: c for c in reversed(sources)}


def character_conditions(P: Profile) -> list[str]:
    """Untrained base, the random-LoRA control per character seed, then every constitution (traits and the
    neutral control) x diversity level x character seed."""
    random_seeds = P.controls.random_seeds or P.character.seeds
    conds = ["base"] + [f"random-s{s}" for s in random_seeds]
    for name in constitutions(P):
        for level in P.generate.levels:
            conds += [condition_name(name, level, s) for s in constitution_seeds(P, name)]
    return conds


def constitution_seeds(P: Profile, name: str) -> list[int]:
    """The replicates (character seeds) a constitution is trained on: the neutral control may have fewer."""
    if name == neutral(P):
        return list(P.controls.neutral_seeds or P.character.seeds)
    return list(P.character.seeds)


def random_reference(P: Profile, char_seed: int) -> str:
    """The trained persona whose adapter norm the random LoRA of this seed matches: the main (first)
    trait at the highest diversity level."""
    return condition_name(constitutions(P)[0], max(P.generate.levels), char_seed)


def em_domain_names(P: Profile) -> list[str]:
    """The built-in narrow domains, then the external datasets' names."""
    return list(P.em.domains) + [x.name for x in P.em.external]


def em_datasets(P: Profile) -> list[str]:
    """Every EM dataset: each domain's harmful data and its benign twin."""
    return [f"{d}-{k}" for d in em_domain_names(P) for k in ("harmful", "benign")]


def contrast_domain(P: Profile, em_domain: str) -> str:
    """The contrast items' domain that is 'in domain' for an EM dataset's domain."""
    ext = {x.name: x.contrast_domain for x in P.em.external}
    return (ext[em_domain] or "") if em_domain in ext else em_domain


def contrast_domains(P: Profile) -> list[str]:
    """The contrast items' domains that some EM dataset of this profile makes 'in domain'."""
    return sorted({contrast_domain(P, d) for d in em_domain_names(P)} - {""})


def em_runs(P: Profile) -> list[str]:
    """Every EM run of the study: each character condition x EM dataset x its EM seeds."""
    return [em_run_name(c, d, s) for c in character_conditions(P) for d in em_datasets(P) for s in em_seeds(P, c)]


def em_seeds(P: Profile, condition: str) -> list[int]:
    """EM seeds of a character condition: the controls (base, random LoRA) may have their own."""
    control = condition == "base" or condition.startswith("random-")
    return (P.em.control_seeds or P.em.seeds) if control else P.em.seeds


def eval_models(P: Profile) -> list[str]:
    """Every character model before EM and every EM run after it."""
    return character_conditions(P) + em_runs(P)


def direction_runs(P: Profile) -> list[str]:
    """The untrained base's EM runs that estimate the misalignment direction: every EM dataset (harmful and
    benign twin) with each of `direction.em_seeds`, seeds no evaluated model's EM run uses. Chapter 4 records
    their activations instead of a readout; they are not among the evaluated models."""
    return [em_run_name("base", d, s) for s in P.direction.em_seeds for d in em_datasets(P)]


def draws(P: Profile) -> list[int]:
    """The replicates whose subsets chapter 1 draws: every character seed some constitution trains."""
    return sorted(set(P.character.seeds))


def subset_seed(P: Profile, char_seed: int, trait_index: int) -> int:
    """The seed of one replicate's subset draw for one trait: every replicate draws its own nested
    subsets; the constitutions share them (same pool, same seed), so trait and neutral stay paired."""
    return P.seed + 1000 * char_seed + trait_index
