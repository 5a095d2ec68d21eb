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

TABLES = [paths.RESULTS, paths.TESTS, paths.EFFECTS, paths.MODELS, paths.GATE, paths.GATE_JSON, paths.REWARDS,
          paths.POWER, paths.POWER_MDE, paths.PERSONA_CHECKS, paths.PERSONA_SUMMARY, paths.TEACHER_CHECK,
          paths.SPREAD_EFFECTS, paths.DIRECTION_STABILITY, paths.DIRECTION_SEPARATION, paths.DIRECTION_VALIDATION,
          paths.DIRECTION]
GENERATE_TABLES = [paths.SCORERS, paths.PAIR_SIGNAL, paths.PAIR_BALANCE, paths.DIVERSITY]


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
    run = paths.run_root(profile, root)
    if not (run / paths.ANALYZE / paths.MANIFEST).is_file():
        raise FileNotFoundError(f"{run}: the run has not finished (no {paths.ANALYZE}/{paths.MANIFEST})")
    em_run = em_run_name(example, grid.em_datasets(profile)[0], grid.em_seeds(profile, example)[0])
    runs = [(paths.GENERATE, None), (paths.TRAIN_CHARACTER, example), (paths.INDUCE_EM, em_run),
            (paths.EVALUATE, em_run), (paths.ANALYZE, None)]
    picks = {f"{stage}-{name}" if name else stage:
             paths.run_dir(profile, root, stage, name) / paths.notebook_name(stage) for stage, name in runs}
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
        for stage, names in ((paths.ANALYZE, TABLES), (paths.GENERATE, GENERATE_TABLES)):
            for name in names:
                if (run / stage / name).is_file():
                    shutil.copy(run / stage / name, tmp / name)
        for name, src in picks.items():
            shutil.copy(src, tmp / "notebooks" / f"{name}.ipynb")
        shas = Counter()
        for m in run.glob(f"0*/**/{paths.MANIFEST}"):
            git = json.loads(m.read_text()).get("git", {})
            shas[(git.get("sha", "?")[:10], bool(git.get("dirty")))] += 1
        lines = [f"{README_TITLE} `{profile.name}`", "",
                 f"Collected by `make reference` from `runs/{profile.name}/`. Git SHAs the notebook runs were "
                 "made at:", "", "| sha | dirty | notebook runs |", "| --- | --- | --- |"]
        lines += [f"| {sha} | {'yes' if dirty else 'no'} | {n} |" for (sha, dirty), n in sorted(shas.items())]
        (tmp / "SHAS.md").write_text("\n".join(lines) + "\n")
    return dest
