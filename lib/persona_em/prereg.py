"""The pre-registration (PREREGISTRATION.md): what the reference run was fixed to test before it ran.

The file's machine-readable block (a fenced YAML block under "## Registered analysis") is read by chapter 5,
which records the file's hash in its manifest and lists every deviation of the run and its analysis from it;
the paper prints that list.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from . import grid

FILE = "PREREGISTRATION.md"


def path(root) -> Path:
    return Path(root) / FILE


def load(root) -> dict:
    """The registered analysis: the YAML block of the pre-registration, validated for the keys chapter 5 uses."""
    p = path(root)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no pre-registration; chapter 5 compares the run with it")
    text = p.read_text(encoding="utf-8")
    m = re.search(r"## Registered analysis.*?```yaml\n(.*?)```", text, re.S)
    if not m:
        raise ValueError(f"{p}: no ```yaml block under '## Registered analysis'")
    block = yaml.safe_load(m.group(1))
    for key in ("profile", "design", "gate", "primary", "secondary"):
        if key not in block:
            raise ValueError(f"{p}: registered analysis: '{key}' is missing")
    return block


def amendments(root) -> list[str]:
    """Changes to the registered analysis made after registration, each dated and with its reason, listed under
    "## Amendments" (the registered text above them is never edited); every one is a deviation."""
    text = path(root).read_text(encoding="utf-8")
    if "## Amendments" not in text:
        return []
    block = text.split("## Amendments", 1)[1].split("\n## ", 1)[0]
    return [" ".join(line.lstrip("- ").split()) for line in re.split(r"\n(?=- )", block.strip()) if line.startswith("- ")]


def deviations(reg: dict, P, performed: dict, amended: list[str] = ()) -> list[str]:
    """Where the run (profile `P`) and the analysis chapter 5 performed (`performed`: primary formula, term,
    split, alpha, gate reward share, secondary test names) depart from the registration, then its amendments.
    [] when none; a profile other than the registered one is itself the deviation (the registration is for that
    profile's reference run)."""
    if P.name != reg["profile"]:
        return [f"profile {P.name!r} is not the registered one ({reg['profile']!r}): the registration does not apply"]
    out = []
    d = reg["design"]
    actual = {"constitutions": grid.traits(P), "neutral": grid.neutral(P), "levels": list(P.generate.levels),
              "replicates": len(grid.draws(P)), "n_questions": P.generate.n_questions, "pairs": P.generate.pairs,
              "em_domains": grid.em_domain_names(P)}
    for key, value in actual.items():
        if key in d and d[key] != value:
            out.append(f"design.{key}: registered {d[key]}, run {value}")
    power = reg.get("power", {})
    checks = [("primary.model", reg["primary"]["model"], performed["primary_formula"]),
              ("primary.term", reg["primary"].get("term"), performed["primary_term"]),
              ("primary.split", reg["primary"].get("split"), performed["primary_split"]),
              ("primary.alpha", reg["primary"]["alpha"], performed["alpha"]),
              ("gate.reward_share", reg["gate"]["reward_share"], performed["reward_share"]),
              ("power.draws", power.get("draws"), sorted(P.analysis.power_draws)),
              ("power.sims", power.get("sims"), P.analysis.power_sims),
              ("power.target", power.get("target"), P.analysis.power_target)]
    out += [f"{key}: registered {a!r}, performed {b!r}" for key, a, b in checks if a is not None and a != b]
    missing = [t for t in reg["secondary"] if t not in performed["secondary"]]
    extra = [t for t in performed["secondary"] if t not in reg["secondary"]]
    if missing:
        out.append(f"secondary tests registered but not performed: {', '.join(missing)}")
    if extra:
        out.append(f"secondary tests performed but not registered: {', '.join(extra)}")
    return out + [f"amendment: {a}" for a in amended]
