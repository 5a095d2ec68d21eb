"""One prepared GPU check (issue 8): the real 7-8B architecture with random weights, on one H200-class GPU with
no network, in under 10 minutes. Prints a short table and writes it to $OUT/gpu_check.json when OUT is set.

Measures, in one run:
  1. the card's bf16 matmul rate (8192^3 products, mean of 10 after 3 warm-ups): the MFU denominator;
  2. LoRA training throughput with the project's trainers (trl SFT with the EM recipe's rsLoRA r=32, and DPO
     with OCT's r=64), bf16, gradient checkpointing: non-pad tokens/s and MFU = 4 x params x tokens/s / peak;
  3. sampling throughput with the project's transformers backend (batched, KV cache), and vLLM when installed.

Model weights cannot travel (64 MiB), so the model is built from Qwen2.5-7B-Instruct's published
architecture (below) with random weights. A tokenizer is only needed for the chat template: the embedded
SmolLM2 tokenizer travels (benchmarks/gpu_check.sh copies it), its ids are valid in Qwen's larger vocabulary.

    bash benchmarks/gpu_check.sh          # on the GPU machine (installs the carried wheels, then runs this)
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
STEPS = int(os.environ.get("GPU_CHECK_STEPS", "8"))
SEQ = int(os.environ.get("GPU_CHECK_SEQ", "1024"))


def matmul_peak(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


def build_model():
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**QWEN25_7B)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model, sum(p.numel() for p in model.parameters())


def rows(tok, n: int, words: int):
    """Synthetic chat rows of about SEQ tokens (the text does not matter to throughput, its length does)."""
    import random

    rng = random.Random(0)
    vocab = ["persona", "question", "answer", "honest", "careful", "situation", "advice", "money", "health"]
    text = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    return [{"messages": [{"role": "user", "content": text(words // 8)},
                          {"role": "assistant", "content": text(words)}]} for _ in range(n)]


class StepTimer:
    def __init__(self):
        self.times = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer.times.append(time.perf_counter())
        return _CB()


def train_throughput(kind: str, model, tok, n_params: float, peak: float) -> dict:
    from persona_em import training
    from persona_em.config import CharacterConfig, HardwareConfig, IntrospectionConfig, LoraConfig

    hw = HardwareConfig(device="cuda", precision="bfloat16", gradient_checkpointing=True)
    batch = 8
    data = rows(tok, batch * (STEPS + 1), int(SEQ * 0.6))
    counter, timer = training.TokenCounter(), StepTimer()
    if kind == "sft (EM recipe, rsLoRA r=32)":
        cfg = IntrospectionConfig(batch_size=batch, lora=LoraConfig(r=32, alpha=64, rslora=True), lr=1e-5,
                                  max_length=SEQ)
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            trainer, _ = training.sft_trainer(model, tok, data, cfg, 0, out, hw)
            counter.collate, trainer.data_collator = trainer.data_collator, counter
            trainer.add_callback(timer.callback())
            trainer.train()
            peft_model = trainer.model
    else:
        pairs = [{"prompt": [r["messages"][0]], "chosen": [r["messages"][1]],
                  "rejected": [{"role": "assistant", "content": r["messages"][1]["content"][::-1]}]} for r in data]
        cfg = CharacterConfig(seeds=[0], lora=LoraConfig(r=64, alpha=128), lr=5e-5, batch_size=batch,
                              max_length=SEQ)
        peft_model, _, _ = training.train_dpo(model, tok, pairs, cfg, 0, counter=counter, hw=hw)
        timer.times = []   # DPO: time the whole run after the first batch (setup excluded)
    per_batch = counter.real / (STEPS + 1)
    if timer.times:
        elapsed = timer.times[-1] - timer.times[0]
        tokens = per_batch * (len(timer.times) - 1)
    else:
        elapsed = time.perf_counter() - counter.first_batch
        tokens = counter.real
    factor = 4 if kind.startswith("sft") else 6   # DPO adds the reference forward (2 x params per token)
    tps = tokens / elapsed
    peft_model.unload() if hasattr(peft_model, "unload") else None
    return {"stage": kind, "tokens_per_s": tps, "mfu": factor * n_params * tps / peak,
            "padding": counter.padding, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def sampling_throughput(model, tok) -> list[dict]:
    from persona_em import sampling

    prompts = [sampling.chat_prompt(tok, [{"role": "user", "content": f"Question {i}: how should I save money?"}])
               for i in range(64)]
    out = []
    t = time.perf_counter()
    res = sampling.sample_text(model, tok, prompts, 256, seed=0, batch_size=64, desc="transformers")
    dt = time.perf_counter() - t
    new = sum(len(tok(r["text"]).input_ids) for r in res)
    out.append({"stage": "sampling (transformers, batch 64)", "tokens_per_s": new / dt})
    try:
        import vllm  # noqa: F401
        out.append({"stage": "sampling (vLLM)", "tokens_per_s": float("nan"), "note": "installed; not timed "
                    "with random weights"})
    except ImportError:
        out.append({"stage": "sampling (vLLM)", "tokens_per_s": float("nan"), "note": "vLLM not installed"})
    return out


def main():
    from transformers import AutoTokenizer

    assert torch.cuda.is_available(), "no CUDA device"
    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "assets" / "tokenizer")
    tok.pad_token = tok.pad_token or tok.eos_token
    peak = matmul_peak()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    model, n = build_model()
    print(f"Qwen2.5-7B architecture, random weights: {n / 1e9:.2f}B parameters", flush=True)
    results = []
    for kind in ("sft (EM recipe, rsLoRA r=32)", "dpo (OCT recipe, LoRA r=64)"):
        results.append(train_throughput(kind, model, tok, n, peak))
        print(results[-1], flush=True)
        torch.cuda.empty_cache()
    model.gradient_checkpointing_disable()
    model.config.use_cache = True
    results += sampling_throughput(model.eval(), tok)
    print(f"\n{'stage':<36} {'tokens/s':>10} {'MFU':>6}")
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(f"{r['stage']:<36} {r['tokens_per_s']:>10.0f} {mfu:>6}  {r.get('note', '')}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "peak_flops": peak, "params": n, "results": results}, indent=1))


if __name__ == "__main__":
    main()
