"""This machine's own matmul rate, the yardstick the CPU benchmarks report against."""
import time

import torch

# where the CPU has no bf16 instructions the benchmarks leave their bf16 cases out (PyTorch emulates them,
# about 100x slower than float32: hours for `make bench`) and say so
from persona_em.models import native_bf16


def matmul_peak(dtype=torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` size^3 matmuls in `dtype`, after one warm-up."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def fastest_peak(dtype=torch.float32, tries: int = 3) -> float:
    """The highest `matmul_peak` of `tries` calls: this VM's matmul rate drifts between calls, and the highest
    rate seen is what the cores can do (a ratio against it is then conservative)."""
    return max(matmul_peak(dtype) for _ in range(tries))


def bf16_peak(tries: int = 3) -> float:
    """The bf16 matmul rate: the 2048^3 yardstick on a CPU with bf16 instructions, else one 256^3 product (the
    emulated rate, measured in a moment)."""
    return fastest_peak(torch.bfloat16, tries) if native_bf16() else matmul_peak(torch.bfloat16, size=256, repeats=1)


def embedding_flops(embedder, texts: list[str]) -> tuple[int, int]:
    """(tokens, FLOPs) of encoding `texts` at the embedding floor's count: 2 x non-embedding parameters per token
    (the matmuls; attention over ~50 tokens is small), BERT's pooler left out (it runs once per question, on [CLS]
    only, and sentence embeddings pool the tokens' states instead: negligible per token)."""
    tokens = sum(len(ids) for ids in embedder.tokenizer(texts)["input_ids"])
    dense = sum(p.numel() for name, p in embedder.named_parameters() if "embeddings" not in name
                and "pooler" not in name)
    return tokens, 2 * dense * tokens


NO_BF16 = "not measured: no bf16 instructions on this CPU (bf16 matmuls emulated)"
