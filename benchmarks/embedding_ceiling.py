"""How close bf16 embedding comes to its floor on this CPU: MiniLM's encode of pool questions by sentence-
transformers under bf16 autocast, with bf16 weights, and by the packed encoder (`packed_encoder`, what
`embedder: minilm-bf16` runs where it can), then one packed encode split by stage with timers around its calls:
the matrix products (oneDNN), attention and the residual steps (the compiled kernels), tokenizing, and the rest.
The floor is diversity_speed's: 2 x non-embedding parameters per token at this machine's 2048^3 bf16 matmul rate.
The matrix products' share is the ceiling: no change to the rest brings the encode below it.

    .venv/bin/python benchmarks/embedding_ceiling.py [N_QUESTIONS] [THREADS]    (default 2000 questions, 2 threads)

Without bf16 instructions it writes one row saying it measured nothing (bf16 is emulated there)."""
import sys
import time

import numpy as np
import torch

from peak import NO_BF16, embedding_flops, fastest_peak, native_bf16
from record import write
from persona_em import cpu_attention, diversity, models, packed_encoder, questions

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
torch.set_num_threads(threads)
if not native_bf16():
    write("embedding_ceiling", [{"figure": "embedding ceiling under bf16", "value": "", "unit": "", "ratio": "",
                                 "against": NO_BF16}])
    print(f"embedding_ceiling: {NO_BF16}")
    raise SystemExit(0)   # `make bench` goes on to the other benchmarks

texts = [q["text"] for q in questions.build_pool("bench", 0, "t", n, seed=0)]   # diversity_speed's pool
st = models.load_embedder("minilm")
tokens, flops = embedding_flops(st, texts)
ref = st.encode(texts, batch_size=128, show_progress_bar=False)
p16 = fastest_peak(torch.bfloat16)   # measured again at the end, the higher kept: the VM's rate drifts


def timed(label: str, encode) -> dict:
    encode(texts[:256])   # warm-up
    t0 = time.perf_counter()
    emb = np.asarray(encode(texts), dtype=np.float32)
    secs = time.perf_counter() - t0
    cos = float(np.mean(np.sum(diversity.unit(emb) * diversity.unit(ref), axis=1)))
    print(f"  {label}: {secs:.2f} s, mean cosine to float32 {cos:.6f}", flush=True)
    return {"figure": f"embedding {n} questions, MiniLM, {label} (mean cosine to float32 {cos:.6f})",
            "value": secs, "unit": "s", "against": "its floor at the bf16 peak (x)"}


class Timed:
    """A function that adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


print(f"{n} questions, {tokens} tokens, {flops / 1e12:.2f} TFLOP", flush=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    rows = [timed("sentence-transformers, bf16 autocast, batch 128",
                  lambda x: st.encode(x, batch_size=128, show_progress_bar=False))]
st16 = models.load_embedder("minilm").to(torch.bfloat16)
rows.append(timed("sentence-transformers, bf16 weights, batch 128",
                  lambda x: st16.encode(x, batch_size=128, show_progress_bar=False, convert_to_tensor=True).float()))
if not packed_encoder.runs_here():   # no C compiler or no oneDNN bf16: the two rows above, and why no more
    floor = flops / max(p16, fastest_peak(torch.bfloat16))
    for r in rows:
        r["ratio"] = r["value"] / floor
    rows.append({"figure": "embedding: packed encoder", "value": "", "unit": "", "ratio": "",
                 "against": "not measured: its compiled kernels or oneDNN bf16 do not run here"})
    print(f"embedding_ceiling: the packed encoder does not run here; wrote {write('embedding_ceiling', rows)}")
    raise SystemExit(0)   # `make bench` goes on to the other benchmarks
packed = packed_encoder.PackedEncoder(models.load_embedder("minilm"))
rows.append(timed(f"packed encoder (minilm-bf16), up to {packed.tokens_per_batch} tokens per batch", packed.encode))

# One packed encode with timers around its stages (each call's own time; the rest is Python and indexing).
PRODUCTS = "matrix products (GELU inside)"
stages = {PRODUCTS: (packed_encoder, "linear"), "attention": (cpu_attention, "packed_attention"),
          "residual adds and layer norms": (cpu_attention, "add_layer_norm")}
timers = {}
for name, (owner, attr) in stages.items():
    timers[name] = Timed(getattr(owner, attr))
    setattr(owner, attr, timers[name])
timers["tokenizing"] = Timed(packed.tokenizer.encode_batch)
packed.tokenizer = type("TimedTokenizer", (), {"encode_batch": staticmethod(timers["tokenizing"])})()
t0 = time.perf_counter()
packed.encode(texts)
total = time.perf_counter() - t0
p16 = max(p16, fastest_peak(torch.bfloat16))
floor = flops / p16
for r in rows:
    r["ratio"] = r["value"] / floor
print("\n".join(f"  {r['figure']}: {r['value']:.2f} s = {r['ratio']:.2f} x the floor" for r in rows))
print(f"bf16 peak {p16 / 1e9:.0f} GFLOP/s: floor {floor:.2f} s")
split = {name: t.seconds for name, t in timers.items()}
split["other work (Python, indexing, pooling)"] = total - sum(split.values())
print(f"  packed encode split {total:.2f} s: " + ", ".join(f"{k} {v:.2f} s ({v / floor:.2f} x)" for k, v in split.items()))
linear = split[PRODUCTS]
rows += [
    {"figure": f"embedding ceiling: the packed encoder's matrix products alone (oneDNN bf16, {flops / linear / p16:.0%} "
               f"of the 2048^3 rate at MiniLM's shapes), {n} questions", "value": linear, "unit": "s",
     "ratio": linear / floor, "against": "its floor at the bf16 peak (x)"},
    *({"figure": f"embedding: packed encoder, {name}, {n} questions", "value": v, "unit": "s", "ratio": v / floor,
       "against": "its floor at the bf16 peak (x)"} for name, v in split.items() if name != PRODUCTS),
    {"figure": "embedding ceiling: bf16 matmul peak (2048^3)", "value": p16 / 1e9, "unit": "GFLOP/s", "ratio": "",
     "against": ""}]
print(f"wrote {write('embedding_ceiling', rows)}")
