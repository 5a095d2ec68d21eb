"""Every run name is built in one place (grid) and every run folder and artifact name in another (paths): the names
read back to what they were built from, every folder lies under runs/<profile>/<stage>/, and the Snakefile and the
notebooks plan and write exactly those folders and files, spelling none of them out themselves."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from persona_em import grid, paths
from persona_em.config import load_profile

PROFILES = ["smoke", "test", "tiny", "tiny-long", "gpu"]


@pytest.fixture(scope="module", params=PROFILES)
def P(request, root):
    return load_profile(root / "params" / f"{request.param}.yaml")


def test_every_model_name_reads_back_to_its_parts(P):
    conds = grid.character_conditions(P)
    assert len(set(conds)) == len(conds) and conds[0] == "base"
    for c in conds:
        info = grid.parse_condition(c)
        if info["constitution"] in grid.constitutions(P):
            assert grid.condition_name(info["constitution"], info["level"], info["char_seed"]) == c
            assert info["level"] in P.generate.levels
            assert info["char_seed"] in grid.constitution_seeds(P, info["constitution"])
        else:
            assert c == "base" or (info["constitution"] == "random" and c == f"random-s{info['char_seed']}")
    models = grid.eval_models(P)
    assert len(set(models)) == len(models)
    for m in models + grid.direction_runs(P):
        info = grid.parse_model(m)
        assert info["condition"] in conds, m
        if info["phase"] == "after":
            assert info["em_dataset"] in grid.em_datasets(P) and info["em_domain"] in grid.em_domain_names(P)
            assert grid.em_run_name(info["condition"], info["em_dataset"], info["em_seed"]) == m
            assert info["harmful"] == info["em_dataset"].endswith("-harmful")
        else:
            assert m in conds
    for r in grid.direction_runs(P):   # the direction's own runs: over the base, with seeds no evaluated model uses
        info = grid.parse_model(r)
        assert info["condition"] == "base" and info["em_seed"] in P.direction.em_seeds and r not in models
    assert grid.random_reference(P, P.character.seeds[0]) in conds


def test_every_run_folder_lies_under_its_stage(P, tmp_path):
    assert paths.STAGES == tuple(sorted(paths.STAGES)) and len(paths.STAGES) == 5
    names = {paths.GENERATE: [None], paths.TRAIN_CHARACTER: grid.character_conditions(P),
             paths.INDUCE_EM: grid.em_runs(P) + grid.direction_runs(P),
             paths.EVALUATE: grid.eval_models(P) + grid.direction_runs(P), paths.ANALYZE: [None]}
    for stage, runs in names.items():
        base = tmp_path / "runs" / P.name / stage
        assert paths.run_dir(P, tmp_path, stage) == base == paths.run_root(P, tmp_path) / stage
        assert len({paths.run_dir(P, tmp_path, stage, r) for r in runs}) == len(runs)
        for r in runs:
            d = paths.run_dir(P, tmp_path, stage, r)
            assert d.parent == base if r else d == base
    for c in grid.constitutions(P):
        for s in grid.constitution_seeds(P, c):
            f = paths.pairs_file(P, tmp_path, c, P.generate.levels[0], s)
            assert f.parent == paths.run_dir(P, tmp_path, paths.GENERATE) / paths.PAIRS
            assert f.stem in grid.character_conditions(P)


def test_artifact_names_are_distinct_file_names():
    names = {k: v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)}
    assert len(set(names.values())) == len(names), "two constants name the same file"
    assert all(paths.SAFE_NAME.fullmatch(v) for v in names.values())
    for stage in paths.STAGES:   # every stage is a chapter
        assert (paths.REPO / "notebooks" / paths.notebook_name(stage)).is_file()


def test_the_dry_run_plans_exactly_the_grids_folders(root):
    """The Snakefile's jobs (its rules' outputs) are the manifests of the run folders paths and grid name."""
    P = load_profile(root / "params" / "test.yaml")
    r = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--cores", "1", "--config",
                        "profile=params/test.yaml", "--forceall"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    planned = set(re.findall(r"^\s+output: (\S+)$", r.stdout, re.M))
    want = {paths.run_dir(P, ".", paths.GENERATE), paths.run_dir(P, ".", paths.ANALYZE)}
    want |= {paths.run_dir(P, ".", paths.TRAIN_CHARACTER, c) for c in grid.character_conditions(P)}
    want |= {paths.run_dir(P, ".", paths.INDUCE_EM, m) for m in grid.em_runs(P) + grid.direction_runs(P)}
    want |= {paths.run_dir(P, ".", paths.EVALUATE, m) for m in grid.eval_models(P) + grid.direction_runs(P)}
    planned -= {f"paper/paper-{P.name}.pdf"}   # where TeX is installed
    assert planned == {str(d / paths.MANIFEST) for d in want}


def _literals(source: str) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


LAYOUT = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)} - {"adapter"}
FOLDERS = {"figures", "paper", "generated", "params"}   # folders that paths' functions build


def test_workflow_and_chapters_name_no_run_file_themselves(root):
    """The stage folders and the files a stage writes for another are paths's constants, and the folders of
    figures, the paper's LaTeX and the profiles its functions; a literal copy in the Snakefile or a chapter could
    drift from them. ("adapter" is also a key of model.json, so it is left out.)"""
    found = {}
    snakefile = (root / "Snakefile").read_text()
    found["Snakefile"] = {v for v in LAYOUT if re.search(rf"[\"'/]{re.escape(v)}[\"'/]", snakefile)}
    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        found[nb.name] = _literals(code) & (LAYOUT | FOLDERS)
    assert not any(found.values()), found
