"""The independent variable: diversity measures and diversity-controlled subsets (method 6.6, 7)."""
import numpy as np
import pytest

from persona_em import diversity, questions


def test_vendi_bounds_and_naive_agreement():
    rng = np.random.default_rng(0)
    same = np.tile(rng.normal(size=(1, 16)), (10, 1))
    assert diversity.vendi(same) == pytest.approx(1.0, abs=1e-6)
    assert diversity.vendi(np.eye(10)) == pytest.approx(10.0, abs=1e-6)
    x = rng.normal(size=(40, 8))  # n > d: the d x d route
    u = diversity.unit(x)
    lam = np.linalg.eigvalsh(u @ u.T / len(u))
    lam = lam[lam > 1e-12]
    assert diversity.vendi(x) == pytest.approx(np.exp(-(lam * np.log(lam)).sum()), rel=1e-9)


def test_mean_cosine_distance_matches_pairwise():
    x = np.random.default_rng(1).normal(size=(30, 5))
    u = diversity.unit(x)
    sims = u @ u.T
    naive = 1 - sims[~np.eye(30, dtype=bool)].mean()
    assert diversity.mean_cosine_distance(x) == pytest.approx(naive, rel=1e-9)


def test_distinct_n_and_cells():
    assert diversity.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert diversity.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert diversity.cell_entropy(["x", "x"]) == 0.0
    assert diversity.cell_entropy(["x", "y"]) == pytest.approx(np.log(2))


def test_pool_is_large_distinct_and_deterministic():
    assert questions.n_combinations() >= 1000
    a = questions.build_pool("candor", 0, "t", 1200, seed=3)
    b = questions.build_pool("candor", 0, "t", 1200, seed=3)
    assert a == b and len({q["text"] for q in a}) == 1200
    assert len({q["cell"] for q in a}) == len(questions.situations()["domains"])
    assert questions.build_pool("candor", 0, "t", 50, seed=4) != questions.build_pool("candor", 0, "t", 50, seed=3)


@pytest.fixture(scope="module")
def level_subsets(smollm):
    _, tok = smollm
    pool = questions.build_pool("candor", 0, "t", 800, seed=0)
    count = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
    return diversity.diversity_subsets(pool, count, [1, 2, 4, 16], 32, 0.05, seed=0)


def test_levels_equal_n_tokens_and_trait(level_subsets):
    tokens = {lvl: sum(q["n_tokens"] for q in qs) for lvl, qs in level_subsets.items()}
    assert {len(qs) for qs in level_subsets.values()} == {32}
    assert max(tokens.values()) / min(tokens.values()) - 1 <= 0.05
    for lvl, qs in level_subsets.items():
        assert len({q["cell"] for q in qs}) == lvl
        assert {q["trait"] for q in qs} == {"t"}
    # nested: a lower level's cells are among a higher level's
    cells = {lvl: {q["cell"] for q in qs} for lvl, qs in level_subsets.items()}
    assert cells[1] <= cells[2] <= cells[4] <= cells[16]


def test_measured_vendi_rises_with_level(level_subsets):
    from persona_em import models

    emb = models.load_embedder("minilm")
    v = [diversity.vendi(emb.encode([q["text"] for q in level_subsets[lvl]])) for lvl in (1, 2, 4, 16)]
    assert all(b > a for a, b in zip(v, v[1:])), v


@pytest.mark.slow
def test_same_machinery_on_a_clustered_pool(smollm):
    """A teacher-expanded pool has no template cells: k-means clusters take their place."""
    from persona_em import models

    _, tok = smollm
    texts = [q["text"] for q in questions.build_pool("x", 0, "t", 600, seed=5)]
    emb = models.load_embedder("minilm").encode(texts)
    labels = diversity.clusters(emb, k=8, seed=0)
    pool = questions.labelled_pool("x", 0, "t", texts, [f"cluster{label:02d}" for label in labels])
    count = lambda t: len(tok(t, add_special_tokens=False).input_ids)  # noqa: E731
    subsets = diversity.diversity_subsets(pool, count, [1, 2, 8], 16, 0.05, seed=0)
    index = {t: i for i, t in enumerate(texts)}
    v = [diversity.vendi(emb[[index[q["text"]] for q in subsets[lvl]]]) for lvl in (1, 2, 8)]
    assert [len({q["cell"] for q in subsets[lvl]}) for lvl in (1, 2, 8)] == [1, 2, 8]
    assert v[0] < v[1] < v[2], v
