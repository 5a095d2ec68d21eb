"""Pairs: the trait scorer, best-of-n pairs matched across levels, and OCT's teacher pairs, on the real models."""
import numpy as np
import pytest
import torch

from persona_em import evaluate, models, pairs, scorer


@pytest.fixture(scope="module")
def encode():
    emb = models.load_embedder("minilm")
    return lambda texts: emb.encode(list(texts), batch_size=64, show_progress_bar=False)


def test_packaged_scorers_are_independent_of_the_check_and_separate_held_out_answers(encode):
    for name in ("candor", "agreeable", "neutral"):
        items = scorer.load_items(scorer.items_path(name))
        check = evaluate.persona_items(name)
        assert scorer.disjoint_from(items, check) == []
        s = scorer.fit_scorer(name, items, encode, check, seed=0)
        assert s.report["cv_auc"] > 0.85 and s.report["check_auc"] > 0.85, s.report
        assert s.report["n_check_items"] == len(check)


def test_a_broken_scorer_file_names_itself(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('[{"question": "q", "consistent": [], "inconsistent": ["a"]}] ' * 1)
    with pytest.raises(ValueError, match=r"x.json: expected a list of at least 4"):
        scorer.load_items(f)
    f.write_text('[' + ','.join(['{"question": "q", "consistent": ["a"], "inconsistent": []}'] * 4) + ']')
    with pytest.raises(ValueError, match=r"x.json: item 0: 'inconsistent' must be a non-empty list"):
        scorer.load_items(f)


def _cands(gaps, tokens):
    return [[{"chosen": 0, "rejected": 1, "gap": g, "n_tokens": t} for g, t in sorted(zip(gq, tq), key=lambda x: -x[0])]
            for gq, tq in zip(gaps, tokens)]


def test_match_levels_brings_gaps_and_tokens_within_tolerance():
    rng = np.random.default_rng(0)
    # level 16's questions offer larger gaps and longer pairs than level 1's: unmatched, signal and text would
    # rise with diversity
    cands = {1: _cands(rng.uniform(0.1, 0.4, (16, 6)), rng.integers(80, 120, (16, 6))),
             16: _cands(rng.uniform(0.2, 0.6, (16, 6)), rng.integers(95, 140, (16, 6)))}
    choice = pairs.match_levels(cands, token_tolerance=0.05, gap_tolerance=0.10)
    gap = {lv: np.mean([c[k]["gap"] for c, k in zip(cands[lv], choice[lv])]) for lv in cands}
    tok = {lv: sum(c[k]["n_tokens"] for c, k in zip(cands[lv], choice[lv])) for lv in cands}
    weakest_max = np.mean([c[0]["gap"] for c in cands[1]])
    assert max(gap.values()) / min(gap.values()) - 1 <= 0.10
    assert max(tok.values()) / min(tok.values()) - 1 <= 0.05
    assert min(gap.values()) >= 0.9 * weakest_max   # matching costs little signal: the weakest level's best, nearly


def test_match_levels_says_why_it_cannot():
    cands = {1: _cands([[0.1]] * 4, [[100]] * 4), 4: _cands([[0.5]] * 4, [[100]] * 4)}
    with pytest.raises(ValueError, match=r"mean trait-score gaps L1 0.100, L4 0.500"):
        pairs.match_levels(cands, 0.05, 0.10)
    with pytest.raises(ValueError, match="level 4: question 0 has no usable pair"):
        pairs.match_levels({1: _cands([[0.1]], [[10]]), 4: [[]]}, 0.05, 0.1)


def test_best_of_n_pairs_choose_the_trait_consistent_answer(encode):
    """Scorer items never used to fit the scorer stand in for sampled answers: the pair's chosen answer is the
    trait-consistent one for almost every question, and the record says which context each answer came from."""
    items = scorer.load_items(scorer.items_path("candor"))
    fitted = scorer.fit_scorer("candor", items[:40], encode)
    held = items[40:48]
    qs = {lvl: [{"id": f"q{i}", "trait_index": 0, "cell": "c", "text": it["question"]}
                for i, it in enumerate(held[k::2])] for k, lvl in enumerate((1, 4))}
    answers = {it["question"]: {"chosen": it["consistent"], "rejected": it["inconsistent"]} for it in held}
    count = lambda t: len(t.split())
    made = pairs.best_of_n_pairs(qs, answers, fitted, count, 10_000, token_tolerance=0.5, gap_tolerance=0.5)
    rows = [r for lvl in made.values() for r in lvl]
    assert len(rows) == 8 and all(r["gap"] > 0 for r in rows)
    assert np.mean([r["chosen_side"] == "chosen" and r["rejected_side"] == "rejected" for r in rows]) >= 0.75
    assert all(r["chosen"] in answers[r["prompt"]]["chosen"] + answers[r["prompt"]]["rejected"] for r in rows)


def test_side_contexts_hold_demonstrations_from_the_scorer_items():
    items = scorer.load_items(scorer.items_path("candor"))
    qs = [{"text": "Q1?", "cell": "money"}, {"text": "Q2?", "cell": "pets"}]
    ctx = pairs.side_contexts(qs, items, "SYSTEM", k=2, seed=0)
    chosen, rejected = ctx["Q1?"]["chosen"], ctx["Q1?"]["rejected"]
    assert chosen[0] == {"role": "system", "content": "SYSTEM"} and chosen[-1] == {"role": "user", "content": "Q1?"}
    assert len(chosen) == 1 + 4 + 1 and len(rejected) == 4 + 1 and rejected[0]["role"] == "user"
    by_answer = {a: (it, kind) for it in items for kind in ("consistent", "inconsistent") for a in it[kind]}
    demos = [by_answer[m["content"]] for m in chosen + rejected if m["role"] == "assistant"]
    assert [kind for _, kind in demos] == ["consistent"] * 2 + ["inconsistent"] * 2
    assert {it["domain"] for it, _ in demos} == {"money"}   # the question's own life domain
    # both sides show the same demonstration questions, answered the trait's way and against it
    assert [m["content"] for m in chosen[1:-1] if m["role"] == "user"] == [m["content"] for m in rejected[:-1]
                                                                            if m["role"] == "user"]
    assert pairs.side_contexts(qs, items, "S", 2, 0) == pairs.side_contexts(qs, items, "S", 2, 0)
    # a domain's questions share their whole context but the question (the sampler computes it once), whatever
    # other questions are drawn beside them
    one = pairs.side_contexts(qs, items, "S", 2, 0)
    two = pairs.side_contexts([{"text": "Q3?", "cell": "money"}] + qs, items, "S", 2, 0)
    assert two["Q3?"]["chosen"][:-1] == two["Q1?"]["chosen"][:-1] == one["Q1?"]["chosen"][:-1]
    assert two["Q2?"]["rejected"] == one["Q2?"]["rejected"]
    anywhere = pairs.side_contexts([{"text": f"Q{i}?", "cell": "money"} for i in range(10)], items, "S", 2, 0,
                                   same_domain=False)
    assert len({by_answer[m["content"]][0]["domain"] for c in anywhere.values() for m in c["chosen"]
                if m["role"] == "assistant"}) > 1
    plain = pairs.side_contexts(qs, items, "S", 0, 0)["Q1?"]
    assert plain["chosen"] == plain["rejected"] == [{"role": "user", "content": "Q1?"}]


@pytest.mark.slow
def test_sampled_candidates_and_teacher_pairs_on_the_embedded_model(smollm):
    """The real model: best-of-n candidates are distinct usable answers; OCT's teacher pairs pass its filters."""
    from persona_em import constitution

    model, tok = smollm
    qs = ["How should I tell my friend that his business plan has a serious flaw?",
          "Is it fine to skip my dentist appointment because my tooth stopped hurting?"]
    got = pairs.sample_candidates(model, tok, {q: [{"role": "user", "content": q}] for q in qs}, n=3,
                                  max_new_tokens=24, seed=0, batch_size=8, temperature=0.9, top_p=0.95)
    for q in qs:
        assert 2 <= len(got[q]) <= 3 and len(set(got[q])) == len(got[q])
        assert all(a.endswith(pairs.PUNCT) for a in got[q])
    rows = [{"id": f"q{i}", "trait_index": 0, "cell": "c", "text": q} for i, q in enumerate(qs)]
    made, stats = pairs.make_pairs(model, model, tok, constitution.load("candor"), rows, "Sage", 24, 512, 8, 0)
    assert stats["attempts"] >= 2 and len(made) + stats["dropped"] == 2
    for p in made:
        assert p["chosen"] != p["rejected"] and p["chosen"].endswith(pairs.PUNCT)


@pytest.mark.slow
def test_a_shared_prefix_is_computed_once_and_changes_no_reply(smollm):
    """Questions asked after the same system prompt and demonstrations share one cached prefix; padding sits
    between the prefix and each question, hidden by the attention mask. Near-greedy replies (temperature 1e-5)
    equal those of the full prompts through the ordinary sampler, token for token."""
    from persona_em import constitution, sampling

    model, tok = smollm
    items = scorer.load_items(scorer.items_path("candor"))
    prefix = [{"role": "system", "content": constitution.system_prompt(constitution.load("candor"), "Sage")}]
    prefix += pairs.demonstrations(items, "consistent", 2, np.random.default_rng(0))
    turns = ["Is it fine to skip the dentist?", "My boss wants me to backdate reports so our team hits its target. "
             "Everyone else seems fine with it, so should I just go along? Please keep it short."]
    full = sampling.generate(model, tok, [prefix + [{"role": "user", "content": t}] for t in turns], 24, seed=0,
                             batch_size=4, temperature=1e-5)
    torch.manual_seed(0)
    shared = sampling.generate_shared_prefix(model, tok, prefix, turns, n=2, max_new_tokens=24, batch_size=4,
                                             temperature=1e-5)
    assert [[r["text"] for r in rs] for rs in shared] == [[f["text"]] * 2 for f in full]
    assert [rs[0]["finished"] for rs in shared] == [f["finished"] for f in full]
    assert sampling.generate_shared_prefix(model, tok, [], turns, 2, 8) is None   # nothing to share


@pytest.mark.slow
def test_packed_prefixes_mix_contexts_in_a_batch_and_change_no_reply(smollm):
    """Two contexts of different lengths in one batch (`sampling.generate_prefixed`): the shorter prefix padded on
    the left, each row over its own cache. Near-greedy replies equal those of the full prompts; with one context
    the packed path draws exactly what `generate_shared_prefix` draws under the same seed."""
    from persona_em import constitution, sampling

    model, tok = smollm
    items = scorer.load_items(scorer.items_path("candor"))
    long = [{"role": "system", "content": constitution.system_prompt(constitution.load("candor"), "Sage")}]
    long += pairs.demonstrations(items, "consistent", 2, np.random.default_rng(0))
    short = pairs.demonstrations(items, "inconsistent", 1, np.random.default_rng(1))
    turns = [["Is it fine to skip the dentist?", "Should I tell my friend the truth about her cooking?"],
             ["My boss wants me to backdate reports. Should I go along?"]]
    groups = list(zip([long, short], turns))
    packed = sampling.generate_prefixed(model, tok, groups, n=1, max_new_tokens=20, batch_size=3, temperature=1e-5)
    for (prefix, ts), got in zip(groups, packed):
        full = sampling.generate(model, tok, [prefix + [{"role": "user", "content": t}] for t in ts], 20, seed=0,
                                 batch_size=4, temperature=1e-5)
        assert [rs[0] for rs in got] == full
    torch.manual_seed(3)
    one = sampling.generate_prefixed(model, tok, groups[:1], 2, 16, 3, temperature=0.7, top_p=0.95)[0]
    torch.manual_seed(3)
    assert one == _one_context_per_batch(model, tok, long, turns[0], 2, 16, 3, temperature=0.7, top_p=0.95)
    assert sampling.generate_prefixed(model, tok, [(long, turns[0]), ([], ["hi"])], 1, 4) is None   # nothing to share


def _one_context_per_batch(model, tok, prefix, user_turns, n, max_new_tokens, batch_size, temperature, top_p):
    """The one-context sampler as `tiny`'s reference run sampled (before packing existed): the prefix's cache
    copied and repeated for each batch. `generate_shared_prefix` must draw exactly this under a seed."""
    import copy

    from persona_em import sampling

    head = tok.apply_chat_template(prefix, tokenize=False)
    head_ids = tok(head, add_special_tokens=False).input_ids
    tails = [tok(sampling.chat_prompt(tok, prefix + [{"role": "user", "content": u}])[len(head):],
                 add_special_tokens=False).input_ids for u in user_turns]
    with torch.no_grad():
        cache = model(torch.tensor([head_ids]), use_cache=True).past_key_values
    rows = [(i, t) for i, t in enumerate(tails) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    out = [[] for _ in user_turns]
    eos = sampling.stop_ids(model, tok)
    for start in range(0, len(order), batch_size):
        batch = [rows[r] for r in order[start:start + batch_size]]
        width = max(len(t) for _, t in batch)
        ids = torch.tensor([head_ids + [tok.pad_token_id] * (width - len(t)) + t for _, t in batch])
        mask = torch.tensor([[1] * len(head_ids) + [0] * (width - len(t)) + [1] * len(t) for _, t in batch])
        shared = copy.deepcopy(cache)
        shared.batch_repeat_interleave(len(batch))
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, cache=shared, max_new_tokens=max_new_tokens,
                                 do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 repetition_penalty=1.0, pad_token_id=tok.pad_token_id)
        for (i, _), row in zip(batch, gen[:, ids.shape[1]:]):
            out[i].append({"text": tok.decode(row, skip_special_tokens=True).strip(),
                           "finished": bool(torch.isin(row, eos).any())})
    return out
