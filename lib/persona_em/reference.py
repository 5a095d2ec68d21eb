"""Collect a finished run's small artifacts for committing as the reference run (`make reference`):
the tables of chapter 5 and the misalignment direction with its provenance, the executed notebooks of chapters
1 and 5 and of one condition's path through chapters 2-4 (the others are the same notebook with other
parameters), and the git SHAs they were made at.
Figures, numbers and the PDF already live in figures/<profile>/ and paper/."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

from . import grid, paths
from .grid import em_run_name
from .provenance import atomic_dir

TABLES = ["results.csv", "tests.csv", "effects.csv", "models.txt", "gate.csv", "gate.json", "rewards.csv",
          "power.csv", "power_mde.csv", "persona_checks.csv", "persona_summary.csv", "teacher_check.csv",
          "spread_effects.csv", "direction_stability.csv", "direction_separation.csv", "direction_validation.csv",
          "direction.safetensors"]
GENERATE_TABLES = ["scorers.csv", "pair_signal.csv", "pair_balance.csv", "diversity.csv"]


README_TITLE = "# Reference run of profile"


def _is_reference(folder: Path) -> bool:
    readme = folder / "SHAS.md"
    return readme.is_file() and readme.read_text().startswith(README_TITLE)


def collect(profile, root: str | Path, dest: str | Path, example: str) -> Path:
    """Copy the reference artifacts of `profile`'s run into `dest`; `example` is the character condition whose
    notebooks of chapters 2-4 (harmful EM, first domain and EM seed) are kept."""
    root, dest = Path(root), Path(dest)
    if example not in grid.character_conditions(profile):
        raise ValueError(f"example condition {example!r} is not one of profile {profile.name!r}'s conditions "
                         f"{grid.character_conditions(profile)}")
    run = paths.run_dir(profile, root, "05_analyze").parent
    if not (run / "05_analyze" / "manifest.json").is_file():
        raise FileNotFoundError(f"{run}: the run has not finished (no 05_analyze/manifest.json)")
    em_run = em_run_name(example, grid.em_datasets(profile)[0], grid.em_seeds(profile, example)[0])
    picks = {"01_generate": run / "01_generate" / "01_generate.ipynb",
             f"02_train_character-{example}": run / "02_train_character" / example / "02_train_character.ipynb",
             f"03_induce_em-{em_run}": run / "03_induce_em" / em_run / "03_induce_em.ipynb",
             f"04_evaluate-{em_run}": run / "04_evaluate" / em_run / "04_evaluate.ipynb",
             "05_analyze": run / "05_analyze" / "05_analyze.ipynb"}
    missing = [str(p) for p in picks.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"executed notebooks missing from the run: {missing}")
    # dest is replaced whole, so it must be an earlier reference (or absent/empty), never an arbitrary folder;
    # it is built aside and swapped in, so a failure leaves the earlier reference as it was
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not _is_reference(dest))):
        raise FileExistsError(f"{dest}: exists and is not a reference folder (no SHAS.md starting "
                              f"'{README_TITLE}'); refusing to replace it")
    with atomic_dir(dest) as tmp:
        (tmp / "notebooks").mkdir()
        for stage, names in (("05_analyze", TABLES), ("01_generate", GENERATE_TABLES)):
            for name in names:
                if (run / stage / name).is_file():
                    shutil.copy(run / stage / name, tmp / name)
        for name, src in picks.items():
            shutil.copy(src, tmp / "notebooks" / f"{name}.ipynb")
        shas = Counter()
        for m in run.glob("0*/**/manifest.json"):
            git = json.loads(m.read_text()).get("git", {})
            shas[(git.get("sha", "?")[:10], bool(git.get("dirty")))] += 1
        lines = [f"{README_TITLE} `{profile.name}`", "",
                 f"Collected by `make reference` from `runs/{profile.name}/`. Git SHAs the notebook runs were "
                 "made at:", "", "| sha | dirty | notebook runs |", "| --- | --- | --- |"]
        lines += [f"| {sha} | {'yes' if dirty else 'no'} | {n} |" for (sha, dirty), n in sorted(shas.items())]
        (tmp / "SHAS.md").write_text("\n".join(lines) + "\n")
    return dest
