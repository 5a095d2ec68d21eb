"""The misalignment direction (persona_em.direction): the estimator recovers a known injected vector, the readout
does not depend on batching or padding, the interventions do what they say, and the profile refuses a direction
that would share EM seeds with the study."""
import numpy as np
import pandas as pd
import pytest
import yaml

from persona_em import analysis, config, direction, grid


@pytest.fixture(scope="module")
def profile(root):
    return config.load_profile(root / "params" / "test.yaml")


@pytest.fixture(scope="module")
def items(profile):
    return direction.items(profile)[:6]


def test_a_vector_injected_into_one_block_is_recovered_there(smollm, items):
    model, tok = smollm
    clean = direction.answer_activations(model, tok, items)
    v = np.random.default_rng(0).standard_normal(model.config.hidden_size).astype(np.float32)
    layer = 7
    with direction.steered(model, layer, v):
        pushed = direction.answer_activations(model, tok, items)
    est = direction.mean_difference([pushed], [clean])
    cos = direction.cosine_by_layer(est, np.tile(v, (len(est), 1)))
    assert cos[layer] > 0.99, cos
    np.testing.assert_allclose(est[layer], v, atol=1e-3)   # the index is the block the vector was added after
    assert np.abs(est[:layer]).max() < 1e-4                # blocks before the injection are untouched
    after = direction.answer_activations(model, tok, items)   # the hook is gone on exit
    np.testing.assert_allclose(after, clean, atol=1e-5)


def _one_answer_at_a_time(model, tok, item_list):
    """The definition, naively: each answer alone after its question, one sequence per forward pass."""
    import torch

    from persona_em.sampling import chat_prompt

    out = []
    for it in item_list:
        q = tok(chat_prompt(tok, [{"role": "user", "content": it["question"]}]), add_special_tokens=False).input_ids
        means = []
        for key in ("aligned", "misaligned"):
            a = tok(it[key], add_special_tokens=False).input_ids
            captured = []
            hooks = [b.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
                     for b in direction.blocks(model)]
            with torch.no_grad():
                model(input_ids=torch.tensor([q + a]))
            for h in hooks:
                h.remove()
            means.append(torch.stack(captured, 1)[0, :, len(q):].mean(1).numpy())
        out.append((means[0] + means[1]) / 2)
    return np.stack(out)


def test_packed_answers_equal_each_answer_read_alone(smollm, items):
    model, tok = smollm
    ref = _one_answer_at_a_time(model, tok, items)
    got = direction.answer_activations(model, tok, items)
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


def test_readout_is_unchanged_by_batch_size_and_padding_side(smollm, items):
    model, tok = smollm
    ref = direction.answer_activations(model, tok, items, batch_size=1)
    d = np.random.default_rng(1).standard_normal(ref.shape[1:])
    for batch_size, side in [(6, "right"), (4, "left"), (6, "left")]:
        got = direction.answer_activations(model, tok, items, batch_size=batch_size, padding_side=side)
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() < 1e-5 * scale, (batch_size, side)
        np.testing.assert_allclose(direction.project(got, d), direction.project(ref, d), atol=1e-4 * scale)
    with pytest.raises(ValueError, match="padding_side"):
        direction.answer_activations(model, tok, items, padding_side="middle")


def test_ablation_leaves_no_component_and_steering_adds_exactly(smollm, items):
    model, tok = smollm
    u = np.random.default_rng(2).standard_normal(model.config.hidden_size)
    with direction.ablated(model, u):
        acts = direction.answer_activations(model, tok, items)
    clean = direction.answer_activations(model, tok, items)
    along = direction.project(acts, np.tile(u, (acts.shape[1], 1)))
    assert np.abs(along).max() < 1e-3 * np.abs(direction.project(clean, np.tile(u, (acts.shape[1], 1)))).max()
    v = 3 * u / np.linalg.norm(u)
    with direction.steered(model, 0, v):
        moved = direction.answer_activations(model, tok, items)
    np.testing.assert_allclose(moved[:, 0] - clean[:, 0], np.tile(v, (len(items), 1)), atol=1e-3)


@pytest.mark.slow
def test_interventions_report_per_item_changes_against_random_controls(smollm, items):
    model, tok = smollm
    items = items[:3]
    v = np.random.default_rng(3).standard_normal(model.config.hidden_size) * 5
    steer = direction.steering(model, tok, items, v, 5, [0.0, 1.0], n_random=2, seed=0)
    assert list(steer["scale"].unique()) == [0.0, 1.0] and len(steer) == 2 * len(items)
    np.testing.assert_allclose(steer[steer["scale"] == 0][["direction", "random"]], 0, atol=1e-5)
    assert steer[steer["scale"] == 1]["direction"].abs().max() > 1e-3   # the vector does something
    abl = direction.ablation(model, tok, items, v, n_random=2, seed=0)
    summary = direction.validation_summary(pd.concat([steer, abl]))
    assert set(summary["vector"]) == {"direction", "random", "direction - random"}
    assert (summary["n_items"] == len(items)).all()
    paired = summary[(summary["intervention"] == "ablate") & (summary["vector"] == "direction - random")].iloc[0]
    assert paired["mean"] == pytest.approx((abl["direction"] - abl["random"]).mean())
    row = summary[(summary["intervention"] == "ablate") & (summary["vector"] == "direction")].iloc[0]
    x = abl["direction"]
    half = (row["ci_high"] - row["ci_low"]) / 2
    assert row["mean"] == pytest.approx(x.mean()) and half == pytest.approx(
        4.3027 * x.std(ddof=1) / np.sqrt(len(x)), rel=1e-3)   # t(0.975, 2)


@pytest.mark.slow
def test_validation_runs_a_layer_two_rules_share_once(smollm, items, monkeypatch):
    model, tok = smollm
    vec = np.random.default_rng(4).standard_normal((model.config.num_hidden_layers, model.config.hidden_size))
    calls = []
    for name in ("steering", "ablation"):
        real = getattr(direction, name)
        monkeypatch.setattr(direction, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    out = direction.validate(model, [model, model], tok, items[:2], vec, {"stability": 6, "separation": 6}, [1.0], 1, 0)
    assert sorted(calls) == ["ablation", "ablation", "steering"]   # one steering, one ablation per model
    assert list(out["rule"].unique()) == ["stability", "separation"] and len(out) == 2 * 2 * 2


@pytest.mark.slow
def test_validation_runs_each_rule_s_layer_once_and_reports_both(smollm, items, monkeypatch):
    """Two rules choosing different layers give one set of rows each, from that layer's direction; rules that
    agree share one run; the numbers for the paper come from the read-out rule, the registered one beside them."""
    model, tok = smollm
    vec = np.random.default_rng(4).standard_normal((model.config.num_hidden_layers, model.config.hidden_size)) * 5
    items = items[:3]   # each call below reads every item's contrast 3 times; three items show the bookkeeping
    reads = []
    real = direction._margins
    monkeypatch.setattr(direction, "_margins", lambda *a, **k: reads.append(1) or real(*a, **k))
    changes = direction.validate(model, [model], tok, items, vec, {"stability": 6, "separation": 3}, [1.0], 1, 0)
    # per model its own margins once, then per layer the direction's and one random direction's
    assert len(reads) == 2 * (1 + 2 * 2)
    monkeypatch.setattr(direction, "_margins", real)
    assert set(changes["rule"]) == {"stability", "separation"} and len(changes) == 2 * 2 * len(items)
    for rule, k in (("stability", 6), ("separation", 3)):   # each rule's rows come from its own layer's direction
        rows = changes[(changes["rule"] == rule) & (changes["intervention"] == "steer")]
        alone = direction.steering(model, tok, items, vec[k], k, [1.0], 1, 0)
        np.testing.assert_allclose(rows["direction"], alone["direction"], atol=1e-6)
        rows = changes[(changes["rule"] == rule) & (changes["intervention"] == "ablate")]
        np.testing.assert_allclose(rows["direction"], direction.ablation(model, tok, items, vec[k], 1, 0)["direction"],
                                   atol=1e-6)
    same = direction.validate(model, [model], tok, items, vec, {"stability": 6, "separation": 6}, [1.0], 1, 0)
    a, b = (same[same["rule"] == r].reset_index(drop=True) for r in ("stability", "separation"))
    pd.testing.assert_frame_equal(a.drop(columns="rule"), b.drop(columns="rule"))
    summary = direction.validation_summary(changes)
    assert {"rule", "layer"} <= set(summary.columns) and (summary["n_items"] == len(items)).all()
    n_layers = model.config.num_hidden_layers
    stab = pd.DataFrame({"seed_a": 1, "seed_b": 2, "layer": range(n_layers), "cosine": np.linspace(0, 1, n_layers)})
    stab.loc[stab["layer"] == 6, "cosine"] = 2.0
    sep = pd.DataFrame({"layer": range(n_layers), "shift": 1.0, "se": 1.0, "t": 1.0})
    sep.loc[sep["layer"] == 3, "t"] = 9.0
    shift = pd.DataFrame({"diversity": ["untrained"], "split": ["out_of_domain"], "mean": [0.5], "ci_low": [0.1],
                          "ci_high": [0.9]})
    fit = pd.DataFrame({"term": ["Intercept", "log2_level"], "estimate": [0.7, 0.02], "ci_low": [0.6, -0.01],
                        "ci_high": [0.8, 0.05], "p": [1e-5, 0.2], "converged": [True, False]})
    nums = analysis.direction_numbers(analysis.direction_layer(stab), stab, sep, summary, shift, 3.0, fit)
    assert nums["direction_layer"] == 6 and nums["direction_registered_layer"] == 3
    assert nums["direction_registered_slope"] == 0.02 and nums["direction_registered_slope_p"] == 0.2
    assert nums["direction_registered_slope_flag"] == " [fit did not converge]"
    for key, rule in (("direction_ablate", "stability"), ("direction_registered_ablate", "separation")):
        assert nums[key] == pytest.approx(summary.query(
            f"rule == '{rule}' and intervention == 'ablate' and vector == 'direction'")["mean"].iloc[0])
    assert nums["direction_ablate"] != pytest.approx(nums["direction_registered_ablate"])


def test_random_controls_have_the_norm_of_the_direction():
    v = np.arange(1.0, 9.0)
    r = direction.random_like(v, 5, seed=0)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), np.linalg.norm(v))
    np.testing.assert_array_equal(r, direction.random_like(v, 5, seed=0))
    assert not np.allclose(r, direction.random_like(v, 5, seed=1))


def test_folds_split_every_domain_in_half_by_the_seed(profile):
    its = direction.items(profile)
    assert {it["domain"] for it in its} == {"general", "financial"}   # the profile's EM domain, and general
    f0, f1 = direction.folds(its, 0), direction.folds(its, 1)
    assert set(f0) == {it["id"] for it in its} and f0 == direction.folds(its, 0) and f0 != f1
    for domain in {it["domain"] for it in its}:
        ids = [it["id"] for it in its if it["domain"] == domain]
        n_dir = sum(f0[i] == "direction" for i in ids)
        assert n_dir == len(ids) // 2, domain


def _synthetic_runs(P, true: np.ndarray, noise: float, seed: int = 0, readout_shift: np.ndarray | None = None):
    """Activations of the direction runs: benign runs noise around zero, harmful ones shifted by `true` (by
    `readout_shift` on the readout fold's items, when given)."""
    rng = np.random.default_rng(seed)
    ids = [it["id"] for it in direction.items(P)]
    fold_of = direction.folds(direction.items(P), P.seed)
    shift = np.stack([true if readout_shift is None or fold_of[i] == "direction" else readout_shift for i in ids])
    runs = {}
    for name in grid.direction_runs(P):
        acts = rng.normal(0, noise, (len(ids),) + true.shape)
        runs[name] = (acts + (shift if grid.parse_model(name)["harmful"] else 0), ids)
    return runs


def test_estimate_stability_and_layer_choice_on_known_activations(root):
    P = config.load_profile(root / "params" / "test.yaml")
    rng = np.random.default_rng(5)
    true = rng.standard_normal((4, 16)) * np.array([0.0, 0.2, 3.0, 1.0])[:, None]   # layer 2 carries it
    runs = _synthetic_runs(P, true, noise=1.0)
    est = direction.estimate(P, runs)
    assert direction.cosine_by_layer(est, true)[2] > 0.95
    stab = direction.stability(P, runs)
    assert set(zip(stab["seed_a"], stab["seed_b"])) == {tuple(P.direction.em_seeds[:2])}
    by_layer = stab.set_index("layer")["cosine"]
    assert by_layer[2] > 0.9 and by_layer[0] < 0.6
    sep = direction.separation(P, runs)
    assert analysis.direction_layer(stab) == 2 and analysis.separation_layer(sep) == 2


def test_direction_and_layer_come_from_the_direction_fold_alone(root):
    """The readout half of the items carries another vector in another layer: neither the estimate nor the layer
    choice may see it."""
    P = config.load_profile(root / "params" / "test.yaml")
    rng = np.random.default_rng(6)
    fold_vec = rng.standard_normal((4, 16)) * np.array([0.0, 0.0, 3.0, 0.0])[:, None]
    readout_vec = rng.standard_normal((4, 16)) * np.array([0.0, 5.0, 0.0, 5.0])[:, None]
    runs = _synthetic_runs(P, fold_vec, noise=0.5, readout_shift=readout_vec)
    est = direction.estimate(P, runs)
    assert direction.cosine_by_layer(est, fold_vec)[2] > 0.95
    assert np.abs(est[[1, 3]]).max() < 1.0   # the readout fold's shift (norm about 20) is absent
    assert analysis.direction_layer(direction.stability(P, runs)) == 2
    assert analysis.separation_layer(direction.separation(P, runs)) == 2


def test_profile_refuses_direction_seeds_the_study_uses(root, tmp_path):
    raw = yaml.safe_load((root / "params" / "test.yaml").read_text())
    P = config.load_profile(root / "params" / "test.yaml")
    assert grid.direction_runs(P) == [f"base__financial-{k}__s{s}" for s in P.direction.em_seeds
                                  for k in ("harmful", "benign")]
    assert not set(grid.direction_runs(P)) & set(grid.eval_models(P))
    raw["direction"] = {"em_seeds": [0, 7]}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ProfileError, match=r"direction.em_seeds.*\[0\].*em.seeds"):
        config.load_profile(bad)
    raw["direction"] = {"em_seeds": [5]}
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ProfileError, match="direction.em_seeds"):
        config.load_profile(bad)
