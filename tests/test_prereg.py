"""The pre-registration is read from the repository, and every departure from it is listed."""
import pytest

from persona_em import prereg
from persona_em.config import load_profile


def _performed(P, **change):
    return {"primary_formula": "em_effect ~ log2_level + (1|item_id) + (1|condition) + (1|draw)",
            "primary_term": "log2_level", "primary_split": "out_of_domain", "alpha": P.analysis.alpha,
            "reward_share": P.analysis.gate_reward_share,
            "secondary": ["in_domain_slope", "vendi_slope", "h2_trait_minus_neutral", "h2_slope_difference",
                          "forgetting_slope", "spread_slope", "aligned_judge", "misaligned_judge"]} | change


def test_the_committed_registration_matches_tiny_as_run(root):
    reg, tiny = prereg.load(root), load_profile(root / "params" / "tiny.yaml")
    assert reg["profile"] == "tiny" and reg["primary"]["term"] == "log2_level"
    assert prereg.deviations(reg, tiny, _performed(tiny)) == []
    amended = prereg.amendments(root)
    assert amended and all(a.startswith("2026-") for a in amended)
    assert prereg.deviations(reg, tiny, _performed(tiny), amended) == [f"amendment: {a}" for a in amended]


def test_departures_are_listed(root):
    reg, tiny = prereg.load(root), load_profile(root / "params" / "tiny.yaml")
    fewer = tiny.model_copy(update={"character": tiny.character.model_copy(update={"seeds": [0, 1, 2]}),
                                    "analysis": tiny.analysis.model_copy(update={"power_sims": 100})})
    devs = prereg.deviations(reg, fewer, _performed(fewer, primary_formula="em_effect ~ log2_level",
                                                    secondary=["in_domain_slope", "extra_test"]))
    text = "\n".join(devs)
    assert "design.replicates: registered 6, run 3" in text and "power.sims: registered 2000, performed 100" in text
    assert "primary.model: registered" in text and "not performed: vendi_slope" in text
    assert "performed but not registered: extra_test" in text
    smoke = load_profile(root / "params" / "smoke.yaml")
    assert prereg.deviations(reg, smoke, _performed(smoke)) == [
        "profile 'smoke' is not the registered one ('tiny'): the registration does not apply"]


def test_a_registration_without_its_block_is_refused(tmp_path):
    (tmp_path / "PREREGISTRATION.md").write_text("# no block here\n")
    with pytest.raises(ValueError, match="no ```yaml block under '## Registered analysis'"):
        prereg.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no pre-registration"):
        prereg.load(tmp_path / "missing")
