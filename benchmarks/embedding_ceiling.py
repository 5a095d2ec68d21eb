"""How close bf16 embedding can come to its floor on this CPU: MiniLM's encode of pool questions under bf16
autocast (as `embedder: minilm-bf16` runs it) and with bf16 weights, timed at two batch sizes, then one encode
split by PyTorch's profiler into its linear layers (aten::addmm), attention and the rest. The floor is
diversity_speed's: 2 x non-embedding parameters per token at this machine's 2048^3 bf16 matmul rate. If the
linear layers alone, at MiniLM's shapes (384 and 1536 wide), already take most of 1.5x the floor, no batching or
bucketing brings the whole encode within it.

    .venv/bin/python benchmarks/embedding_ceiling.py [N_QUESTIONS] [THREADS]    (default 2000 questions, 2 threads)

Without bf16 instructions it writes one row saying it measured nothing (bf16 is emulated there)."""
import sys
import time

import numpy as np
import torch

from peak import NO_BF16, embedding_flops, fastest_peak, native_bf16
from record import write
from persona_em import diversity, models, questions

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


autocast = models.Bf16Embedder(st)   # what `embedder: minilm-bf16` runs
autocast_encode = lambda batch: lambda x: autocast.encode(x, batch_size=batch, show_progress_bar=False)
print(f"{n} questions, {tokens} tokens, {flops / 1e12:.2f} TFLOP", flush=True)
rows = [timed(f"bf16 autocast, batch {b}", autocast_encode(b)) for b in (128, 512)]
st16 = models.load_embedder("minilm").to(torch.bfloat16)
rows += [timed(f"bf16 weights, batch {b}",
               lambda x, b=b: st16.encode(x, batch_size=b, show_progress_bar=False, convert_to_tensor=True).float())
         for b in (128, 512)]

# One encode (autocast, batch 128) under the profiler: its operators' own time, grouped.
from torch.profiler import ProfilerActivity, profile

encode = autocast_encode(128)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    encode(texts)
self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
total = sum(self_us.values()) / 1e6
linear = self_us.get("aten::addmm", 0) / 1e6
attention = sum(v for k, v in self_us.items() if "attention" in k) / 1e6
if linear == 0:   # another PyTorch build may route nn.Linear through another kernel: say so, do not divide by 0
    raise SystemExit(f"embedding_ceiling: no aten::addmm in the profile; operators: {sorted(self_us)[:20]}")
p16 = max(p16, fastest_peak(torch.bfloat16))
floor = flops / p16
for r in rows:
    r["ratio"] = r["value"] / floor
print("\n".join(f"  {r['figure']}: {r['value']:.2f} s = {r['ratio']:.2f} x the floor" for r in rows))
print(f"bf16 peak {p16 / 1e9:.0f} GFLOP/s: floor {floor:.2f} s")
print(f"  profiled encode {total:.2f} s: linear layers (addmm) {linear:.2f} s = {linear / floor:.2f} x the floor "
      f"({flops / linear / p16:.0%} of the bf16 peak at MiniLM's shapes), attention {attention:.2f} s, the rest "
      f"{total - linear - attention:.2f} s", flush=True)
rows += [
    {"figure": f"embedding ceiling: MiniLM's linear layers alone (profiler's addmm, bf16 autocast, batch 128), "
               f"{n} questions", "value": linear, "unit": "s", "ratio": linear / floor,
     "against": "its floor at the bf16 peak (x)"},
    {"figure": f"embedding ceiling: linear layers and attention (attention {attention:.2f} s), {n} questions",
     "value": linear + attention, "unit": "s", "ratio": (linear + attention) / floor,
     "against": "its floor at the bf16 peak (x)"},
    {"figure": "embedding ceiling: bf16 matmul peak (2048^3)", "value": p16 / 1e9, "unit": "GFLOP/s", "ratio": "",
     "against": ""}]
print(f"wrote {write('embedding_ceiling', rows)}")
