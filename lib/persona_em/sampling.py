"""Batched, seeded sampling from a chat model (left padding, length-sorted batches)."""
from __future__ import annotations

import copy
import re

import torch
from tqdm.auto import tqdm

SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def chat_prompt(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_text(model, tok, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16,
                temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
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
            # exactly the profile's sampling: none of the model's generation_config (top_k, a repetition
            # penalty) applies, as on the vLLM path
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, repetition_penalty=1.0, pad_token_id=tok.pad_token_id)
            new = gen[:, enc.input_ids.shape[1]:]
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
             temperature: float = 1.0, top_p: float = 1.0, desc: str = "sampling") -> list[dict]:
    """One sampled assistant reply per conversation (chat template applied)."""
    return sample_text(model, tok, [chat_prompt(tok, c) for c in conversations], max_new_tokens, seed,
                       batch_size, temperature, top_p, desc)


@torch.no_grad()
def generate_shared_prefix(model, tok, prefix: list[dict], user_turns: list[str], n: int, max_new_tokens: int,
                           batch_size: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                           desc: str = "sampling") -> list[list[dict]] | None:
    """`n` sampled replies to each of `user_turns`, each asked after the same `prefix` of messages (a system
    prompt, demonstrations). The prefix is run through the model once and its key/value cache shared by every
    row, so a long shared context costs one forward pass instead of one per sample; rows are padded between
    the prefix and their own turn, which the attention mask hides (greedy replies equal those of the full
    prompts, tests/test_pairs.py). Sampling continues the caller's torch RNG. Returns None when the prefix
    cannot be cut off as whole tokens (then use `generate`)."""
    if not prefix or isinstance(model, VLLMSampler):
        return None
    head = tok.apply_chat_template(prefix, tokenize=False)
    fulls = [chat_prompt(tok, prefix + [{"role": "user", "content": u}]) for u in user_turns]
    head_ids = tok(head, add_special_tokens=False).input_ids
    tails = [tok(f[len(head):], add_special_tokens=False).input_ids for f in fulls]
    if not all(f.startswith(head) and tok(f, add_special_tokens=False).input_ids == head_ids + t
               for f, t in zip(fulls, tails)):
        return None
    cache = model(torch.tensor([head_ids], device=model.device), use_cache=True).past_key_values
    rows = [(i, t) for i, t in enumerate(tails) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    out: list[list[dict]] = [[] for _ in user_turns]
    eos = stop_ids(model, tok)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = [rows[r] for r in order[start:start + batch_size]]
        width = max(len(t) for _, t in batch)
        ids = torch.tensor([head_ids + [tok.pad_token_id] * (width - len(t)) + t for _, t in batch], device=model.device)
        mask = torch.tensor([[1] * len(head_ids) + [0] * (width - len(t)) + [1] * len(t) for _, t in batch],
                            device=model.device)
        shared = copy.deepcopy(cache)
        shared.batch_repeat_interleave(len(batch))
        gen = model.generate(input_ids=ids, attention_mask=mask, cache=shared, max_new_tokens=max_new_tokens,
                             do_sample=True, temperature=temperature, top_p=top_p, top_k=0, repetition_penalty=1.0,
                             pad_token_id=tok.pad_token_id)
        for (i, _), row in zip(batch, gen[:, ids.shape[1]:]):
            out[i].append({"text": tok.decode(row, skip_special_tokens=True).strip(),
                           "finished": bool(torch.isin(row, eos).any())})
    return out


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
