"""Chapter 1's sampling on the embedded model, backend by backend, in one run: generated tokens per second and
their share of this machine's matmul peak (2 x parameters FLOPs per generated token), on the contexts chapter 1
samples in (`sampling_workload`: `tiny`'s best-of-n).

Backends: transformers' `generate` over the full prompts in float32 and under bf16 autocast; the shared-prefix
path of chapter 1 (each domain's demonstrations run once, their cache shared), one context per batch or packed
(`sampling.generate_prefixed`: several contexts per batch); transformers' own top-p (`sort`) and
`sampling.TopKNucleus` (`topk`), drawn through `generate` or through the lean loop chapters 1 and 4 use with
`topk`: `sampling.decode_cached` (`generate`'s draws, keys and values written in place; packed, each row over its
own copy of its prefix) or, packed on a CPU, `sampling.decode_shared` (cascade attention: each context's cache read
once per group of rows, each turn's prompt run once for its samples; the scores differ in rounding only; each
row's own tokens attended to by `cpu_attention`'s compiled kernel, or, in a case of its own, by the flash kernel);
larger length-sorted batches, up to all rows in one; a static KV cache under `torch.compile`; vLLM's CPU build
(`.venv-vllm`, the engine the project's `VLLMSampler` opens; its start reported apart); and the lean loop's
decoding alone over prefix copies, its prompt passes timed apart. Tokens are counted the same way for every
backend: the reply's tokens, plus one for a reply that ended.
The peaks are the fastest of several matmuls before and after (this VM's rate drifts).

    .venv/bin/python benchmarks/sampling_backends.py [N_DOMAINS] [THREADS] [compile]

`compile` adds the static cache under torch.compile: each new batch shape compiles again (minutes each on 2
cores), so it is measured on request, not by `make bench`.

Writes benchmarks/results/sampling_backends.csv (`record`'s format).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch

from persona_em import cpu_attention, models, sampling
from peak import bf16_peak, fastest_peak, native_bf16
from record import write
from sampling_workload import MAX_NEW, N, T, TOP_P, workload

warnings.filterwarnings("ignore")
LEAN, CASCADE, KERNEL = sampling.lean_decoding, sampling.cascade_decoding, cpu_attention.kernel
ROOT = Path(__file__).resolve().parents[1]
n_domains = int(sys.argv[1]) if len(sys.argv) > 1 else 4
threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
with_compile = "compile" in sys.argv[3:]
torch.set_num_threads(threads)


NATIVE = native_bf16()   # without bf16 instructions the bf16 cases run as their float32 twins (bf16 is emulated)
PREC = "bf16 autocast" if NATIVE else "float32"


def peaks():
    return fastest_peak(torch.float32), bf16_peak()


model, tok = models.load_model(models.EMBEDDED)
params = sum(p.numel() for p in model.parameters())
prompts, groups = workload(tok, n_domains)
prompt_tokens = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) / len(prompts)


def count(replies):
    return sum(len(tok(r["text"], add_special_tokens=False).input_ids) + r["finished"] for r in replies)


def flat(nucleus, batch, lean=True):
    def go():
        with mock.patch.object(sampling, "lean_decoding", lambda m: lean and LEAN(m)):
            return sampling.sample_text(model, tok, prompts, MAX_NEW, 0, batch, T, TOP_P, nucleus=nucleus)
    return go


def shared(nucleus, batch, cascade=True):
    """One context per batch; `cascade` as in `packed`."""
    def go():
        torch.manual_seed(0)
        with mock.patch.object(sampling, "cascade_decoding", lambda m, n: cascade and CASCADE(m, n)):
            return [r for prefix, turns in groups.items() for rs in sampling.generate_shared_prefix(
                model, tok, json.loads(prefix), turns, N, MAX_NEW, batch, T, TOP_P, nucleus=nucleus) for r in rs]
    return go


def packed(nucleus, batch, lean=True, cascade=True, kernel=True):
    """`lean` False: the top-k nucleus through transformers' `generate` instead of the lean loop; `cascade` False:
    each row over its own copy of its prefix (`sampling.decode_cached`) instead of `sampling.decode_shared`;
    `kernel` False: decoding's own-token attention by the flash kernel instead of `cpu_attention`'s."""
    def go():
        torch.manual_seed(0)
        with mock.patch.object(sampling, "lean_decoding", lambda m: lean and LEAN(m)), \
                mock.patch.object(sampling, "cascade_decoding", lambda m, n: cascade and CASCADE(m, n)), \
                mock.patch.object(cpu_attention, "kernel", KERNEL if kernel else lambda: None):
            got = sampling.generate_prefixed(model, tok, [(json.loads(p), turns) for p, turns in groups.items()],
                                             N, MAX_NEW, batch, T, TOP_P, nucleus=nucleus)
        return [r for g in got for rs in g for r in rs]
    return go


def compiled(batch):
    """Static KV cache, the forward pass under torch.compile (the first call compiles; timed: the second)."""
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, dynamic=False)
    try:
        t0 = time.perf_counter()
        flat("topk", batch, lean=False)()
        print(f"  compile and first call: {time.perf_counter() - t0:.0f} s", flush=True)
        return flat("topk", batch, lean=False)
    except Exception as e:   # report, do not hide: the table says it failed
        print(f"  torch.compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def vllm():
    """The project's VLLMSampler under .venv-vllm on the same prompts; (seconds sampling, engine start, replies)."""
    py = ROOT / ".venv-vllm" / "bin" / "python"
    if not py.exists():
        return None
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "in.json").write_text(json.dumps({"prompts": prompts, "max_new_tokens": MAX_NEW,
                                                     "temperature": T, "top_p": TOP_P}))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "VLLM_CPU_KVCACHE_SPACE": "2",
               "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}"}
        run = subprocess.run([str(py), str(ROOT / "benchmarks" / "vllm_sampling.py"), f"{d}/in.json", f"{d}/out.json"],
                             env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            print("  vLLM failed:", run.stderr[-1500:], flush=True)
            return None
        return json.loads((Path(d) / "out.json").read_text())


p32, p16 = peaks()
print(f"{len(prompts)} samples of {len(prompts) // (2 * N)} questions over {len(groups)} shared contexts, {prompt_tokens:.0f} prompt tokens on average; "
      f"peaks fp32 {p32 / 1e9:.0f}, bf16 {p16 / 1e9:.0f} GFLOP/s at {threads} threads", flush=True)
fp32 = lambda: torch.autocast("cpu", enabled=False)
bf16 = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if NATIVE else fp32
cases = [("generate, float32, sort, batch 32", fp32, flat("sort", 32)),
         ("generate, bf16 autocast, sort, batch 32", bf16, flat("sort", 32)),
         ("shared prefix, bf16 autocast, sort, batch 32 (tiny's chapter 1)", bf16, shared("sort", 32)),
         ("shared prefix, bf16 autocast, topk, lean loop, a prefix copy per row, batch 32", bf16,
          shared("topk", 32, cascade=False)),
         ("shared prefix, bf16 autocast, topk, lean loop, cascade attention, batch 32", bf16, shared("topk", 32)),
         ("packed prefixes, bf16 autocast, topk through generate, batch 64", bf16, packed("topk", 64, lean=False)),
         ("packed prefixes, bf16 autocast, topk, lean loop, a prefix copy per row, batch 64", bf16,
          packed("topk", 64, cascade=False)),
         ("packed prefixes, bf16 autocast, topk, lean loop, cascade attention, batch 32", bf16, packed("topk", 32)),
         ("packed prefixes, bf16 autocast, topk, lean loop, cascade attention, batch 64", bf16, packed("topk", 64)),
         (f"packed prefixes, bf16 autocast, topk, lean loop, cascade attention, one batch of all {len(prompts)}",
          bf16, packed("topk", len(prompts))),
         *([(f"packed prefixes, bf16 autocast, topk, lean loop, cascade attention, one batch of all {len(prompts)}, "
             f"own-token attention by the flash kernel", bf16, packed("topk", len(prompts), kernel=False))]
           if KERNEL() is not None else []),   # built here, before any timed case; without it the case
                                               # above already runs the flash kernel
         (f"packed prefixes, float32, topk, lean loop, cascade attention, one batch of all {len(prompts)}", fp32,
          packed("topk", len(prompts))),
         ("full prompts, bf16 autocast, topk, lean loop, batch 32", bf16, flat("topk", 32)),
         ("full prompts, bf16 autocast, topk, lean loop, batch 64", bf16, flat("topk", 64))]
named = {}   # without bf16 instructions each bf16 case is its float32 twin, run once
for name, ctx, fn in cases:
    named.setdefault(name.replace("bf16 autocast", PREC), (ctx, fn))
cases = [(name, ctx, fn) for name, (ctx, fn) in named.items()]
sampling.sample_text(model, tok, prompts[:8], 8, 0, 8, T, TOP_P)   # warm-up: the baseline starts warm too
rows = []
for name, ctx, fn in cases:
    with ctx():
        t0 = time.perf_counter()
        replies = fn()
        secs = time.perf_counter() - t0
    rows.append({"backend": name, "tokens": count(replies), "seconds": round(secs, 2)})
    print(f"  {name}: {rows[-1]['tokens'] / secs:.0f} tok/s", flush=True)
# Over a prefix copy per row, the lean loop runs the model's forward only for prompt passes (each context's prefix,
# each batch's turns); the rest is decoding. Timing those calls splits the packed batch-64 case into the two.
prompt_seconds, forward = [0.0], model.forward


def timed_forward(*args, **kwargs):
    t0 = time.perf_counter()
    out = forward(*args, **kwargs)
    prompt_seconds[0] += time.perf_counter() - t0
    return out


model.forward = timed_forward
try:   # the cases after this one run the model's own forward, even when this one fails
    with bf16():
        t0 = time.perf_counter()
        replies = packed("topk", 64, cascade=False)()
        secs = time.perf_counter() - t0
finally:
    model.forward = forward
rows.append({"backend": f"packed prefixes, {PREC}, topk, lean loop, a prefix copy per row, batch 64: decoding alone "
                        f"(prompt passes "
                        f"{prompt_seconds[0]:.0f} of {secs:.0f} s apart)",
             "tokens": count(replies), "seconds": round(secs - prompt_seconds[0], 2)})
print(f"  {rows[-1]['backend']}: {rows[-1]['tokens'] / rows[-1]['seconds']:.0f} tok/s", flush=True)
with bf16():
    fn = compiled(64) if with_compile else None
    if fn is not None:
        t0 = time.perf_counter()
        replies = fn()
        rows.append({"backend": f"generate, {PREC}, topk, batch 64, static cache + torch.compile",
                     "tokens": count(replies), "seconds": round(time.perf_counter() - t0, 2)})
        print(f"  {rows[-1]['backend']}: {rows[-1]['tokens'] / rows[-1]['seconds']:.0f} tok/s", flush=True)
got = vllm()
if got is not None:
    rows.append({"backend": f"vLLM CPU build (VLLMSampler; engine start {got['start_seconds']:.0f} s apart)",
                 "tokens": count(got["replies"]), "seconds": round(got["seconds"], 2)})
    print(f"  {rows[-1]['backend']}: {rows[-1]['tokens'] / rows[-1]['seconds']:.0f} tok/s", flush=True)
a32, a16 = peaks()
p32, p16 = max(p32, a32), max(p16, a16)
base = rows[0]["tokens"] / rows[0]["seconds"]
for r in rows:
    rate = r["tokens"] / r["seconds"]
    r |= {"tokens_per_s": round(rate, 1), "vs_float32_generate": round(rate / base, 2),
          "share_fp32_peak": round(2 * params * rate / p32, 3), "share_bf16_peak": round(2 * params * rate / p16, 3)}
best = max((r for r in rows[1:] if "alone" not in r["backend"]), key=lambda r: r["tokens_per_s"])
dest = write("sampling_backends", [
    {"figure": f"sampling: {r['backend']} (generated tokens; prompt passes uncounted)", "value": r["tokens_per_s"],
     "unit": "tokens/s",
     "ratio": r["share_fp32_peak"], "against": "fp32 matmul peak"} for r in rows] + [
    {"figure": f"sampling: fastest ({best['backend']}) vs float32 generate", "value": best["tokens_per_s"],
     "unit": "tokens/s", "ratio": best["vs_float32_generate"], "against": "float32 generate, batch 32"},
    {"figure": "sampling: fp32 matmul peak", "value": p32 / 1e9, "unit": "GFLOP/s", "ratio": "", "against": ""},
    {"figure": "sampling: bf16 matmul peak" + ("" if NATIVE else " (emulated: no bf16 instructions on this CPU)"),
     "value": p16 / 1e9, "unit": "GFLOP/s", "ratio": p16 / p32,
     "against": "fp32 matmul peak"}])
print(f"\n{'backend':72s} {'tok/s':>7s} {'x fp32':>7s} {'%fp32pk':>8s} {'%bf16pk':>8s}")
for r in rows:
    print(f"{r['backend']:72s} {r['tokens_per_s']:7.1f} {r['vs_float32_generate']:7.2f} "
          f"{100 * r['share_fp32_peak']:7.1f}% {100 * r['share_bf16_peak']:7.1f}%")
print(f"fp32 peak {p32 / 1e9:.0f} GFLOP/s, bf16 peak {p16 / 1e9:.0f} GFLOP/s, {threads} threads; wrote {dest}")
