"""H5 over training length: two runs' checks.json read into one table and one interaction model."""
import json

import numpy as np
import pytest

from persona_em import forgetting, grid, paths
from persona_em.config import load_profile
from persona_em.grid import parse_condition


def write_checks(profile, root, change):
    """A checks.json per trained condition; `change(info, longer)` is its neutral log-lik change."""
    for cond in grid.character_conditions(profile):
        info = parse_condition(cond)
        if info["constitution"] not in grid.constitutions(profile):
            continue
        d = paths.run_dir(profile, root, "02_train_character", cond)
        d.mkdir(parents=True)
        delta = change(info, profile.character.epochs > 1)
        (d / "checks.json").write_text(json.dumps({
            "before": {"forgetting_loglik": -2.0, "persona_margin": 0.1},
            "after": {"forgetting_loglik": -2.0 + delta, "persona_margin": 0.15}}))


def long_of(P, **changes):
    return P.model_copy(update={"name": f"{P.name}-long",
                                "character": P.character.model_copy(update={"epochs": 4.0, **changes})})


def test_the_interaction_reads_how_diversity_changes_the_cost_of_longer_training(root, tmp_path):
    short = load_profile(root / "params" / "test.yaml")
    long = long_of(short)
    # longer training costs 0.2 of log-lik at level 1 and 0.02 less per doubling of the level; the seed-free
    # wobble by constitution keeps the fit from being exact
    change = lambda info, longer: (-0.2 + 0.02 * np.log2(info["level"])) * longer - 0.01 * np.log2(info["level"]) \
        + (0.003 if info["constitution"] == "neutral" else -0.003) * (1 + longer)
    write_checks(short, tmp_path, change)
    write_checks(long, tmp_path, change)
    report = forgetting.compare(short, long, tmp_path, tmp_path / "h5")
    rows = forgetting.gather(short, long, tmp_path)
    assert len(rows) == 16 and set(rows["epochs"]) == {1.0, 4.0}   # 2 constitutions x 2 levels x 2 replicates, twice
    table = json.loads((tmp_path / "h5" / "forgetting_manifest.json").read_text())
    assert set(table["profiles"]) == {"test", "test-long"} and len(table["inputs"]) == 16
    effects = __import__("pandas").read_csv(tmp_path / "h5" / "forgetting_effects.csv").set_index("term")
    assert effects.loc["log2_level:longer", "estimate"] == pytest.approx(0.02, abs=1e-9)
    assert effects.loc["longer", "estimate"] == pytest.approx(-0.2, abs=1e-9)   # the wobble averages out
    assert (tmp_path / "figures" / "test" / "forgetting_by_length.png").is_file()
    assert "log2_level:longer +0.0200" in report
    tex = (tmp_path / "paper" / "generated" / "test" / "h5_length.tex").read_text()   # the paper's macros
    assert "\\newcommand{\\HFiveLengthInteraction}{0.020}" in tex and "\\newcommand{\\HFiveLengthRatio}{4}" in tex
    # the paper quotes it only beside the run it was made from
    assert f"\\newcommand{{\\HFiveShortDigest}}{{{short.digest()[:12]}}}" in tex


def test_profiles_that_differ_in_more_than_length_or_have_not_run_are_refused(root, tmp_path):
    short = load_profile(root / "params" / "test.yaml")
    with pytest.raises(ValueError, match="also differ in character.check_items"):
        forgetting.gather(short, long_of(short, check_items=2), tmp_path)
    with pytest.raises(ValueError, match="does not train longer"):
        forgetting.gather(short, short.model_copy(update={"name": "same"}), tmp_path)
    with pytest.raises(FileNotFoundError, match="has not trained candor-L1-s0 yet"):
        forgetting.gather(short, long_of(short), tmp_path)
