"""Profiles are validated before anything runs; errors name the file and the key."""
import json
import subprocess
import sys

import pytest
import yaml

from persona_em import grid, paths
from persona_em.config import ProfileError, load_profile
from persona_em.grid import parse_condition, parse_model


def _write(tmp_path, root, **edit):
    raw = yaml.safe_load((root / "params" / "test.yaml").read_text())
    for dotted, value in edit.items():
        *path, key = dotted.split(".")
        d = raw
        for p in path:
            d = d[p]
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    f = tmp_path / "profile.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


@pytest.mark.parametrize("name", ["test", "smoke"])
def test_shipped_profiles_validate(root, name):
    p = load_profile(root / "params" / f"{name}.yaml")
    assert p.name == name
    assert grid.character_conditions(p)[0] == "base"
    assert len(grid.em_runs(p)) == len(grid.character_conditions(p)) * len(grid.em_datasets(p)) * len(p.em.seeds)


@pytest.mark.parametrize("edit, needle", [
    ({"generate.n_questoins": 3}, "generate.n_questoins: unknown key"),
    ({"character.lr": "fast"}, "character.lr:"),
    ({"em.batch_size": KeyError}, "em.batch_size: required key is missing"),
    ({"generate.constitutions": ["no_such_file.json"]}, "no_such_file.json"),
    ({"model": "not a model"}, "model: unknown model 'not a model'"),
    ({"generate.levels": [4, 2]}, "generate.levels:"),
    ({"em.domains": ["cooking"]}, "em.domains.0:"),
    # accelerate would run it as DDP without a word (MULTI_CPU drops the FSDP plugin)
    ({"hardware": {"num_processes": 2, "distributed": "fsdp"}}, "distributed 'fsdp' needs device 'cuda'"),
])
def test_bad_profiles_are_refused_with_file_and_key(tmp_path, root, edit, needle):
    f = _write(tmp_path, root, **edit)
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    assert str(f) in str(e.value)
    assert needle in str(e.value)


def test_check_cli_exit_status(tmp_path, root):
    bad = _write(tmp_path, root, **{"evaluate.sampels": 1})
    good = root / "params" / "test.yaml"
    r = subprocess.run([sys.executable, "-m", "persona_em", "check", str(good), str(bad)], capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert "profile 'test'" in r.stdout
    assert "evaluate.sampels: unknown key" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_condition_names_round_trip():
    assert parse_condition("candor-L16-s2") == {"constitution": "candor", "level": 16, "char_seed": 2}
    m = parse_model("candor-L1-s0__financial-benign__s3")
    assert m["phase"] == "after" and m["harmful"] is False and m["em_seed"] == 3 and m["em_domain"] == "financial"
    assert parse_model("base")["phase"] == "before"
    assert parse_condition("random-s2") == {"constitution": "random", "level": 0, "char_seed": 2}
    assert parse_model("random-s1__medical-harmful__s0")["constitution"] == "random"


def test_grid_has_the_controls(root):
    p = load_profile(root / "params" / "test.yaml")
    conds = grid.character_conditions(p)
    assert conds[:2] == ["base", "random-s0"]
    assert {f"neutral-L{lv}-s0" for lv in p.generate.levels} <= set(conds)
    assert grid.traits(p) == ["candor"] and grid.constitutions(p) == ["candor", "neutral"]
    assert grid.random_reference(p, 0) == f"candor-L{max(p.generate.levels)}-s0"


def test_tiny_grid_is_replicated_over_subset_draws(root):
    """tiny: every replicate (a subset draw + its training seed) trains candor and the neutral constitution at
    every level; one random LoRA; 3 EM seeds over base and random only; best-of-n pairs, no introspection."""
    p = load_profile(root / "params" / "tiny.yaml")
    conds = grid.character_conditions(p)
    assert p.generate.levels == [1, 16] and grid.traits(p) == ["candor"] and grid.draws(p) == [0, 1, 2, 3, 4, 5]
    assert [c for c in conds if c.startswith("random")] == ["random-s0"]
    for name in ("candor", "neutral"):
        assert [c for c in conds if c.startswith(name)] == [f"{name}-L{lv}-s{s}" for lv in p.generate.levels
                                                           for s in range(6)]
    assert grid.em_seeds(p, "base") == grid.em_seeds(p, "random-s0") == [0, 1, 2]
    assert grid.em_seeds(p, "candor-L1-s2") == [0]
    assert p.generate.pairs == "best_of_n" and p.character.introspection is None
    # each replicate draws its own subsets, shared by the constitutions
    assert len({grid.subset_seed(p, s, 0) for s in grid.draws(p)}) == 6
    assert paths.pairs_file(p, ".", "candor", 4, 2).name == "candor-L4-s2.jsonl"


@pytest.mark.parametrize("edit, needle", [
    ({"generate.best_of_n": KeyError}, "pairs 'best_of_n' needs a 'best_of_n' section"),
    ({"generate.best_of_n": {"n": 1, "demonstrations": 0}}, "n must be at least 2"),
    ({"generate.best_of_n": {"scorer_items": {"agreeable": "x.json"}}}, "are not trained constitutions"),
    ({"generate.best_of_n": {"scorer_items": {"candor": "missing.json"}}}, "missing.json: no scorer items"),
])
def test_best_of_n_sections_are_checked(tmp_path, root, edit, needle):
    with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_profile(_write(tmp_path, root, **edit))


def test_a_scorer_that_shares_items_with_the_persona_check_is_refused(tmp_path, root):
    """The scorer ranks the pairs; the persona check decides whether the persona was learned. A scorer fitted
    on a check question would let the check read the data that chose the pairs."""
    from persona_em import evaluate, scorer

    items = scorer.load_items(scorer.items_path("candor"))
    leak = evaluate.persona_items("candor")[3]
    items[0] = {"question": leak["question"], "consistent": [leak["consistent"]], "inconsistent": [leak["inconsistent"]]}
    f = tmp_path / "candor_scorer.json"
    f.write_text(json.dumps(items))
    with pytest.raises(ProfileError, match="shares 1 question"):
        load_profile(_write(tmp_path, root, **{"generate.best_of_n": {"scorer_items": {"candor": str(f)}}}))


def test_control_seeds_must_be_character_seeds(tmp_path, root):
    f = _write(tmp_path, root, **{"controls": {"random_seeds": [5]}})
    with pytest.raises(ProfileError, match=r"controls.random_seeds: \[5\] not in character.seeds"):
        load_profile(f)


def test_expansion_sections_are_checked(tmp_path, root):
    f = _write(tmp_path, root, **{"generate.pool": "expansion"})
    with pytest.raises(ProfileError, match="pool 'expansion' needs an 'expansion' section"):
        load_profile(f)
    f = _write(tmp_path, root, **{"generate.pool": "expansion",
                                  "generate.expansion": {"backend": "endpoint", "target_per_trait": 50}})
    with pytest.raises(ProfileError, match="needs endpoint_url and endpoint_model"):
        load_profile(f)
    f = _write(tmp_path, root, **{"generate.pool": "expansion",
                                  "generate.expansion": {"backend": "local", "target_per_trait": 50}})
    assert load_profile(f).generate.expansion.clusters == 8


def test_levels_must_fit_n_and_cells(tmp_path, root):
    f = _write(tmp_path, root, **{"generate.levels": [1, 8], "generate.n_questions": 4})
    with pytest.raises(ProfileError, match="n_questions .4. must be at least the highest level"):
        load_profile(f)
    f = _write(tmp_path, root, **{"generate.levels": [1, 64], "generate.n_questions": 64})
    with pytest.raises(ProfileError, match="exceeds the 18 context cells"):
        load_profile(f)


def test_benign_twin_cannot_be_switched_off(tmp_path, root):
    with pytest.raises(ProfileError, match="em.benign_twin"):
        load_profile(_write(tmp_path, root, **{"em.benign_twin": False}))


def test_malformed_constitution_is_refused_at_validation(tmp_path, root):
    bad = tmp_path / "mine.json"
    bad.write_text('[{"trait": "I am calm."}]')
    with pytest.raises(ProfileError, match=r"\n  generate.constitutions\[0\]: .*trait 0: 'questions' is missing"):
        load_profile(_write(tmp_path, root, **{"generate.constitutions": [str(bad)]}))


def test_external_em_data_is_validated_and_joins_the_grid(tmp_path, root):
    good = tmp_path / "bad_advice.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}\n')
    twin = tmp_path / "good_advice.jsonl"
    twin.write_text(good.read_text())
    ext = [{"name": "pubmed", "harmful": str(good), "benign": str(twin), "contrast_domain": "medical"}]
    p = load_profile(_write(tmp_path, root, **{"em.external": ext}))
    assert "pubmed-harmful" in grid.em_datasets(p) and "pubmed-benign" in grid.em_datasets(p)
    assert grid.contrast_domain(p, "pubmed") == "medical" and grid.contrast_domains(p) == ["financial", "medical"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(good.read_text() + '{"messages": [{"role": "user", "content": "Q?"}]}\n')
    with pytest.raises(ProfileError) as e:
        load_profile(_write(tmp_path, root, **{"em.external": [dict(ext[0], benign=str(broken))]}))
    assert "em.external.0" in str(e.value) and "line 2" in str(e.value) and "no assistant turn" in str(e.value)
    from persona_em import em

    rows, source = em.dataset_rows(p, "pubmed", "harmful")
    assert source == str(good) and rows == [json.loads(good.read_text())]
    built_in, none = em.dataset_rows(p, "financial", "benign")
    assert none is None and len(built_in) == p.em.n_examples


def test_a_profile_can_extend_another(tmp_path, root):
    p = load_profile(root / "params" / "tiny-long.yaml")
    tiny = load_profile(root / "params" / "tiny.yaml")
    assert p.name == "tiny-long" and p.character.epochs == 4 * tiny.character.epochs
    assert p.character.lr == tiny.character.lr and grid.traits(p) == ["candor"] and p.em == tiny.em
    assert p.character.seeds == [0] and p.generate == tiny.generate
    loop = tmp_path / "a.yaml"
    loop.write_text("extends: a.yaml\nname: a\n")
    with pytest.raises(ProfileError, match="loops back"):
        load_profile(loop)


@pytest.mark.parametrize("profile", ["smoke", "tiny", "gpu"])
def test_validating_a_profile_imports_no_torch(root, profile):
    """`make reproduce` checks the profile, then Snakemake reads it: neither should pay torch's import (3 s on
    2 cores) before the first job starts."""
    code = "import sys; from persona_em.config import load_profile; load_profile(sys.argv[1]); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code, str(root / "params" / f"{profile}.yaml")], capture_output=True,
                       text=True, cwd=root)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:] or r.stdout
