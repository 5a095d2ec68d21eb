"""The top-k nucleus sampler (`hardware.nucleus: topk`): the nucleus transformers' own top-p keeps, the draws in
proportion to probability within it, seeded, and on the real model the replies the greedy path gives when the
nucleus is one token."""
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from persona_em import sampling
from persona_em.config import HardwareConfig


def _transformers_nucleus(scores, temperature, top_p):
    """transformers' own nucleus, computed in float64 (in float32 its last token can differ from exact
    arithmetic's, about once in 10^5 rows: the order of the sum)."""
    kept = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.double()))
    return torch.isfinite(kept)


@pytest.mark.parametrize("temperature,top_p,spread", [(0.7, 0.95, 3.0), (1.0, 0.9, 1.0), (1.0, 0.5, 0.05)])
def test_the_nucleus_is_the_one_transformers_keeps(temperature, top_p, spread):
    """On the embedded model's vocabulary size; spread 0.05 makes nuclei of thousands of tokens, so the top k
    must widen (k starts at 256)."""
    scores = torch.randn(16, 49152, generator=torch.Generator().manual_seed(1)) * spread
    ids, p = sampling.TopKNucleus(temperature, top_p).nucleus(scores)
    ours = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ids, p > 0)
    want = _transformers_nucleus(scores, temperature, top_p)
    assert torch.equal(ours, want)
    if spread < 0.1:
        assert want.sum(-1).min() > 256   # the widening was exercised
    # the probabilities are the tempered softmax's
    full = torch.softmax(scores.double() / temperature, -1).gather(1, ids)
    assert torch.allclose(p[p > 0], full[p > 0], rtol=1e-9, atol=0)


def test_a_row_s_nucleus_and_draw_do_not_depend_on_its_batch():
    """Rows whose nucleus ends inside the top k next to rows ranked 4, 16, 64 and 192 times wider: each row's
    nucleus, probabilities and draw are the ones it gets in a batch of its own (two copies of it: a one-row sum
    over the vocabulary may split differently across threads), bit for bit; the rows ranked less widely are
    padded with their last token at probability 0, and the scores handed in are left as they were."""
    g = torch.Generator().manual_seed(3)
    spreads = torch.tensor([8.0, 2.7, 8.0, 2.5, 0.5, 2.0])[:, None]
    scores = (torch.randn(6, 49152, generator=g) * spreads).bfloat16().float()   # bf16 logits: many ties
    before = scores.clone()
    proc = sampling.TopKNucleus(0.7, 0.95)
    proc.nucleus(scores[:2])   # a buffer of another shape first: it is replaced, not reused
    ids, p = proc.nucleus(scores)
    torch.manual_seed(7)
    u = torch.rand(6, 1, dtype=torch.float64)
    torch.manual_seed(7)
    drawn = proc.pick(scores)
    assert torch.equal(scores, before)
    widths = set()
    for r in range(6):
        alone_ids, alone_p = (x[0] for x in sampling.TopKNucleus(0.7, 0.95).nucleus(scores[[r, r]]))
        k = len(alone_ids)
        widths.add(k)
        assert torch.equal(ids[r, :k], alone_ids) and torch.equal(p[r, :k], alone_p)
        assert not p[r, k:].any() and (ids[r, k:] == alone_ids[-1]).all()
        cdf = alone_p.cumsum(0)   # the draw `pick` makes from the row alone, with the row's uniform number
        at = min(int(torch.searchsorted(cdf, u[r] * cdf[-1], right=True)), int((cdf < cdf[-1]).sum()))
        assert drawn[r] == alone_ids[at]
    assert widths == {256, 1024, 4096, 16384, 49152}


def test_draws_follow_the_renormalised_nucleus():
    """20,000 draws over an 8-token vocabulary: tokens outside the nucleus never come, the others in proportion
    to their probability (chi-square; the seed fixes the draws, so this cannot flake)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -6.0]])
    proc = sampling.TopKNucleus(1.0, 0.9, k=2)   # k=2 < the 4-token nucleus: the widening path
    torch.manual_seed(0)
    draws = torch.cat([proc(None, logits.expand(1000, -1)).argmax(-1) for _ in range(20)])
    counts = np.bincount(draws.numpy(), minlength=8)
    keep = _transformers_nucleus(logits, 1.0, 0.9)[0].numpy()
    assert counts[~keep].sum() == 0 and keep.sum() == 4
    p = torch.softmax(logits, -1)[0].double().numpy()[keep]
    assert stats.chisquare(counts[keep], p / p.sum() * counts.sum()).pvalue > 0.01
    # a wrong sampler (e.g. uniform over the nucleus) is far outside
    assert stats.chisquare(counts[keep], np.full(keep.sum(), counts.sum() / keep.sum())).pvalue < 1e-6


def test_top_p_one_samples_the_whole_vocabulary():
    logits = torch.tensor([[0.0, 0.0, -0.7, -30.0]])
    torch.manual_seed(0)
    draws = sampling.TopKNucleus(1.0, 1.0)(None, logits.expand(20000, -1)).argmax(-1)
    counts = np.bincount(draws.numpy(), minlength=4)
    p = torch.softmax(logits, -1)[0].double().numpy()
    assert stats.chisquare(counts[:3], p[:3] / p[:3].sum() * counts.sum()).pvalue > 0.01


def test_a_near_zero_temperature_picks_the_argmax_wherever_it_is():
    """At temperature 1e-3 every other token's probability underflows to 0 in the unsorted vocabulary of top-p 1
    (and in the nucleus): the draw is the most likely token, not one whose probability is 0."""
    logits = torch.zeros(3, 10)
    logits[0, 7], logits[1, 0], logits[2, 9] = 5.0, 5.0, 5.0
    for top_p in (1.0, 0.9):
        torch.manual_seed(0)
        assert sampling.TopKNucleus(1e-3, top_p)(None, logits).argmax(-1).tolist() == [7, 0, 9]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        sampling.TopKNucleus(0.0, 0.9)
    with pytest.raises(ValueError, match="nucleus must be"):
        sampling.sampling_args("fast", 1.0, 1.0)
    with pytest.raises(ValueError):
        HardwareConfig(nucleus="fast")


CONVS = [[{"role": "user", "content": "What is your favourite colour?"}],
         [{"role": "user", "content": "I found a wallet on the street. What should I do?"}],
         [{"role": "user", "content": "Say hello."}]]


@pytest.mark.slow
def test_on_the_model_a_one_token_nucleus_is_greedy_and_seeds_repeat(smollm):
    model, tok = smollm
    greedy = []
    for conv in CONVS:
        enc = tok(sampling.chat_prompt(tok, conv), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, repetition_penalty=1.0, pad_token_id=tok.pad_token_id)
        greedy.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
    one = sampling.generate(model, tok, CONVS, 16, seed=0, batch_size=3, temperature=1.0, top_p=1e-9,
                            nucleus="topk")
    assert [o["text"] for o in one] == greedy
    a = sampling.generate(model, tok, CONVS, 16, seed=0, batch_size=2, temperature=0.7, top_p=0.95, nucleus="topk")
    b = sampling.generate(model, tok, CONVS, 16, seed=0, batch_size=2, temperature=0.7, top_p=0.95, nucleus="topk")
    c = sampling.generate(model, tok, CONVS, 16, seed=1, batch_size=2, temperature=0.7, top_p=0.95, nucleus="topk")
    assert a == b and a != c


@pytest.mark.slow
def test_the_lean_decoding_loop_draws_what_generate_draws(smollm, monkeypatch):
    """`decode_cached` against transformers' `generate` with the same top-k nucleus, token for token under one
    seed: flat prompts (padded) and packed shared prefixes, each row over its own copy of its prefix (padded and,
    in the last batch, unpadded: transformers then drops the mask and shares the key/value heads in the kernel),
    in float32 and under bf16 autocast."""
    model, tok = smollm
    assert sampling.lean_decoding(model)
    monkeypatch.setattr(sampling, "cascade_decoding", lambda m, nucleus: False)   # decode_shared: the next tests
    convs = CONVS + [[{"role": "user", "content": "Tell me about rivers and why they flood."}]]
    pre1 = [{"role": "system", "content": "You are Sage, candid."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}]
    pre2 = [{"role": "system", "content": "You are Sage, a candid assistant who tells the truth even when it hurts."}]
    groups = [(pre1, ["Is my poem good?", "Should I quit my job to travel the world for a year?"]),
              (pre2, ["What is 2+2?", "Why is the sky blue?"])]
    for autocast in (False, True):
        got = {}
        for lean in (True, False):
            monkeypatch.setattr(sampling, "lean_decoding", lambda m, lean=lean: lean)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                flat = sampling.generate(model, tok, convs, 24, seed=0, batch_size=4, temperature=0.7, top_p=0.95,
                                         nucleus="topk")
                torch.manual_seed(3)
                packed = sampling.generate_prefixed(model, tok, groups, 3, 24, 5, 0.9, 0.95, nucleus="topk")
            got[lean] = flat, packed
        assert got[True] == got[False], f"autocast {autocast}"
        assert len({r["text"] for r in got[True][0]}) == len(convs)   # real, different replies
        monkeypatch.undo()
        monkeypatch.setattr(sampling, "cascade_decoding", lambda m, nucleus: False)


class _Forced:
    """A processor that records the scores it is handed and draws fixed tokens (so two loops whose scores differ
    in rounding still decode the same tokens and can be compared step by step)."""

    def __init__(self, tokens):
        self.tokens, self.seen = tokens, []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        out = torch.full_like(scores, float("-inf"))
        return out.index_put_((torch.arange(len(scores)), self.tokens[:, len(self.seen) - 1]), torch.tensor(0.0))


def _prefixed_rows(tok):
    """Two contexts of different lengths, their turns as token ids, and a batch of (context, turn) rows with
    repeated turns (a turn sampled twice), as `generate_prefixed` forms them."""
    pre1 = [{"role": "system", "content": "You are Sage, candid."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}]
    pre2 = [{"role": "system", "content": "You are Sage, a candid assistant who tells the truth even when it hurts."}]
    heads, tails = [], []
    for prefix, turns in ((pre1, ["Is my poem good?", "Should I quit my job to travel the world for a year?"]),
                          (pre2, ["What is 2+2?", "Why is the sky blue?", "Hm?"])):
        head = tok.apply_chat_template(prefix, tokenize=False)
        heads.append(tok(head, add_special_tokens=False).input_ids)
        tails.append([tok(sampling.chat_prompt(tok, prefix + [{"role": "user", "content": u}])[len(head):],
                          add_special_tokens=False).input_ids for u in turns])
    return heads, tails, [(0, 0), (0, 0), (0, 1), (1, 0), (1, 1), (1, 1), (1, 2)]


@pytest.mark.slow
def test_cascade_attention_changes_the_scores_by_rounding_only(smollm, monkeypatch):
    """`decode_shared` (each context's cache read once per group, each turn's prompt run once for its samples)
    over the contexts' packed pass (`Cascade.contexts`), as `generate_prefixed` runs them, against
    `decode_cached` over per-row copies of transformers' caches of the prefixes, both forced along the same
    tokens: in float32 the scores agree to 1e-3 (of logits about 30 in size); under bf16 autocast they stay as
    close to float32's as the exact path's own bf16 scores do (within twice its largest deviation), so the
    difference is rounding."""
    model, tok = smollm
    heads, tails, batch = _prefixed_rows(tok)
    once = list(dict.fromkeys(batch))
    eos, pad = sampling.stop_ids(model, tok), tok.pad_token_id
    forced = torch.randint(100, 40000, (len(batch), 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layers = {g: [(x.keys, x.values) for x in model(torch.tensor([h]), use_cache=True).past_key_values.layers]
                      for g, h in enumerate(heads)}
            exact = _Forced(forced)
            monkeypatch.setattr(sampling, "TopKNucleus", lambda t, p: exact)
            a = sampling.draw_over_prefixes(model, heads, tails, layers, batch, 16, pad, eos, "topk", 0.7, 0.95)
            monkeypatch.undo()
            cascade, run = _Forced(forced), sampling.Cascade(model)
            b = sampling.decode_shared(model, run.contexts(heads), [tails[g][i] for g, i in once],
                                       [g for g, _ in once], torch.tensor([once.index(r) for r in batch]), 16,
                                       cascade, eos, pad, run)
        assert torch.equal(a, forced) and torch.equal(b, forced)   # no row ended: every step compared
        seen[autocast] = exact.seen, cascade.seen
    (exact32, cascade32), (exact16, cascade16) = seen[False], seen[True]
    assert len(cascade32) == 16 and all((x - y).abs().max() < 1e-3 for x, y in zip(exact32, cascade32))
    bf16_alone = max((x - y).abs().max() for x, y in zip(exact16, exact32))
    assert 0 < bf16_alone and max((x - y).abs().max() for x, y in zip(cascade16, exact32)) < 2 * bf16_alone


@pytest.mark.parametrize("kind,batch", [
    ("llama", [(0, 0), (0, 1), (0, 1), (1, 0), (1, 1), (1, 1), (1, 2)]),
    ("mistral", [(0, 0), (0, 1), (0, 1), (1, 0), (1, 1), (1, 1), (1, 2)]),
    ("qwen2", [(0, 0), (0, 1), (0, 1), (1, 0), (1, 1), (1, 1), (1, 2)]),
    ("llama", [(1, 0), (0, 0), (1, 1), (0, 1), (0, 1), (1, 1), (1, 2)])])   # rows not in group order
def test_cascade_attention_on_every_decoder_type_the_lean_loop_admits(kind, batch, monkeypatch):
    """`decode_shared` over the contexts' packed pass against `decode_cached` over per-row copies of
    transformers' prefix caches on a small random decoder of each type (Qwen2's q/k/v biases included), forced
    along the same tokens, in float32: two contexts of different lengths, turns of different lengths, a turn
    sampled twice, rows in group order (each group's rows a slice) and not (gathered by index); the scores agree
    to rounding at every step."""
    model = _tiny_decoder(kind)
    gen = torch.Generator().manual_seed(3)
    heads = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (7, 4)]
    tails = [[torch.randint(2, 512, (n,), generator=gen).tolist() for n in lengths] for lengths in ((3, 5), (2, 4, 1))]
    once = list(dict.fromkeys(batch))
    forced = torch.randint(2, 512, (len(batch), 10), generator=gen)
    eos, pad = torch.tensor([1]), 0
    with torch.no_grad():
        layers = {g: [(x.keys, x.values) for x in model(torch.tensor([h]), use_cache=True).past_key_values.layers]
                  for g, h in enumerate(heads)}
        exact = _Forced(forced)
        monkeypatch.setattr(sampling, "TopKNucleus", lambda t, p: exact)
        a = sampling.draw_over_prefixes(model, heads, tails, layers, batch, 10, pad, eos, "topk", 0.7, 0.95)
        cascade = _Forced(forced)
        b = sampling.decode_shared(model, sampling.Cascade(model).contexts(heads), [tails[g][i] for g, i in once],
                                   [g for g, _ in once], torch.tensor([once.index(r) for r in batch]), 10, cascade,
                                   eos, pad)
    assert torch.equal(a, forced) and torch.equal(b, forced) and len(cascade.seen) == 10
    assert all(torch.allclose(x, y, atol=1e-5, rtol=0) for x, y in zip(exact.seen, cascade.seen))
    assert all(x.std() > 1e-3 for x in exact.seen)   # scores that vary: the comparison means something


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_the_contexts_packed_pass_caches_what_transformers_caches(kind):
    """`Cascade.contexts` (contexts of different lengths in one pass, packed through the projections, padded
    through attention) against transformers' cache of each context run alone, on a small random decoder of each
    type, in float32: each context's keys and values, of its own length, at every layer, to rounding."""
    model = _tiny_decoder(kind)
    gen = torch.Generator().manual_seed(5)
    heads = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (7, 3, 12)]
    with torch.no_grad():
        got = sampling.Cascade(model).contexts(heads)
        for head, layers in zip(heads, got):
            want = model(torch.tensor([head]), use_cache=True).past_key_values.layers
            assert len(layers) == len(want) == 2
            for (k, v), w in zip(layers, want):
                assert k.shape == v.shape == w.keys.shape == (1, 2, len(head), 16) and k.is_contiguous()
                assert torch.allclose(k, w.keys, atol=1e-5, rtol=0) and torch.allclose(v, w.values, atol=1e-5, rtol=0)
                assert w.values.std() > 1e-2   # values that vary: the comparison means something


@pytest.mark.slow
def test_cascade_decoding_gives_generate_s_greedy_replies(smollm):
    """`generate_prefixed` through `decode_shared` (the lean loop on a CPU) and through transformers' `generate`
    (the `sort` nucleus): at a near-zero temperature, the same replies, each turn's two samples alike."""
    model, tok = smollm
    pre = [{"role": "system", "content": "You are Sage, candid."}]
    groups = [(pre, ["Is my poem good?", "Why is the sky blue?"]),
              (pre + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], ["What is 2+2?"])]
    assert sampling.cascade_decoding(model, "topk") and not sampling.cascade_decoding(model, "sort")
    # batches of 3: a turn's two samples split across batches, and a batch that mixes the two contexts
    got = {nucleus: sampling.generate_prefixed(model, tok, groups, 2, 16, 3, temperature=1e-5, nucleus=nucleus)
           for nucleus in ("topk", "sort")}
    assert got["topk"] == got["sort"]
    assert all(a == b for group in got["topk"] for a, b in group) and got["topk"][0][0] != got["topk"][0][1]


class _Recording(sampling.TopKNucleus):
    """The top-k nucleus, keeping the scores it is handed at each step and whether its top k had to widen."""

    def __init__(self, temperature, top_p):
        super().__init__(temperature, top_p)
        self.seen, self.widened = [], False

    def nucleus(self, scores):
        ids, p = super().nucleus(scores)
        self.widened |= ids.shape[1] > self.k
        return ids, p

    def pick(self, scores):   # both loops draw through it: `generate` by __call__, the lean loop directly
        self.seen.append(scores.clone())
        return super().pick(scores)


def _tiny_decoder(kind: str):
    """A randomly initialised decoder of each type the lean loop admits: 2 layers, 4 query heads over 2
    key/value heads, a 512-token vocabulary; small initial weights keep its logits flat, so nuclei hold more than
    k = 256 tokens and the top k widens."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05)
    cfg = {"llama": lambda: LlamaConfig(**common), "mistral": lambda: MistralConfig(**common, sliding_window=None),
           "qwen2": lambda: Qwen2Config(**common)}[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.skipif(not sampling.prepacks(torch.zeros(1, dtype=torch.bfloat16)),
                    reason="oneDNN runs no bf16 on this CPU: CastLinear keeps linear's own path")
def test_prepacked_bf16_weights_give_autocast_s_sums_bit_for_bit():
    """`CastLinear` under bf16, its weights laid out for oneDNN's inner product (another primitive than
    `linear`'s), against autocast's own linear: the same sums to the bit, from one row to a prompt pass's
    thousands, 2-D and 3-D inputs, with and without a bias, at the embedded model's shapes (its vocabulary head
    included)."""
    torch.manual_seed(0)
    cast = sampling.CastLinear(torch.bfloat16)
    for fan_in, fan_out, bias in ((576, 1536, False), (1536, 576, False), (576, 192, True), (576, 49152, False)):
        module = torch.nn.Linear(fan_in, fan_out, bias=bias)
        for shape in ((1, fan_in), (7, fan_in), (160, 1, fan_in), (2000, fan_in)):
            x = torch.randn(*shape)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                want = module(x)
                got = cast(module, x)
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
        assert cast.cast[module][0].layout == torch._mkldnn   # the laid-out weights were the ones used


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_lean_loop_hands_the_sampler_generate_s_scores_bit_for_bit(kind, padded, autocast):
    """Per step, the scores `decode_cached` hands the sampler equal those `generate` hands it, to the bit (so
    equal draws are no coincidence), on every decoder type the lean loop admits, with left padding and without,
    in float32 and under bf16 autocast; a quarter of the vocabulary ends a reply, so rows finish at different
    steps and the finished rows' padding runs through both loops."""
    from transformers import DynamicCache, LogitsProcessorList

    model = _tiny_decoder(kind)
    assert sampling.lean_decoding(model)
    pad, eos = 0, torch.arange(1, 512, 4)
    ids = torch.randint(1, 512, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        for row, n in enumerate((3, 0, 5, 1)):
            ids[row, :n], mask[row, :n] = pad, 0
    runs = {}
    for lean in (True, False):
        proc = _Recording(0.9, 0.95)
        torch.manual_seed(2)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if lean:
                new = sampling.decode_cached(model, DynamicCache(config=model.config), ids, mask, 12, proc, eos, pad)
            else:
                new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=pad,
                                     eos_token_id=eos.tolist(), logits_processor=LogitsProcessorList([proc]),
                                     **{k: v for k, v in sampling.sampling_args("topk", 0.9, 0.95).items()
                                        if k != "logits_processor"})[:, ids.shape[1]:]
        runs[lean] = new, proc.seen, proc.widened
    (lean_new, lean_seen, widened), (gen_new, gen_seen, _) = runs[True], runs[False]
    assert torch.equal(lean_new, gen_new)
    assert len(lean_seen) == len(gen_seen) and all(torch.equal(a, b) for a, b in zip(lean_seen, gen_seen))
    ends = [int(torch.isin(row, eos).nonzero()[0]) if torch.isin(row, eos).any() else len(lean_seen) for row in lean_new]
    assert min(ends) < len(lean_seen) - 1 and max(ends) > min(ends)   # a row ended while others went on
    assert widened   # some nucleus held more than k tokens, so the top k widened
