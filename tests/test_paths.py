"""No name leads outside the run's own folders: profile, constitution, condition, stage and example names are
checked by one rule (paths.check_name) in every path builder, and the Makefile accepts only profiles in params/."""
import os
import subprocess

import pytest
import yaml

from persona_em import grid, paths, reference
from persona_em.config import ProfileError, load_profile
from persona_em.paths import check_name

# make as a user types it, not as a sub-make of `make test` (which would print "Entering directory")
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
TRAVERSAL = ["../../etc", "a/b", "/abs", ".hidden", "-rf", "x..y", "", "a b", "smoke;ls", "a\\b"]


@pytest.fixture(scope="module")
def P(root):
    return load_profile(root / "params" / "test.yaml")


@pytest.mark.parametrize("bad", TRAVERSAL)
def test_one_rule_refuses_every_unsafe_name(bad):
    with pytest.raises(ValueError, match="cannot name a folder"):
        check_name(bad, "name")


@pytest.mark.parametrize("good", ["tiny", "tiny-long", "candor-L16-s0", "base__medical-harmful__s0", "v1.2"])
def test_names_in_use_pass(good):
    assert check_name(good, "name") == good


@pytest.mark.parametrize("bad", ["../../etc", "runs/x", ".x"])
def test_profile_name_is_checked_when_it_loads(root, tmp_path, bad):
    raw = yaml.safe_load((root / "params" / "test.yaml").read_text()) | {"name": bad}
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match=r"name: profile name .* cannot name a folder"):
        load_profile(f)


@pytest.mark.parametrize("bad", ["../../etc", "a/b", ".."])
def test_every_path_builder_refuses_traversal(P, tmp_path, bad):
    with pytest.raises(ValueError, match="cannot name a folder"):
        paths.run_dir(P, tmp_path, bad)
    with pytest.raises(ValueError, match="cannot name a folder"):
        paths.run_dir(P, tmp_path, "02_train_character", bad)
    with pytest.raises(ValueError, match="cannot name a folder"):
        paths.pairs_file(P, tmp_path, bad, 1, 0)
    with pytest.raises(ValueError, match="is not one of profile"):
        paths.adapters(P, tmp_path, bad)
    with pytest.raises(ValueError, match="is not one of profile"):
        reference.collect(P, tmp_path, tmp_path / "ref", bad)


def test_path_builders_stay_inside_the_run(P, tmp_path):
    run = (tmp_path / "runs" / P.name).resolve()
    cond = grid.character_conditions(P)[1]
    for p in (paths.run_dir(P, tmp_path, "02_train_character", cond), paths.pairs_file(P, tmp_path, "candor", 2, 0)):
        assert p.resolve().is_relative_to(run)


def test_reference_never_replaces_a_folder_it_did_not_write(P, tmp_path):
    example = grid.character_conditions(P)[1]
    em_run = f"{example}__{grid.em_datasets(P)[0]}__s{grid.em_seeds(P, example)[0]}"
    for stage, name in (("01_generate", ""), ("02_train_character", example), ("03_induce_em", em_run),
                        ("04_evaluate", em_run), ("05_analyze", "")):
        d = paths.run_dir(P, tmp_path, stage, name or None)
        d.mkdir(parents=True)
        (d / f"{stage}.ipynb").write_text("{}")
    (paths.run_dir(P, tmp_path, "05_analyze") / "manifest.json").write_text("{}")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a reference")
    with pytest.raises(FileExistsError, match="not a reference folder"):
        reference.collect(P, tmp_path, keep, example)
    assert (keep / "notes.txt").read_text() == "not a reference"
    dest = reference.collect(P, tmp_path, tmp_path / "ref", example)   # a new folder, then its replacement
    assert reference.collect(P, tmp_path, dest, example) == dest and len(list((dest / "notebooks").iterdir())) == 5


@pytest.mark.parametrize("bad", ["../../etc", "smoke; touch pwned", "x'y", "nosuch", "", "smoke tiny", "%"])
def test_make_accepts_only_profiles_in_params(root, bad):
    r = subprocess.run(["make", "-n", "clean-runs", f"PROFILE={bad}"], cwd=root, capture_output=True, text=True,
                       env=MAKE_ENV)
    assert r.returncode == 2 and "is not a profile in params/" in r.stderr and "rm -rf" not in r.stdout


def test_clean_removes_one_profile_and_never_under_a_live_run(tmp_path):
    import fcntl
    import sys

    for d in ("runs/test/02_train_character", "runs/tiny/01_generate", ".snakemake/locks", ".snakemake/metadata"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("x")
    clean = [sys.executable, "-m", "persona_em", "clean", "test"]
    with open(tmp_path / ".snakemake" / "persona-em.lock", "w") as held:   # a live run holds the folder's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1, started now")
        held.flush()
        r = subprocess.run(clean, cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 3 and "another run of this folder is in progress (pid 1" in r.stderr
        assert (tmp_path / "runs" / "test").is_dir()
    r = subprocess.run(clean, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "runs" / "test").exists() and (tmp_path / "runs" / "tiny" / "01_generate").is_dir()
    assert [p.name for p in (tmp_path / ".snakemake").iterdir()] == ["persona-em.lock"]
    r = subprocess.run([sys.executable, "-m", "persona_em", "clean", "../x"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 3 and "cannot name a folder" in r.stderr
