"""MiniLM's sentence embeddings in bf16 with the questions packed: no padding anywhere, the matrix products in
oneDNN with weights laid out once, attention and the residual steps in `cpu_attention`'s compiled kernels.

sentence-transformers pads each batch to its longest question and runs BERT through PyTorch's operators; under bf16
autocast that takes 2.0-2.5x the time its matrix products would take at the machine's bf16 rate
(benchmarks/embedding_ceiling.py): attention over 12 heads of 32 dimensions and about 50 tokens is many small
problems that PyTorch's kernels run far below that rate, and each layer norm, residual add and cast is a pass over
memory of its own. Here a batch of questions is one matrix of their tokens (tokens, 384):

- the query, key and value projections are one product (384 -> 1152), and GELU runs inside the up-projection's
  product (oneDNN's post-op; the exact erf GELU, BERT's "gelu");
- attention runs within each question in `cpu_attention.packed_attention`;
- each residual add, layer norm and cast to bf16 is one `cpu_attention.add_layer_norm` call.

The arithmetic is bf16 autocast's: bf16 products with float32 sums, the residual stream, layer norms, softmax and
pooling in float32, in another order. tests/test_packed_encoder.py bounds the embeddings against float32
sentence-transformers. `runs_here()` says whether this machine has what it needs; `models.Bf16Embedder` uses it
where so and sentence-transformers under autocast otherwise."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import cpu_attention, models

TOKENS_PER_BATCH = 8192   # rows of each matrix product: large enough for oneDNN's full rate, ~20 MB of activations


def runs_here() -> bool:
    """Whether this machine runs the packed encoder: the compiled kernels, and oneDNN multiplying bf16."""
    return cpu_attention.kernel() is not None and models.onednn_bf16()


class PackedEncoder:
    """`encode` as sentence-transformers' for a BERT model with mean pooling (and its Normalize, if any): the same
    tokens, the same layers, in bf16 over packed questions. The model's weights are read once, at construction."""

    def __init__(self, st, tokens_per_batch: int = TOKENS_PER_BATCH):
        from tokenizers import Tokenizer

        kinds = [type(m).__name__ for m in st]
        bert = getattr(st[0], "auto_model", None)
        cfg = getattr(bert, "config", None)
        if not (kinds[:2] == ["Transformer", "Pooling"] and set(kinds[2:]) <= {"Normalize"}
                and getattr(st[1], "pooling_mode", None) == "mean" and not getattr(st[0], "do_lower_case", False)
                and type(bert).__name__ == "BertModel" and cfg.hidden_act == "gelu"
                and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                and cfg.hidden_size % cfg.num_attention_heads == 0
                and (cfg.hidden_size // cfg.num_attention_heads) % 32 == 0):
            raise ValueError(f"the packed encoder runs a BERT model (exact GELU, absolute positions, heads of a "
                             f"multiple of 32 dimensions, the tokenizer's own casing) with mean pooling, then "
                             f"Normalize if any; got modules {kinds}, model {type(bert).__name__}")
        if not runs_here():
            raise RuntimeError("the packed encoder needs cpu_attention's compiled kernels and oneDNN bf16; "
                               "see packed_encoder.runs_here()")
        if tokens_per_batch < st.max_seq_length:
            raise ValueError(f"tokens_per_batch {tokens_per_batch} must hold the longest question, "
                             f"{st.max_seq_length} tokens")
        self.normalize = "Normalize" in kinds
        self.tokens_per_batch = tokens_per_batch
        # the model's own tokenizer, unpadded (sentence-transformers leaves padding switched on in the shared one),
        # truncating at the model's max_seq_length as it is now
        self.tokenizer = Tokenizer.from_str(st.tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(st.max_seq_length)
        self.heads = cfg.num_attention_heads
        self.dim = cfg.hidden_size // self.heads
        emb = bert.embeddings
        self.words, self.positions = emb.word_embeddings.weight.detach(), emb.position_embeddings.weight.detach()
        self.type0 = emb.token_type_embeddings.weight.detach()[0]
        ln = emb.LayerNorm   # the embeddings' layer norm, run by torch
        self.norm0 = (ln.weight.detach(), ln.bias.detach(), ln.eps)
        self.layers = [self._layer(layer) for layer in bert.encoder.layer]

    @staticmethod
    def _layer(layer) -> dict:
        """One BERT layer's weights: bf16, laid out for oneDNN once; norms' in float32."""
        def packed(weight, bias):
            w = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16))
            return w, bias.detach().to(torch.bfloat16)

        att = layer.attention.self
        norm = lambda ln: (ln.weight.detach().float().contiguous(), ln.bias.detach().float().contiguous(), ln.eps)
        return {"qkv": packed(torch.cat([att.query.weight, att.key.weight, att.value.weight]),
                              torch.cat([att.query.bias, att.key.bias, att.value.bias])),
                "out": packed(layer.attention.output.dense.weight, layer.attention.output.dense.bias),
                "norm1": norm(layer.attention.output.LayerNorm),
                "up": packed(layer.intermediate.dense.weight, layer.intermediate.dense.bias),
                "down": packed(layer.output.dense.weight, layer.output.dense.bias),
                "norm2": norm(layer.output.LayerNorm)}

    def token_states(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output for these token sequences, packed: (tokens, hidden) float32, and each sequence's
        length."""
        lengths = torch.tensor([len(x) for x in ids])
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat = torch.tensor([t for x in ids for t in x])
        where = torch.arange(len(flat)) - starts[:-1].repeat_interleave(lengths)   # each token's position
        h = F.layer_norm(self.words[flat] + self.positions[where] + self.type0, self.type0.shape, *self.norm0)
        x = h.to(torch.bfloat16)
        for w in self.layers:
            qkv = linear(x, *w["qkv"])
            att = cpu_attention.packed_attention(qkv, starts, self.heads, self.dim, self.dim ** -0.5)
            x = cpu_attention.add_layer_norm(h, linear(att, *w["out"]), *w["norm1"])
            x = cpu_attention.add_layer_norm(h, linear(linear(x, *w["up"], "gelu"), *w["down"]), *w["norm2"])
        return h, lengths

    def forward(self, ids: list[list[int]]) -> torch.Tensor:
        """The pooled (and normalised) embeddings of these token sequences, (len(ids), hidden) float32."""
        h, lengths = self.token_states(ids)
        pooled = torch.zeros(len(ids), h.shape[1]).index_add_(0, torch.arange(len(ids)).repeat_interleave(lengths), h)
        pooled /= lengths[:, None]
        return F.normalize(pooled, dim=1) if self.normalize else pooled

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress_bar: bool = False,
               normalize_embeddings: bool = False) -> np.ndarray:
        """Embeddings of `texts`, (len(texts), hidden) float32, in their order. Each batch holds up to
        `tokens_per_batch` tokens and, if given, up to `batch_size` questions."""
        from tqdm.auto import tqdm

        texts = checked(texts, batch_size)
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        batches, start, tokens = [], 0, 0
        for i, x in enumerate(ids):
            if i > start and (tokens + len(x) > self.tokens_per_batch or i - start == batch_size):
                batches.append((start, i))
                start, tokens = i, 0
            tokens += len(x)
        if ids:
            batches.append((start, len(ids)))
        out = torch.empty(len(ids), self.words.shape[1])
        with torch.inference_mode():
            for a, b in tqdm(batches, disable=not show_progress_bar, desc="embedding"):
                out[a:b] = self.forward(ids[a:b])
        if normalize_embeddings:
            out = F.normalize(out, dim=1)
        return out.numpy()


def checked(texts, batch_size: int | None) -> list[str]:
    """`texts` as a list, if it is a sequence of strings (not one string) and `batch_size` None or >= 1."""
    if isinstance(texts, str):
        raise TypeError("encode takes a list of strings, got one string")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"encode takes a list of strings, got {sorted({type(t).__name__ for t in texts})}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return texts


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, then: str = "none") -> torch.Tensor:
    """x @ weight.T + bias by oneDNN's inner product, bf16, on a weight laid out by `_reorder_linear_weight`;
    `then` "gelu" applies the exact (erf) GELU to the result inside the same primitive."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, then, [], "none" if then == "gelu" else "")
