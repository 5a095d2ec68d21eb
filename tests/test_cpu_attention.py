"""The compiled kernels (`cpu_attention`): the own-token attention and the packed encoder's attention and residual
step against float64 arithmetic, the shapes they refuse, the OpenMP threads they run on, and decoding through the
own-token kernel against the flash kernel's path."""
import pytest
import torch
import torch.nn.functional as F

from persona_em import cpu_attention, sampling

needs_kernel = pytest.mark.skipif(cpu_attention.kernel() is None,
                                  reason="no C compiler or no AVX-512 bf16 on this CPU: the flash kernel runs")


def _case(rows, kv, per, dim, width, n, seed):
    """bf16 queries and key/value buffers, each row's first keys unseen (left padding, as the turns are padded)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, kv, per, dim, generator=g).bfloat16()
    k, v = (torch.randn(rows, kv, width, dim, generator=g).bfloat16() for _ in range(2))
    pad = torch.randint(0, n - 1, (rows,), generator=g)
    seen = torch.arange(width)[None, :] >= pad[:, None]
    return q, k, v, seen


def _exact(q, k, v, seen, scale):
    """Attention in float64: (output, log-sum-exp) per (row, kv head, query head)."""
    s = torch.einsum("rhpd,rhjd->rhpj", q.double(), k.double()) * scale
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    return torch.einsum("rhpj,rhjd->rhpd", s.softmax(-1), v.double()), s.logsumexp(-1)


@needs_kernel
@pytest.mark.parametrize("per,dim", [(1, 32), (3, 64), (7, 64), (2, 128), (8, 256)])
def test_the_kernel_is_attention_rounded_once_to_bf16(per, dim):
    """Over the first n positions of wider buffers, with padding masked, alone and merged with a shared part by
    the log-sum-exps: the float64 attention over all the keys, within bf16's rounding of the output."""
    rows, kv, width, n, scale = 9, 2, 40, 29, dim ** -0.5
    q, k, v, seen = _case(rows, kv, per, dim, width, n, seed=per * dim)
    own, own_lse = _exact(q, k[:, :, :n], v[:, :, :n], seen[:, :n], scale)
    got = cpu_attention.own_attention(q, k[:, :, :n], v[:, :, :n], seen[:, :n], scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert ((got.double() - own).abs() <= own.abs() * 2 ** -8 + 1e-6).all()
    # a shared context of 17 keys, all seen: its part as the flash kernel hands it over (bf16, float32 lse)
    _, sk, sv, _ = _case(rows, kv, per, dim, 17, 17, seed=1)
    other, other_lse = _exact(q, sk, sv, torch.ones(rows, 17, dtype=torch.bool), scale)
    both, _ = _exact(q, torch.cat([k[:, :, :n], sk], 2), torch.cat([v[:, :, :n], sv], 2),
                     torch.cat([seen[:, :n], torch.ones(rows, 17, dtype=torch.bool)], 1), scale)
    got = cpu_attention.own_attention(q, k[:, :, :n], v[:, :, :n], seen[:, :n], scale,
                                      (other.bfloat16(), other_lse.float()))
    # the shared part arrives rounded to bf16: up to two bf16 roundings apart from exact arithmetic
    assert ((got.double() - both).abs() <= both.abs().clamp(min=other.abs()) * 2 ** -7 + 1e-5).all()
    assert (both - own).abs().max() > 0.05   # the shared part matters: the merge is tested


def test_the_kernel_refuses_buffers_it_would_misread():
    """Before any read, and whether or not the kernel can be built here."""
    q, k, v, seen = _case(4, 2, 3, 64, 16, 10, seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_attention.own_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, seen, 0.125)
    with pytest.raises(ValueError, match="seen must be bool"):
        cpu_attention.own_attention(q, k, v, seen.float(), 0.125)
    with pytest.raises(ValueError, match="shared part"):
        cpu_attention.own_attention(q, k, v, seen, 0.125, (q.float(), torch.zeros(4, 2, 3)))
    for q2, k2, v2 in ((q.half(), k.half(), v.half()), (q[:, :, :, :48], k[..., :48], v[..., :48])):
        with pytest.raises(ValueError, match="the kernel takes bf16"):   # its arrays' sizes, before any read
            cpu_attention.own_attention(q2, k2, v2, seen, 0.125)
    wide = torch.zeros(4, 2, cpu_attention.MAX_PER + 1, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="query heads"):
        cpu_attention.own_attention(wide, k, v, seen, 0.125)
    with pytest.raises(ValueError, match="1 to 21845 keys"):   # the scores of 3 query heads over too many keys
        cpu_attention.own_attention(q, *(torch.zeros(4, 2, 21846, 64, dtype=torch.bfloat16),) * 2,
                                    torch.ones(4, 21846, dtype=torch.bool), 0.125)


def test_without_a_usable_compiler_the_flash_kernel_runs(monkeypatch):
    """A compiler that is not there, or quoting that does not parse, builds nothing and raises nothing; a
    compiler named with an option builds as the plain one does. (Each a fresh build: `kernel` itself is cached.)"""
    import os
    import shutil

    plain = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setattr(cpu_attention, "BUILT", cpu_attention.BUILT)   # what this process's manifests report
    for named in ("/nonexistent/cc", "gcc '-m64"):
        monkeypatch.setenv("CC", named)
        assert cpu_attention.kernel.__wrapped__() is None
    if plain:
        monkeypatch.setenv("CC", f"{plain} -m64")
        assert (cpu_attention.kernel.__wrapped__() is None) == (cpu_attention.kernel() is None)


def test_the_kernel_is_used_only_where_it_computes_the_same_attention():
    cpu = torch.device("cpu")
    built = cpu_attention.kernel() is not None
    assert cpu_attention.fits(torch.bfloat16, cpu, 3, 64, 500) == built
    assert not cpu_attention.fits(torch.float32, cpu, 3, 64, 500)   # float32 decoding keeps the flash kernel
    assert not cpu_attention.fits(torch.bfloat16, torch.device("cuda"), 3, 64, 500)
    assert not cpu_attention.fits(torch.bfloat16, cpu, 9, 64, 500)   # more query heads than it holds
    assert not cpu_attention.fits(torch.bfloat16, cpu, 3, 48, 500)   # not a multiple of 32
    assert not cpu_attention.fits(torch.bfloat16, cpu, 3, 64, cpu_attention.MAX_SCORES)   # scores off its stack


@needs_kernel
def test_the_kernel_runs_on_torch_s_openmp_threads(tmp_path, root):
    """Linked to the libgomp torch loaded: `torch.set_num_threads` sets its thread count (a second OpenMP
    runtime would keep its own pool, competing with torch's for the cores). A run's manifest names its compiler."""
    import json

    from persona_em import provenance
    from persona_em.config import load_profile

    run = provenance.Run("01_generate", load_profile(root / "params" / "test.yaml"), tmp_path)
    assert json.loads(run.finish().read_text())["compiled_attention"].endswith(" -O3 -march=native")
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert cpu_attention.kernel().threads() == n
    finally:
        torch.set_num_threads(before)


def _decoder():
    """A random llama decoder whose heads the kernel takes (dimension 32, 2 query heads per key/value head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


class _Forced:
    """Draws fixed tokens and keeps the scores it is handed."""

    def __init__(self, tokens):
        self.tokens, self.seen = tokens, []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.float().clone())
        out = torch.full_like(scores, float("-inf"))
        return out.index_put_((torch.arange(len(scores)), self.tokens[:, len(self.seen) - 1]), torch.tensor(0.0))


def test_rows_by_group_are_slices_where_consecutive():
    got = sampling.by_group(torch.tensor([1, 1, 0, 0, 0]))
    assert [(g, idx) for g, idx in got] == [(0, slice(2, 5)), (1, slice(0, 2))]
    got = sampling.by_group(torch.tensor([0, 1, 0]))
    assert got[0][0] == 0 and torch.equal(got[0][1], torch.tensor([0, 2])) and got[1] == (1, slice(1, 2))


@needs_kernel
@pytest.mark.parametrize("groups", [[0, 0, 1, 1], [0, 1, 1, 0]])
def test_decoding_through_the_kernel_stays_as_close_to_float32_as_the_flash_path(groups, monkeypatch):
    """`decode_shared` under bf16 autocast, its own-token attention by the kernel and by the flash kernel, both
    forced along the same tokens, against the same loop in float32: the kernel's scores are no further from
    float32's than the flash path's (both are bf16 rounding), and the kernel ran at every step. Rows in group
    order (each group's rows a slice) and not (gathered by index)."""
    model = _decoder()
    gen = torch.Generator().manual_seed(3)
    heads = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (9, 5)]
    tails = [torch.randint(2, 512, (n,), generator=gen).tolist() for n in (3, 6, 2, 4)]
    expand = torch.tensor([0, 0, 1, 2, 3, 3])
    forced = torch.randint(2, 512, (len(expand), 8), generator=gen)
    calls = []
    kernel_attention = cpu_attention.own_attention
    monkeypatch.setattr(cpu_attention, "own_attention", lambda *a: calls.append(1) or kernel_attention(*a))

    def scores(bf16: bool, kernel: bool):
        with monkeypatch.context() as m, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if not kernel:
                m.setattr(cpu_attention, "kernel", lambda: None)
            run, forced_draws = sampling.Cascade(model), _Forced(forced)
            out = sampling.decode_shared(model, run.contexts(heads), tails, groups, expand, 8, forced_draws,
                                         torch.tensor([1]), 0, run)
        assert torch.equal(out, forced)
        return forced_draws.seen

    exact = scores(False, False)
    assert not calls
    flash = scores(True, False)
    assert not calls
    ours = scores(True, True)
    assert len(calls) == 7 * 2   # every step after the first (the prompt pass's logits), every layer
    flash_off = max((x - y).abs().max() for x, y in zip(flash, exact))
    ours_off = max((x - y).abs().max() for x, y in zip(ours, exact))
    assert 0 < ours_off <= 1.5 * flash_off
    assert all(x.std() > 1e-3 for x in exact)


def _packed_exact(qkv, lengths, heads, dim, scale):
    """Each sequence's attention over its own tokens, in float64: (tokens, heads x dim)."""
    out, at = [], 0
    for n in lengths:
        q, k, v = qkv[at:at + n, :3 * heads * dim].double().view(n, 3, heads, dim).unbind(1)
        s = torch.einsum("ihd,jhd->hij", q, k) * scale
        out.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v).reshape(n, heads * dim))
        at += n
    return torch.cat(out)


@needs_kernel
@pytest.mark.parametrize("heads,dim,lengths,scale", [(12, 32, [1, 2, 15, 16, 17, 33, 50], 32 ** -0.5),
                                                     (2, 64, [300, 3], 0.3), (1, 128, [31, 1, 64], 128 ** -0.5)])
def test_packed_attention_is_each_sequence_s_attention_rounded_once_to_bf16(heads, dim, lengths, scale):
    """Sequences of 1 to 300 tokens (one to 19 blocks of 16 keys, full and partial), packed, in rows wider than
    their queries, keys and values: float64's attention within each sequence, within bf16's rounding of the
    output; no token sees another sequence's."""
    g = torch.Generator().manual_seed(heads * dim)
    qkv = (2 * torch.randn(sum(lengths), 3 * heads * dim + 32, generator=g)).bfloat16()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got = cpu_attention.packed_attention(qkv, starts, heads, dim, scale)
    exact = _packed_exact(qkv, lengths, heads, dim, scale)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    # bf16's rounding of the output; beside it, float32's rounding of the scores and exp's 1e-6 relative error
    # in the weights, times values of up to ~8 (1e-5)
    assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-5).all()
    merged = _packed_exact(qkv, [sum(lengths)], heads, dim, scale)   # had sequences seen each other's tokens
    assert (merged - exact).abs().max() > 0.1


def test_packed_attention_refuses_what_it_would_misread():
    qkv = torch.zeros(10, 3 * 64, dtype=torch.bfloat16)
    starts = torch.tensor([0, 4, 10])
    for bad in (qkv.float(), qkv[:, :100], qkv.t().contiguous().t()):
        with pytest.raises(ValueError, match="qkv must be"):
            cpu_attention.packed_attention(bad, starts, 2, 32, 0.1)
    with pytest.raises(ValueError, match="qkv must be"):   # heads of 48: not a multiple of 32
        cpu_attention.packed_attention(torch.zeros(10, 3 * 48, dtype=torch.bfloat16), starts, 1, 48, 0.1)
    for bad in (torch.tensor([0, 4, 9]), torch.tensor([1, 4, 10]), torch.tensor([0, 4, 4, 10]),
                torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0]), torch.tensor(10)):
        with pytest.raises(ValueError, match="starts must be"):
            cpu_attention.packed_attention(qkv, bad, 2, 32, 0.1)


@needs_kernel
@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_add_layer_norm_is_autocast_s_residual_step(eps):
    """h <- LayerNorm(h + o) in float32, in place, and h rounded to bf16 returned: float64's layer norm within
    float32's rounding, and the returned matrix exactly the new h cast to bf16."""
    g = torch.Generator().manual_seed(0)
    h, o = 3 * torch.randn(37, 384, generator=g), torch.randn(37, 384, generator=g).bfloat16()
    weight, bias = torch.randn(384, generator=g), torch.randn(384, generator=g)
    exact = F.layer_norm((h.double() + o.double()), (384,), weight.double(), bias.double(), eps)
    x = cpu_attention.add_layer_norm(h, o, weight, bias, eps)
    assert (h.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    assert torch.equal(x, h.bfloat16())
    with pytest.raises(ValueError, match="add_layer_norm takes"):
        cpu_attention.add_layer_norm(h, o.float(), weight, bias, 1e-12)
    with pytest.raises(ValueError, match="add_layer_norm takes"):
        cpu_attention.add_layer_norm(h[:, :100].contiguous(), o[:, :100].contiguous(), weight[:100], bias[:100],
                                     1e-12)


@needs_kernel
def test_packed_attention_keeps_a_nan_in_its_sequence():
    """A NaN key makes its own sequence's outputs NaN for that head (as float arithmetic would), not a weight of 0;
    the other sequences stay finite."""
    qkv = torch.randn(20, 3 * 2 * 32).bfloat16()
    qkv[3, 2 * 32] = float("nan")   # token 3's key, head 0, in the first of two sequences (0-9, 10-19)
    got = cpu_attention.packed_attention(qkv, torch.tensor([0, 10, 20]), 2, 32, 32 ** -0.5)
    assert got[:10, :32].isnan().all() and got[:10, 32:].isfinite().all() and got[10:].isfinite().all()


def test_packed_attention_raises_when_its_buffers_cannot_be_had(monkeypatch):
    """The kernel's failed allocation comes back as a MemoryError naming the sizes, not as a crash or zeros."""
    monkeypatch.setattr(cpu_attention, "kernel", lambda: type("Failing", (), {"packed_attention": lambda *a: 1})())
    with pytest.raises(MemoryError, match="longest sequence of 6 tokens and 2 heads of 32"):
        cpu_attention.packed_attention(torch.zeros(10, 3 * 64, dtype=torch.bfloat16), torch.tensor([0, 4, 10]), 2,
                                       32, 0.1)
