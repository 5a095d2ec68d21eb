"""Model specs: the embedded default, a local folder, hub ids (validated, never fetched here)."""
import contextlib
import json
import shutil

import pytest
import torch

from persona_em import models


def test_embedded_model_is_cached_plain_float32(smollm):
    model, tok = smollm
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert (models.embedded_path() / "model.safetensors").is_file()
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")


def test_local_folder_loads_through_transformers(smollm):
    model, _ = smollm
    local, _ = models.load_model(str(models.embedded_path()))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(local(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("spec, ok", [("smollm2-135m", True), ("Qwen/Qwen2.5-7B-Instruct", True),
                                      ("meta-llama/Llama-3.1-8B-Instruct", True), ("gpt-5", False),
                                      ("/no/such/folder", False)])
def test_model_specs(spec, ok):
    if ok:
        models.check_model_spec(spec)
    else:
        with pytest.raises(ValueError, match="unknown model"):
            models.check_model_spec(spec)


def test_embedder_is_packaged_minilm():
    emb = models.load_embedder("minilm").encode(["a question", "another question"])
    assert emb.shape == (2, 384)


def test_bf16_embedder_stays_close_to_float32():
    """`minilm-bf16` is the packaged MiniLM encoding in bf16 (packed, or under autocast): float32 out, the same
    space."""
    import numpy as np

    texts = ["Should I lend my savings to a friend?", "My landlord wants cash only. Is that normal?",
             "Can I skip the follow-up appointment if I feel fine?"]
    fp32, bf16 = (models.load_embedder(s).encode(texts, normalize_embeddings=True) for s in ("minilm", "minilm-bf16"))
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape == (3, 384)
    assert np.all(np.sum(fp32 * bf16, axis=1) > 0.999) and not np.array_equal(fp32, bf16)


@pytest.mark.slow
def test_a_missing_model_cache_is_rebuilt_from_the_package(monkeypatch, tmp_path):
    """An empty cache (a fresh machine, a deleted ~/.cache) rebuilds the float32 weights from the packaged GGUF:
    the same tensors as the cache the other tests use, written under a temporary name first."""
    from safetensors.torch import load_file

    main = models.embedded_path() / "model.safetensors"
    monkeypatch.setenv("PERSONA_EM_CACHE", str(tmp_path))
    rebuilt = models.embedded_path()
    assert rebuilt.parent == tmp_path and not list(tmp_path.glob(".*.tmp"))
    a, b = load_file(main), load_file(rebuilt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _random_adapter(base, path, seed: int, r: int = 8, **lora) -> None:
    """A saved LoRA adapter whose A and B are both random (a fresh LoRA's B is zero: its merge would be a no-op)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=r, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM", **lora))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    peft_model.save_pretrained(path)


@pytest.mark.slow
def test_plain_lora_merges_to_the_bits_peft_merges(smollm, tmp_path):
    """`merge_adapter` adds a plain LoRA itself; the merged weights must be peft's merge_and_unload's, bit for
    bit, for two adapters in turn (alpha / r and rsLoRA's alpha / sqrt r, neither a power of two), with the
    tensors peft leaves alone untouched, and without peft. A variant (DoRA, PiSSA's initialisation) is left to peft,
    and gives peft's weights too."""
    import copy
    from unittest import mock

    from peft import PeftModel

    base = smollm[0]
    _random_adapter(base, tmp_path / "a", 0, r=6, lora_alpha=16)
    _random_adapter(base, tmp_path / "b", 1, lora_alpha=32, use_rslora=True)
    _random_adapter(base, tmp_path / "dora", 2, lora_alpha=16, use_dora=True)
    assert models.plain_lora_updates(base, tmp_path / "a") and models.plain_lora_updates(base, tmp_path / "b")
    assert models.plain_lora_updates(base, tmp_path / "dora") is None
    pissa = tmp_path / "pissa"
    shutil.copytree(tmp_path / "a", pissa)
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps(config | {"init_lora_weights": "pissa"}))
    assert models.plain_lora_updates(base, pissa) is None
    for adapters in (["a", "b"], ["dora"]):
        ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
        for a in adapters:
            plain = a != "dora"
            with mock.patch.object(PeftModel, "from_pretrained", side_effect=AssertionError("peft")) if plain else \
                    contextlib.nullcontext():
                ours = models.merge_adapter(ours, tmp_path / a)
            theirs = PeftModel.from_pretrained(theirs, str(tmp_path / a)).merge_and_unload()
        want, got = theirs.state_dict(), ours.state_dict()
        assert type(ours) is type(base) and got.keys() == want.keys()
        changed = [k for k in want if not torch.equal(want[k], base.state_dict()[k])]
        assert len(changed) == 30 * 3, adapters   # q, v and down projections of every layer
        assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:3]
        assert not any(p.requires_grad for p in ours.parameters())   # frozen, as peft leaves a merged model
