"""Batched, seeded sampling from a chat model (left padding, length-sorted batches)."""
from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from . import cpu_attention, models

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


class TopKNucleus:
    """Temperature and top-p sampling of the next token as a logits processor: returns scores whose argmax is the
    sampled token, so `generate` runs it with `do_sample=False`. It samples the distribution transformers' own
    path samples (temperature, then `TopPLogitsWarper`'s nucleus, then a draw in proportion to probability), but
    over the `k` most likely tokens instead of a sort and a multinomial over the whole vocabulary: those two cost
    as much as the embedded model's forward pass at batch 32 (measured, benchmarks/sampling_backends.py). `k`
    widens for a row until its nucleus ends inside the top k, so no nucleus is ever cut short. The draws differ
    from transformers' under the same seed (one uniform number per row, from torch's global generator), the
    distribution does not (tests/test_sampling.py)."""

    def __init__(self, temperature: float, top_p: float, k: int = 256):
        if not temperature > 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self._buffer = None   # `tempered`'s

    def nucleus(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, probabilities with the tokens outside the nucleus at 0), both (rows, k'), most likely first.
        A token is in the nucleus when the probability of the tokens less likely than it exceeds 1 - top_p
        (transformers' rule), i.e. when the tokens more likely than it hold less than top_p. In float64, so that
        which token ends the nucleus does not depend on the order of a float32 sum (transformers' float32 path
        can differ from exact arithmetic by that one token, about once in 10^5 rows). Only the rows that keep
        their k-th token (so their nucleus may go on) are ranked again, with k four times wider: each row is
        ranked as widely as it would be alone, so its nucleus and draw do not depend on the other rows of its
        batch (bit for bit on a CPU, for batches of two rows or more; on CUDA up to the order `topk` gives tied
        scores). The rows ranked less widely are padded with their last token at probability 0."""
        x = self.tempered(scores)
        k = min(self.k, x.shape[-1])
        top, ids = torch.topk(x, k, dim=-1)
        high = x.amax(-1, keepdim=True)   # the log-sum-exp in place, by torch.logsumexp's own steps
        shift = high.masked_fill(high.abs() == float("inf"), 0)
        lse = x.sub_(shift).exp_().sum(-1, keepdim=True).log_().add_(shift)
        p, wide = self.kept(top, lse)   # wide: the nucleus may go on past the top k
        while k < x.shape[-1] and wide.any():
            k = min(4 * k, x.shape[-1])
            rows = wide.nonzero()[:, 0]
            top, more = torch.topk(scores[rows].to(torch.float64).div_(self.temperature), k, dim=-1)
            q, still = self.kept(top, lse[rows])
            ids = torch.cat([ids, ids[:, -1:].expand(-1, k - ids.shape[1])], 1).index_copy_(0, rows, more)
            p = torch.nn.functional.pad(p, (0, k - p.shape[1])).index_copy_(0, rows, q)
            wide = torch.zeros_like(wide).index_fill_(0, rows[still], True)
        return ids, p

    def kept(self, top: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranked tokens' probabilities, those outside the nucleus at 0, and whether each row keeps its
        last-ranked token (so its nucleus may go on)."""
        p = (top - lse).exp()
        keep = (p.cumsum(-1) - p) < self.top_p
        keep[:, 0] = True
        return p * keep, keep[:, -1]

    def tempered(self, scores: torch.Tensor) -> torch.Tensor:
        """The scores in float64 over the temperature, in a buffer kept from the last call of the same shape
        (the log-sum-exp overwrites it): a fresh one per step would be twice the size of float32 logits over the
        vocabulary and cost the page faults of new memory each time."""
        buf = self._buffer
        if buf is None or buf.shape != scores.shape or buf.device != scores.device:
            buf = self._buffer = torch.empty(scores.shape, dtype=torch.float64, device=scores.device)
        return buf.copy_(scores).div_(self.temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, self.pick(scores)[:, None], 0.0)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The drawn token of each row (what `__call__`'s argmax gives, without a vocabulary-wide tensor)."""
        if self.top_p < 1:
            ids, p = self.nucleus(scores)
        else:   # the whole vocabulary: no ranking needed
            p = torch.softmax(scores.double() / self.temperature, dim=-1)
            ids = torch.arange(p.shape[-1], device=p.device).expand_as(p)
        cdf = p.cumsum(-1)
        u = torch.rand(p.shape[0], 1, dtype=cdf.dtype).to(cdf.device) * cdf[:, -1:]
        # u can round up to the total: then the first entry that reaches it (the last with probability > 0; with
        # top-p 1 the vocabulary is unsorted, so zeros that underflowed can sit anywhere)
        last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)
        pick = torch.minimum(torch.searchsorted(cdf, u, right=True), last)
        return ids.gather(1, pick)[:, 0]


def sampling_args(nucleus: str, temperature: float, top_p: float) -> dict:
    """`generate`'s keyword arguments for the profile's sampling: transformers' own sort-and-multinomial path, or
    the top-k nucleus (`TopKNucleus`). Either way exactly the profile's temperature and top_p: none of the model's
    generation_config (top_k, a repetition penalty) applies, as on the vLLM path."""
    if nucleus == "sort":
        return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0)
    if nucleus == "topk":
        from transformers import LogitsProcessorList

        return dict(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                    logits_processor=LogitsProcessorList([TopKNucleus(temperature, top_p)]))
    raise ValueError(f"nucleus must be 'sort' or 'topk', got {nucleus!r}")


def uses_lean_loop(model, nucleus: str) -> bool:
    """Whether `draw` samples through the lean loop (`decode_cached`) rather than transformers' `generate`."""
    return nucleus == "topk" and lean_decoding(model)


def cascade_decoding(model, nucleus: str) -> bool:
    """Whether `generate_prefixed` samples through `decode_shared`: the lean loop, on a CPU (its attention kernels)."""
    return uses_lean_loop(model, nucleus) and model.device.type == "cpu"


def draw(model, cache, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int, eos: torch.Tensor,
         nucleus: str, temperature: float, top_p: float) -> torch.Tensor:
    """The new tokens (rows, up to max_new_tokens) after `ids`, whose earlier tokens, if any, are in `cache`
    (`mask` covers both): transformers' `generate`, or, for the top-k nucleus on a decoder `decode_cached` runs,
    that lean loop (the same draws, tests/test_sampling.py)."""
    if uses_lean_loop(model, nucleus):
        from transformers import DynamicCache

        return decode_cached(model, cache if cache is not None else DynamicCache(config=model.config), ids, mask,
                             max_new_tokens, TopKNucleus(temperature, top_p), eos, pad)
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         eos_token_id=eos.tolist(),   # the replies end where the lean loop's and vLLM's do
                         **({} if cache is None else {"cache": cache}), **sampling_args(nucleus, temperature, top_p))
    return gen[:, ids.shape[1]:]


def chat_prompt(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_text(model, tok, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16,
                temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling",
                nucleus: str = "sort") -> list[dict]:
    """One sampled continuation per raw text prompt: {'text', 'finished'} in input order.

    Prompts are sorted by length so that batches carry little padding; the seed is set once, so the same
    inputs, order and seed give the same samples on a CPU.
    """
    if isinstance(model, VLLMSampler):
        return model.sample(prompts, max_new_tokens, seed, temperature, top_p)
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    eos = stop_ids(model, tok)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[dict | None] = [None] * len(prompts)
    old_side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
            new = draw(model, None, enc.input_ids, enc.attention_mask, max_new_tokens, tok.pad_token_id, eos,
                       nucleus, temperature, top_p)
            for i, row in zip(idx, new):
                finished = bool(torch.isin(row, eos).any())
                out[i] = {"text": tok.decode(row, skip_special_tokens=True).strip(), "finished": finished}
    finally:
        tok.padding_side = old_side
    return out


def stop_ids(model, tok) -> torch.Tensor:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation_config EOS ids (Qwen2.5 has
    two), so that 'finished' means what vLLM's finish_reason 'stop' means."""
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return torch.tensor(sorted({tok.eos_token_id, *extra}), device=model.device)


def generate(model, tok, conversations: list[list[dict]], max_new_tokens: int, seed: int, batch_size: int = 16,
             temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling", nucleus: str = "sort") -> list[dict]:
    """One sampled assistant reply per conversation (chat template applied)."""
    return sample_text(model, tok, [chat_prompt(tok, c) for c in conversations], max_new_tokens, seed,
                       batch_size, temperature, top_p, desc, nucleus)


def generate_shared_prefix(model, tok, prefix: list[dict], user_turns: list[str], n: int, max_new_tokens: int,
                           batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                           desc: str = "sampling", nucleus: str = "sort") -> list[list[dict]] | None:
    """`n` sampled replies to each of `user_turns`, each asked after the same `prefix` of messages (a system
    prompt, demonstrations). The prefix is run through the model once and its key/value cache shared by every
    row, so a long shared context costs one forward pass instead of one per sample; rows are padded between
    the prefix and their own turn, which the attention mask hides (greedy replies equal those of the full
    prompts, tests/test_pairs.py). Sampling continues the caller's torch RNG; with the lean loop on a CPU the
    batches decode through `decode_shared`, as `generate_prefixed`'s do. Returns None when the prefix cannot be
    cut off as whole tokens (then use `generate`)."""
    if not prefix:
        return None
    got = generate_prefixed(model, tok, [(prefix, user_turns)], n, max_new_tokens, batch_size, temperature, top_p,
                            desc, nucleus)
    return None if got is None else got[0]


@torch.no_grad()
def generate_prefixed(model, tok, groups: list[tuple[list[dict], list[str]]], n: int, max_new_tokens: int,
                      batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling",
                      nucleus: str = "sort") -> list[list[list[dict]]] | None:
    """`generate_shared_prefix` over several (prefix, user turns) groups at once: each prefix is run once, and a
    batch may hold rows of several groups, each row over its own group's cache, the shorter prefixes padded on
    the left (hidden by the attention mask, like the padding before each turn). So many small groups (a few
    questions per life domain) fill whole batches. Rows are sorted by prefix, then turn length. With one group
    this is `generate_shared_prefix`, batch for batch. Returns, per group, `n` replies per turn; None when a
    prefix is empty or cannot be cut off as whole tokens, or the sampler has its own cache (vLLM). With the lean
    loop on a CPU, `decode_shared` samples each batch: no row copies its prefix, and a turn's prompt runs once
    for its `n` samples."""
    if isinstance(model, VLLMSampler) or not groups or not all(prefix for prefix, _ in groups):
        return None
    heads, tails = [], []
    for prefix, user_turns in groups:
        head = tok.apply_chat_template(prefix, tokenize=False)
        fulls = [chat_prompt(tok, prefix + [{"role": "user", "content": u}]) for u in user_turns]
        head_ids = tok(head, add_special_tokens=False).input_ids
        tail = [tok(f[len(head):], add_special_tokens=False).input_ids for f in fulls]
        if not all(f.startswith(head) and tok(f, add_special_tokens=False).input_ids == head_ids + t
                   for f, t in zip(fulls, tail)):
            return None
        heads.append(head_ids)
        tails.append(tail)
    layers: dict[int, list] = {}   # group -> its prefix's (keys, values) per layer, while a batch needs them
    rows = [(g, i) for g, tail in enumerate(tails) for i in range(len(tail)) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda r: (rows[r][0], len(tails[rows[r][0]][rows[r][1]])))
    out = [[[] for _ in tail] for tail in tails]
    eos, pad = stop_ids(model, tok), tok.pad_token_id
    cascade = Cascade(model) if cascade_decoding(model, nucleus) else None
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = [rows[r] for r in order[start:start + batch_size]]
        for g in [g for g in layers if g < batch[0][0]]:   # rows come group by group: earlier groups are done
            del layers[g]
        todo = sorted({g for g, _ in batch} - set(layers))
        if cascade:
            if todo:   # the batch's new contexts in one packed pass
                layers.update(zip(todo, cascade.contexts([heads[g] for g in todo])))
        else:
            for g in todo:
                # the cache is all a prefix pass is for: logits at one position, not the vocabulary at each of them
                cache = model(torch.tensor([heads[g]], device=model.device), use_cache=True,
                              logits_to_keep=1).past_key_values
                layers[g] = [(layer.keys, layer.values) for layer in cache.layers]
        if cascade:   # each turn's prompt once, over its context's cache, for all of the turn's samples
            once = list(dict.fromkeys(batch))
            used = sorted({g for g, _ in once})
            new = decode_shared(model, [layers[g] for g in used], [tails[g][i] for g, i in once],
                                [used.index(g) for g, _ in once], torch.tensor([once.index(r) for r in batch]),
                                max_new_tokens, TopKNucleus(temperature, top_p), eos, pad, cascade)
        else:
            new = draw_over_prefixes(model, heads, tails, layers, batch, max_new_tokens, pad, eos, nucleus,
                                     temperature, top_p)
        for (g, i), row in zip(batch, new):
            out[g][i].append({"text": tok.decode(row, skip_special_tokens=True).strip(),
                              "finished": bool(torch.isin(row, eos).any())})
    return out


def draw_over_prefixes(model, heads: list[list[int]], tails: list[list[list[int]]], layers: dict, batch: list,
                       max_new_tokens: int, pad: int, eos: torch.Tensor, nucleus: str, temperature: float,
                       top_p: float) -> torch.Tensor:
    """`draw` for a batch of (group, turn) rows of `generate_prefixed`, each row over a copy of its group's cached
    prefix, left-padded to the batch's longest, and its turn, left-padded to the longest turn."""
    from transformers import DynamicCache

    hw = max(len(heads[g]) for g, _ in batch)
    tw = max(len(tails[g][i]) for g, i in batch)
    ids, mask = [], []
    for g, i in batch:
        h, t = heads[g], tails[g][i]
        ids.append([pad] * (hw - len(h)) + h + [pad] * (tw - len(t)) + t)
        mask.append([0] * (hw - len(h)) + [1] * len(h) + [0] * (tw - len(t)) + [1] * len(t))
    kv = []   # per layer: each row's prefix keys and values, left-padded to the batch's longest prefix
    for k in range(len(layers[batch[0][0]])):
        kv.append(tuple(torch.cat([torch.nn.functional.pad(layers[g][k][j], (0, 0, hw - len(heads[g]), 0))
                                   for g, _ in batch]) for j in (0, 1)))
    ids, mask = torch.tensor(ids, device=model.device), torch.tensor(mask, device=model.device)
    return draw(model, DynamicCache(kv, config=model.config), ids, mask, max_new_tokens, pad, eos, nucleus,
                temperature, top_p)


# Decoder layers `decode_cached` runs itself: pre-norm attention (q/k/v/o projections, rotary positions, grouped
# key/value heads) then a pre-norm MLP, with nothing else in the layer (Qwen3's q/k norms would be skipped).
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")


# generation_config fields that add logits processors `generate` would apply and `decode_cached` does not
EXTRA_PROCESSORS = ("min_new_tokens", "min_length", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
                    "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias")


def lean_decoding(model) -> bool:
    """Whether `decode_cached` runs this model exactly as `generate` would (else `generate` does): a plain
    *ForCausalLM (merged adapters, not a PeftModel wrapper) of a type above, on transformers' SDPA attention with
    grouped key/value heads of at most 256 dimensions, on a CPU or CUDA device (the attention kernel paths
    `decode_cached` mirrors), with no generation_config setting that adds a logits processor."""
    cfg, inner = getattr(model, "config", None), getattr(model, "model", None)
    if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES or getattr(cfg, "sliding_window", None):
        return False
    gen = getattr(model, "generation_config", None)
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (hasattr(model, "lm_head") and hasattr(inner, "embed_tokens") and hasattr(inner, "rotary_emb")
            and getattr(cfg, "_attn_implementation", None) == "sdpa" and model.device.type in ("cpu", "cuda")
            and cfg.num_attention_heads > cfg.num_key_value_heads and dim <= 256
            and not any(getattr(gen, f, None) for f in EXTRA_PROCESSORS))


@torch.no_grad()
def decode_cached(model, cache, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, processor,
                  eos: torch.Tensor, pad: int) -> torch.Tensor:
    """What `generate(do_sample=False, logits_processor=[processor])` returns after the prompt `ids` (for a
    processor that reads only the scores, as `TopKNucleus`: it is handed the prompt's ids, not the drawn ones), whose
    first tokens may already be in `cache` (a DynamicCache, as `generate` takes it; `mask` covers all of `ids`),
    with less work per token: the prompt runs through the model as `generate` runs it, then each step runs the
    decoder layers directly, the keys and values written in place into buffers sized for the whole reply instead
    of concatenated onto the cache (a copy of every layer's cache per step), the attention mask one boolean row
    per sequence, and none of `generate`'s per-step bookkeeping. Positions count the unmasked tokens, as
    `generate`'s do; a row that has ended gets `pad`. The sums are those of transformers' own layers (same
    modules, same grouped-query attention over the same keys; under autocast the weights cast once and the keys
    stored in its dtype, the roundings autocast makes at every step), so the draws are `generate`'s, token for
    token (tests/test_sampling.py)."""
    import importlib

    import torch.nn.functional as F

    rows, past = ids.shape[0], cache.get_seq_length()
    new = ids.shape[1] - past
    width = past + new + max_new_tokens
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids[:, past:], attention_mask=mask, position_ids=pos[:, past:], cache=cache,
                use_cache=True, logits_to_keep=1)
    low = autocast_dtype(ids.device)
    keys, values = [], []
    for layer in out.cache.layers:   # (rows, kv heads, tokens, head dim), room for the reply
        for src, dst in ((layer.keys, keys), (layer.values, values)):
            buf = src.new_zeros(rows, src.shape[1], width, src.shape[3], dtype=low or src.dtype)
            buf[:, :, :past + new] = src
            dst.append(buf)
    logits = out.logits[:, -1].float()
    del out, cache
    linear = CastLinear(low)
    unpadded = bool(mask.all())
    seen = torch.zeros(rows, width, dtype=torch.bool, device=ids.device)
    seen[:, :past + new] = mask.bool()
    where = pos[:, -1:] + 1
    rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    cfg, inner = model.config, model.model
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def advance(step, token):   # the logits after this step's tokens
        t = past + new + step
        seen[:, t] = True
        allowed = seen[:, None, None, :t + 1]
        x = inner.embed_tokens(token[:, None])
        cos, sin = inner.rotary_emb(x, where + step)
        for i, layer in enumerate(inner.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = linear(attn.q_proj, h).view(rows, 1, heads, dim).transpose(1, 2)
            k = linear(attn.k_proj, h).view(rows, 1, kv_heads, dim).transpose(1, 2)
            q, k = rope(q, k, cos, sin)
            if low is not None:
                q = q.to(low)
            keys[i][:, :, t] = k[:, :, 0]
            values[i][:, :, t] = linear(attn.v_proj, h).view(rows, kv_heads, dim)
            k, v = keys[i][:, :, :t + 1], values[i][:, :, :t + 1]
            if unpadded:   # transformers drops an all-ones mask and lets the kernel share the key/value heads
                o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=True).transpose(1, 2)
            else:   # each key/value head's query heads as that head's queries (transformers' pack_gqa)
                o = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, heads // kv_heads, dim), k, v,
                                                   attn_mask=allowed, scale=attn.scaling)
            x = x + linear(attn.o_proj, o.reshape(rows, 1, heads * dim))
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        return linear(model.lm_head, inner.norm(x))[:, -1].float()

    return draw_steps(processor, ids, logits, max_new_tokens, eos, pad, advance)


def draw_steps(processor, ids: torch.Tensor, logits: torch.Tensor, max_new_tokens: int, eos: torch.Tensor,
               pad: int, advance) -> torch.Tensor:
    """The drawing loop of the lean loops: up to `max_new_tokens` tokens per row from the first `logits`, each
    step's from `advance(step, tokens)`; `pad` once a row has drawn an `eos` token, and no step after every row
    has. Each token is the argmax of the processed scores (handed over in float32, as `generate` hands them), as
    `generate` takes it, or the processor's own `pick` where it has one (`TopKNucleus`: the same tokens; a
    subclass that changes the draw overrides `pick`, which `__call__` calls)."""
    pick = getattr(processor, "pick", None)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    drawn = []
    for step in range(max_new_tokens):
        token = pick(logits) if pick is not None else processor(ids, logits.float()).argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        drawn.append(token)
        done |= torch.isin(token, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        logits = advance(step, token)
    return torch.stack(drawn, 1)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device, None where it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class CastLinear:
    """Linear modules as autocast runs them (input and weights cast to `low`; as they are with `low` None), each
    module's weights cast once instead of at every call: the same roundings, so the same sums. Under bf16 on a
    CPU whose oneDNN runs bf16, the cast weights are also laid out once in oneDNN's blocked format (which `linear`
    would redo at every call) and multiplied by oneDNN's inner product: another oneDNN primitive than `linear`'s,
    whose sums were the same bit for bit at every shape tested (tests/test_sampling.py), and 10-50% faster at a
    decoding step's 160 rows. The weights must not change while an instance is in use."""

    def __init__(self, low: torch.dtype | None):
        self.low, self.cast = low, {}

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        if self.low is None:
            return module(x)
        if module not in self.cast:
            weight, bias = (None if p is None else p.to(self.low) for p in (module.weight, module.bias))
            if prepacks(weight):
                self.cast[module] = torch.ops.mkldnn._reorder_linear_weight(weight), bias
            else:
                self.cast[module] = weight, bias
        weight, bias = self.cast[module]
        if weight.layout == torch._mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x.to(self.low), weight, bias, "none", [], "")
        return torch.nn.functional.linear(x.to(self.low), weight, bias)


def prepacks(weight: torch.Tensor) -> bool:
    """Whether `CastLinear` lays this cast weight out for oneDNN: bf16 on a CPU where oneDNN runs bf16."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and models.onednn_bf16()


class Cascade:
    """The decoder layers run by hand over prompts that share a few cached contexts (`decode_shared`), and over
    the contexts themselves (`contexts`). Queries attend to their own tokens and, stacked group by group as one
    batch of queries, to their group's context, the two softmaxes merged by their log-sum-exps (cascade
    attention, as flash attention merges its blocks): the attention `generate` computes over the whole prompt,
    summed in another order. A prompt pass runs its prompts' tokens packed, without their padding, through the
    projections and the MLP, and left-padded only through attention. CPU only (the flash kernel that returns the
    log-sum-exp); while decoding in bf16, each row's one query over its own tokens runs in `cpu_attention`'s
    compiled kernel where it could be built (480 problems of a few queries each per layer, where the flash kernel's
    cost is its fixed cost per problem), the context's part merged into it. One instance casts (and lays out)
    each weight once for all its passes."""

    def __init__(self, model):
        import importlib

        self.model, self.cfg, self.inner = model, model.config, model.model
        self.device = self.inner.embed_tokens.weight.device
        self.dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.cfg.num_attention_heads
        self.heads, self.kv_heads = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        self.per = self.heads // self.kv_heads
        low = autocast_dtype(self.device)
        self.dtype = low or self.inner.embed_tokens.weight.dtype   # what attention runs in
        self.linear = CastLinear(low)
        self.rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb

    def attend(self, i, q, k, v, mask, shared, members, scale):
        """q (rows, heads, T, dim) over each row's own k, v (rows, kv heads, tokens, dim) under the additive mask
        (rows, 1, per * T, tokens), or, with one query per row, `mask` the tokens each row sees (rows, tokens,
        bool: `cpu_attention`'s kernel instead of the flash kernel), and over its group's context (`members`:
        (group, its rows); none: own tokens only); returns (rows, T, heads * dim)."""
        rows, _, T, dim = q.shape
        # each key/value head's query heads as its queries
        q = q.to(self.dtype).reshape(rows, self.kv_heads, self.per * T, dim)
        other = self.attend_shared(i, q, shared, members, scale) if members else None
        if mask.dtype == torch.bool:
            if T != 1:
                raise ValueError(f"a mask of seen tokens is for one query per row, got {T}")
            out = cpu_attention.own_attention(q, k, v, mask, scale, other)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
            if other is not None:   # the shared part's share of each softmax: e^lse_other / (e^lse + e^lse_other)
                share = torch.sigmoid(other[1] - lse).unsqueeze(-1)
                out = torch.lerp(out.float(), other[0].float(), share).to(self.dtype)
        return out.reshape(rows, self.heads, T, dim).transpose(1, 2).reshape(rows, T, self.heads * dim)

    def attend_shared(self, i, q, shared, members, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """q (rows, kv heads, queries, dim) over each row's group's context at layer i: (output like q, log-sum-exp
        (rows, kv heads, queries) float32), one flash call per group, its rows' queries stacked."""
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        rows, kv_heads, queries, dim = q.shape
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for g, idx in members:
            (pk, pv), qg = shared[g][i], q[idx]
            n = qg.shape[0]
            o, l = flash(qg.transpose(0, 1).reshape(1, kv_heads, n * queries, dim), pk, pv, scale=scale)
            out[idx] = o.view(kv_heads, n, queries, dim).transpose(0, 1)
            lse[idx] = l.view(kv_heads, n, queries).transpose(0, 1)
        return out, lse

    def forward(self, x, positions, keys, values, at, mask, shared, members, slots=None, last=None):
        """Every layer over new tokens x at `positions`, their keys and values written into the buffers (rows,
        kv heads, tokens, dim) at `at`; the logits at `last` (None: none), in the vocabulary head's dtype (under
        bf16 not widened to float32: `TopKNucleus` reads them into float64 as they are). x is (rows, T, hidden),
        or, with `slots` (the (row, position) of each token in the buffers), the rows' tokens packed, (tokens,
        hidden)."""
        inner, linear, rope, dim = self.inner, self.linear, self.rope, self.dim
        heads, kv_heads = self.heads, self.kv_heads
        n, new = (1, x.shape[0]) if slots is not None else x.shape[:2]
        rows, T = (keys[0].shape[0], mask.shape[-1] - at) if slots is not None else (n, new)
        cos, sin = inner.rotary_emb(x, positions) if slots is None else inner.rotary_emb(x[None], positions[None])
        for i, layer in enumerate(inner.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = linear(attn.q_proj, h).view(n, new, heads, dim).transpose(1, 2)
            k = linear(attn.k_proj, h).view(n, new, kv_heads, dim).transpose(1, 2)
            v = linear(attn.v_proj, h).view(n, new, kv_heads, dim).transpose(1, 2)
            q, k = rope(q, k, cos, sin)
            if slots is None:
                keys[i][:, :, at:at + new], values[i][:, :, at:at + new] = k, v
            else:   # the packed tokens to their rows' places, the padding's queries left at zero
                for buf, new_kv in ((keys[i], k), (values[i], v)):
                    buf.transpose(1, 2)[slots] = new_kv[0].transpose(0, 1).to(buf.dtype)
                padded = q.new_zeros(rows, T, heads, dim, dtype=self.dtype)
                q = padded.index_put_(slots, q[0].transpose(0, 1).to(self.dtype)).transpose(1, 2)
            o = self.attend(i, q, keys[i][:, :, :at + T], values[i][:, :, :at + T], mask, shared, members,
                            attn.scaling)
            x = x + linear(attn.o_proj, o if slots is None else o[slots])
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        return None if last is None else linear(self.model.lm_head, inner.norm(x[last]))

    def buffers(self, n, width):
        return [[torch.zeros(n, self.kv_heads, width, self.dim, dtype=self.dtype, device=self.device)
                 for _ in self.inner.layers] for _ in (0, 1)]

    @torch.no_grad()
    def prompt(self, tails: list[list[int]], starts: torch.Tensor, shared, members, logits: bool = True):
        """One pass of the prompts `tails` (each starting at position `starts[p]`, after its group's context in
        `shared` per `members`, or at 0 with none): (the logits after each prompt or None, the keys and values per
        layer, left-padded, (prompts, kv heads, longest, dim), which of those positions are real, the last
        position of each prompt). A padding query sees itself only (no row of the softmax is empty)."""
        if not tails or not all(tails):
            raise ValueError("a prompt pass needs at least one prompt, and no empty one")
        device = self.device
        T = max(len(t) for t in tails)
        real = torch.tensor([[0] * (T - len(t)) + [1] * len(t) for t in tails], dtype=torch.bool, device=device)
        slots = real.nonzero(as_tuple=True)   # row by row, in each row's order: the packed tokens' places
        ids = torch.tensor([token for t in tails for token in t], device=device)
        positions = (starts[:, None] + real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=device)
        mask = torch.zeros(len(tails), 1, T, T, dtype=self.dtype, device=device)
        mask.masked_fill_(~allowed[:, None], float("-inf"))
        keys, values = self.buffers(len(tails), T)
        ends = torch.tensor([len(t) for t in tails], device=device).cumsum(0) - 1   # each prompt's last token
        out = self.forward(self.inner.embed_tokens(ids), positions[slots], keys, values, 0,
                           mask.repeat(1, 1, self.per, 1), shared, members, slots, ends if logits else None)
        return out, keys, values, real, positions[:, -1:]

    @torch.no_grad()
    def contexts(self, heads: list[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each context's cached (keys, values) per layer, (1, kv heads, tokens, head dim), from one packed pass
        of them all (as transformers' cache of a pass of the context alone, summed in another order)."""
        _, keys, values, _, _ = self.prompt(heads, torch.zeros(len(heads), dtype=torch.long, device=self.device),
                                            None, [], logits=False)
        T = keys[0].shape[2]
        return [[tuple(x[c:c + 1, :, T - len(h):].clone(memory_format=torch.contiguous_format) for x in (k, v))
                 for k, v in zip(keys, values)] for c, h in enumerate(heads)]


def by_group(of_row: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    """(group, the rows of that group) for each group present: a slice where they are consecutive (rows sorted by
    group: views instead of gathered copies), else their indices."""
    out = []
    for g in sorted(set(of_row.tolist())):
        idx = (of_row == g).nonzero()[:, 0]
        first, last = int(idx[0]), int(idx[-1])
        out.append((g, slice(first, last + 1) if last - first + 1 == len(idx) else idx))
    return out


@torch.no_grad()
def decode_shared(model, prefixes: list[list[tuple[torch.Tensor, torch.Tensor]]], tails: list[list[int]],
                  groups: list[int], expand: torch.Tensor, max_new_tokens: int, processor, eos: torch.Tensor,
                  pad: int, cascade: Cascade | None = None) -> torch.Tensor:
    """The lean loop (`decode_cached`'s steps, the same `processor`) for prompts that share a few cached contexts:
    row r of the result continues prompt `expand[r]`, which is the context `prefixes[groups[p]]` (per layer its
    cached (keys, values), (1, kv heads, tokens, head dim), as a pass of the context alone caches them:
    transformers' cache or `Cascade.contexts`) followed by the
    tokens `tails[p]`. Each prompt's tail runs through the model once however many rows continue it, and no row
    holds a copy of its context: `Cascade`'s attention. The scores differ from `decode_cached`'s in rounding only
    (tests/test_sampling.py). CPU only; positions as `generate` counts them (a tail starts where its context
    ends). `cascade`: the instance to run (one per model, its weights unchanged, and autocast setting; a fresh
    one if None)."""
    c = cascade or Cascade(model)
    shared = [[(k.to(c.dtype), v.to(c.dtype)) for k, v in layers] for layers in prefixes]
    starts = torch.tensor([shared[g][0][0].shape[2] for g in groups], device=c.device)   # each tail's first position
    of_tail = torch.tensor(groups, device=c.device)
    logits, keys, values, real, last = c.prompt(tails, starts, shared, by_group(of_tail))
    logits = logits[expand]
    # the rows to sample: their tail's keys and values, room for the reply
    T = real.shape[1]
    rows, width = len(expand), T + max_new_tokens
    own_keys, own_values = c.buffers(rows, width)
    for i in range(len(keys)):
        own_keys[i][:, :, :T], own_values[i][:, :, :T] = keys[i][expand], values[i][expand]
    del keys, values
    members = by_group(of_tail[expand])
    seen = torch.zeros(rows, width, dtype=torch.bool, device=c.device)
    seen[:, :T] = real[expand]
    where = last[expand] + 1
    ids = torch.tensor([[pad] * (T - len(t)) + t for t in tails], device=c.device)[expand]

    own = cpu_attention.fits(c.dtype, c.device, c.per, c.dim, width)   # the compiled kernel for own tokens

    def advance(step, token):   # the logits after this step's tokens
        seen[:, T + step] = True
        if own:
            mask = seen[:, :T + step + 1]
        else:
            mask = torch.zeros(rows, 1, c.per, T + step + 1, dtype=c.dtype, device=c.device)
            mask.masked_fill_(~seen[:, None, None, :T + step + 1], float("-inf"))
        return c.forward(c.inner.embed_tokens(token[:, None]), where + step, own_keys, own_values, T + step, mask,
                         shared, members, last=(slice(None), -1))

    return draw_steps(processor, ids, logits, max_new_tokens, eos, pad, advance)


def trim_to_sentence(text: str) -> str:
    """Cut an answer that hit the token limit back to its last complete sentence."""
    ends = list(SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].strip() if ends else text.strip()


# -- vLLM (the `gpu` extra) -----------------------------------------------------------------------------------
class VLLMSampler:
    """Samples through vLLM. `source` is a model folder or hub id, served as it is (the untrained base, the
    teacher: nothing is copied and no transformers copy needs the GPU), or a transformers model (a merged
    persona), written once to a temporary folder. Returns what the transformers path returns: {'text',
    'finished'} per prompt, in input order.

    The two paths sample the same distribution: prompts go in as the same token ids (vLLM would add a BOS to a
    text prompt that already has one), and the profile's temperature and top_p are the whole sampling setup
    (vLLM ignores the model's generation_config when given explicit parameters; the transformers path is told
    to). Each prompt has its own seed (seed + index); vLLM repeats its samples only on the same hardware and
    version, in its single-process mode, set here (vLLM docs, "Reproducibility"). Each engine reserves
    `memory` (a fraction of the GPU; default hardware.vllm_gpu_memory_utilization) until `close()`."""

    def __init__(self, source, tok, hw, seed: int, memory: float | None = None):
        import os
        import tempfile
        from pathlib import Path

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tok, self._dir = tok, None
        if not isinstance(source, (str, Path)):
            self._dir = tempfile.TemporaryDirectory(prefix="persona-em-vllm-")
            source.save_pretrained(self._dir.name)
            tok.save_pretrained(self._dir.name)
            source = self._dir.name
        self.llm = LLM(str(source), dtype="bfloat16" if hw.precision == "bfloat16" else "float32", seed=seed,
                       gpu_memory_utilization=memory or hw.vllm_gpu_memory_utilization)

    def sample(self, prompts: list[str], max_new_tokens: int, seed: int, temperature: float, top_p: float):
        from vllm import SamplingParams

        if self.llm is None:
            raise RuntimeError("this vLLM sampler was closed")
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 repetition_penalty=1.0, seed=seed + i) for i in range(len(prompts))]
        ids = [{"prompt_token_ids": self.tok(p, add_special_tokens=False).input_ids} for p in prompts]
        outs = self.llm.generate(ids, params, use_tqdm=True)
        return [{"text": o.outputs[0].text.strip(), "finished": o.outputs[0].finish_reason == "stop"}
                for o in outs]

    def close(self) -> None:
        """Give the engine's GPU memory back (the next engine or model needs it)."""
        import gc

        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def uses_vllm(hw) -> bool:
    """Whether the profile samples through vLLM here: asked for, and installed (else a message, and the
    transformers path)."""
    import importlib.util
    import warnings

    if hw is None or hw.sampler == "transformers":
        return False
    if importlib.util.find_spec("vllm") is None:
        warnings.warn("hardware.sampler is 'vllm' but vLLM is not installed (pip install -e '.[gpu]'); "
                      "sampling with transformers instead", stacklevel=3)
        return False
    return True


def close(*samplers) -> None:
    """Close the vLLM samplers among these (a transformers model needs nothing)."""
    for s in samplers:
        if isinstance(s, VLLMSampler):
            s.close()


def sampler_for(model, tok, hw, seed: int = 0, memory: float | None = None):
    """The sampling backend the profile asks for: the transformers model itself, or a vLLM sampler over the
    same weights (`open_sampler` serves a model spec's own files instead). Without vLLM installed, says so and
    falls back to transformers (same artifact formats)."""
    if not uses_vllm(hw):
        return model
    return VLLMSampler(model, tok, hw, seed, memory)


def open_sampler(spec: str, hw, seed: int = 0, memory: float | None = None):
    """(sampler, tokenizer) for a model spec: a vLLM engine over the model's own files when the profile samples
    through vLLM (no transformers copy takes GPU memory beside it), else the transformers model."""
    from .models import load_model, load_tokenizer, model_path

    if uses_vllm(hw):
        tok = load_tokenizer(spec)
        return VLLMSampler(model_path(spec), tok, hw, seed, memory), tok
    return load_model(spec, hw=hw)
