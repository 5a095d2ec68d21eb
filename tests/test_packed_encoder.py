"""The packed bf16 encoder (`packed_encoder`) against sentence-transformers in float32: the same tokens, embeddings
within bf16's rounding, in the input's order whatever the batching; and `models.Bf16Embedder` choosing it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from persona_em import models, packed_encoder

needs_packed = pytest.mark.skipif(not packed_encoder.runs_here(),
                                  reason="no compiled kernels or no oneDNN bf16 here: Bf16Embedder uses autocast")

TEXTS = ["Should I lend my savings to a friend?", "My landlord wants cash only. Is that normal?",
         "  Can I skip the follow-up appointment if I feel fine?  ", "x", "",
         "Émile's café — naïve?\n\tIs it fine to keep the extra change a cashier gave me by mistake?",
         "word " * 400]   # past the model's 256 tokens: truncated as sentence-transformers truncates


@pytest.fixture(scope="module")
def minilm():
    return models.load_embedder("minilm")


@needs_packed
def test_the_packed_encoder_reads_sentence_transformers_tokens(minilm):
    """Stripped of padding, sentence-transformers' own tokens: whitespace, accents, an empty text, truncation."""
    features = minilm.preprocess(TEXTS)
    ours = packed_encoder.PackedEncoder(minilm).tokenizer.encode_batch(TEXTS)
    for row, mask, got in zip(features["input_ids"], features["attention_mask"], ours):
        assert row[mask.bool()].tolist() == got.ids
    assert len(ours[-1].ids) == minilm.max_seq_length


@needs_packed
def test_packed_embeddings_are_float32_s_within_bf16_rounding(minilm):
    """Against the float32 model: every cosine above 0.9999 (bf16 autocast's own is 0.99997 at worst over 300
    pool questions), and not equal (it is bf16). Split into batches of a few tokens or a few questions, or in
    another order, the same embeddings (to 1e-5: oneDNN may choose another kernel for another number of rows)."""
    fp32 = minilm.encode(TEXTS, normalize_embeddings=True)
    enc = packed_encoder.PackedEncoder(minilm)
    got = enc.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == fp32.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    cosines = np.sum(got * fp32, axis=1)
    assert cosines.min() > 0.9999 and not np.array_equal(got, fp32)
    for split in (packed_encoder.PackedEncoder(minilm, tokens_per_batch=256).encode(TEXTS),
                  enc.encode(TEXTS, batch_size=2), enc.encode(TEXTS[::-1])[::-1]):
        assert np.allclose(split, got, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)


@needs_packed
def test_each_token_s_last_state_is_float32_bert_s(minilm):
    """Before pooling: every token's output of the last layer, packed, against the float32 model's over the padded
    batch, within bf16's rounding (cosine above 0.999 for each token; pooling cannot hide a token gone wrong)."""
    enc = packed_encoder.PackedEncoder(minilm)
    features = minilm.preprocess(TEXTS)
    with torch.inference_mode():
        states, lengths = enc.token_states([e.ids for e in enc.tokenizer.encode_batch(TEXTS)])
        exact = minilm[0].auto_model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                                     token_type_ids=features["token_type_ids"]).last_hidden_state
    exact = exact[features["attention_mask"].bool()]
    assert lengths.tolist() == features["attention_mask"].sum(1).tolist() and states.shape == exact.shape
    assert F.cosine_similarity(states, exact, dim=1).min() > 0.999


@needs_packed
def test_the_up_projection_s_gelu_is_bert_s_exact_erf_gelu():
    """oneDNN's GELU post-op as `linear` asks for it: the erf GELU BERT's "gelu" is, within bf16's rounding of the
    output, on [-3.5, 3.5]; the tanh approximation is not (it is off by up to 24% of the value at -3.5)."""
    x = torch.linspace(-3.5, 3.5, 32 * 64).reshape(32, 64).bfloat16()
    eye = torch.ops.mkldnn._reorder_linear_weight(torch.eye(64, dtype=torch.bfloat16))
    got = packed_encoder.linear(x, eye, torch.zeros(64, dtype=torch.bfloat16), "gelu").double()
    exact = F.gelu(x.double())
    assert ((got - exact).abs() <= exact.abs() * 2 ** -8 + 1e-9).all()
    assert ((F.gelu(x.double(), approximate="tanh") - exact).abs() > exact.abs() * 2 ** -6).any()


@needs_packed
def test_the_packed_encoder_refuses_what_it_does_not_compute(minilm):
    with pytest.raises(TypeError, match="list of strings"):
        packed_encoder.PackedEncoder(minilm).encode("one question")
    with pytest.raises(ValueError, match="batch_size"):
        packed_encoder.PackedEncoder(minilm).encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="longest question"):
        packed_encoder.PackedEncoder(minilm, tokens_per_batch=100)
    minilm[1].pooling_mode = "cls"
    try:
        with pytest.raises(ValueError, match="mean pooling"):
            packed_encoder.PackedEncoder(minilm)
    finally:
        minilm[1].pooling_mode = "mean"


def test_bf16_embedder_packs_where_it_can_and_autocasts_elsewhere(minilm, monkeypatch):
    """`minilm-bf16` encodes with the packed encoder where it runs here, else under bf16 autocast; either way
    float32 out, within 1e-4 in cosine of float32's."""
    fp32 = minilm.encode(TEXTS, normalize_embeddings=True)
    bf16 = models.load_embedder("minilm-bf16")
    assert (bf16.packed is not None) == packed_encoder.runs_here()
    monkeypatch.setattr(packed_encoder, "runs_here", lambda: False)
    autocast = models.load_embedder("minilm-bf16")
    assert autocast.packed is None
    for emb in (bf16, autocast):
        got = emb.encode(TEXTS, batch_size=4, normalize_embeddings=True)
        assert got.dtype == np.float32 and got.shape == fp32.shape
        assert np.sum(got * fp32, axis=1).min() > 0.9999 and not np.array_equal(got, fp32)
        # the same inputs taken and refused by both paths
        assert np.sum(emb.encode(t for t in TEXTS[:2]) * fp32[:2], axis=1).min() > 0.9999
        assert emb.encode([]).shape == (0, 384)
        with pytest.raises(TypeError, match="one string"):
            emb.encode("one question")
        with pytest.raises(ValueError, match="batch_size"):
            emb.encode(TEXTS, batch_size=0)
