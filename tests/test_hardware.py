"""The hardware section reaches the trainers and the samplers; the cost estimate follows the profile."""
import json
import warnings

import pandas as pd
import pytest
import torch

from persona_em import cost, grid, sampling, training
from persona_em.config import HardwareConfig, load_profile


def test_common_args_follow_the_hardware_section(root):
    P = load_profile(root / "params" / "gpu.yaml")
    args = training.common_args(P.em, 0, "/tmp/x", P.hardware)
    assert args["bf16"] and not args["use_cpu"] and args["activation_checkpointing"]
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 16   # EM recipe
    cpu = training.common_args(P.em, 0, "/tmp/x")
    assert cpu["use_cpu"] and not cpu["bf16"] and not cpu["activation_checkpointing"]
    fsdp = training.common_args(P.character, 0, "/tmp/x", P.hardware.model_copy(update={"num_processes": 4,
                                                                                       "distributed": "fsdp"}))
    assert fsdp["per_device_train_batch_size"] == P.character.batch_size // 4 and fsdp["fsdp"] is True
    # FSDP2 shards fully and checkpoints activations itself; the trainer's own checkpointing is off
    assert fsdp["fsdp_config"] == {"reshard_after_forward": True, "activation_checkpointing": True}
    assert not fsdp["activation_checkpointing"]
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        training.common_args(P.character, 0, "/tmp/x", HardwareConfig(num_processes=3))


def test_vllm_sampler_falls_back_with_a_message(smollm):
    model, tok = smollm
    assert sampling.sampler_for(model, tok, HardwareConfig()) is model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = sampling.sampler_for(model, tok, HardwareConfig(sampler="vllm"))
    assert got is model   # vLLM is not installed here (the `gpu` extra)
    assert any("vLLM is not installed" in str(w.message) for w in caught)


def test_stop_ids_take_every_eos_of_the_generation_config(smollm):
    """'finished' means any EOS the model stops at (Qwen2.5 has two), as vLLM's finish_reason 'stop' does."""
    from types import SimpleNamespace

    model, tok = smollm
    assert tok.eos_token_id in sampling.stop_ids(model, tok).tolist()
    two = SimpleNamespace(device="cpu", generation_config=SimpleNamespace(eos_token_id=[7, 9]))
    assert sampling.stop_ids(two, tok).tolist() == sorted({tok.eos_token_id, 7, 9})
    before = {k: v.clone() for k, v in list(model.state_dict().items())[:3]}
    sampling.close(model, None)   # closing is for vLLM engines; anything else is left alone
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_fit_refuses_an_unknown_job():
    with pytest.raises(ValueError, match="unknown training job 'ppo'"):
        training.fit("ppo", None, None, [], None, 0, HardwareConfig(), "/tmp/x", "smollm2-135m")


def test_cost_estimate_scales_with_the_profile(root, tmp_path):
    gpu = cost.estimate(load_profile(root / "params" / "gpu.yaml"))
    tiny = cost.estimate(load_profile(root / "params" / "tiny.yaml"))
    assert set(gpu["stage"]) >= {"generate: pairs", "character: DPO", "EM: SFT", "evaluate: judge"}
    assert gpu["flops"].sum() > 1e5 * tiny["flops"].sum()
    em = tiny.set_index("stage").loc["EM: SFT"]
    P = load_profile(root / "params" / "tiny.yaml")
    assert em["runs"] == len(grid.em_runs(P)) + len(grid.direction_runs(P)) and em["flops"] == pytest.approx(em["tokens"] * 4 * cost.n_params(P.model))
    gpu["gpu_hours"] = cost.gpu_hours(gpu, 7.9e14)
    assert gpu["gpu_hours"].sum() > 10
    assert "\\toprule" in cost.latex_table(gpu, "c", "t:c")
    nb = tmp_path / "02_train_character" / "x" / "02_train_character.ipynb"
    nb.parent.mkdir(parents=True)
    nb.write_text(json.dumps({"metadata": {"papermill": {"duration": 120.0}}}))
    assert cost.measured_minutes(tmp_path).to_dict() == {"02_train_character": 2.0}


DDP_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from persona_em import models, pairs, training
from persona_em.config import HardwareConfig, load_profile
profile = load_profile(sys.argv[1])
rows = pairs.to_dpo_rows([{"prompt": f"Case {i}: my friend wants me to cover for a lie to our boss. Should I?",
                           "chosen": "No. Tell your friend you will not lie for them, and offer to help.",
                           "rejected": "Sure, covering for friends is what friends do!"} for i in range(4)])
hw = HardwareConfig(num_processes=int(sys.argv[3]))
torch.set_num_threads(1)
model, tok = models.load_model("smollm2-135m")   # the notebook holds the model already, as chapter 2 does
out = Path(sys.argv[2])
log, init_hash, frozen_hash, setup = training.fit("dpo", model, tok, rows, profile.character, 0, hw, out / "adapter",
                                                  spec="smollm2-135m")
log.to_csv(out / "train_log.csv", index=False)
(out / "hashes.json").write_text(json.dumps([init_hash, frozen_hash, setup]))
'''


@pytest.mark.slow
def test_two_processes_through_accelerate_train_what_one_does(root, tmp_path):
    """The multi-process path (`accelerate launch` in a subprocess, DDP over gloo on a CPU), started from a
    process that already holds the model as a notebook does: 2 processes x half the batch make the same update
    as 1 process x the whole batch from the same seeded start, and only the adapter comes back (the job's
    temporary files are gone)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    for n in (1, 2):
        r = subprocess.run([sys.executable, str(script), str(root / "params" / "test.yaml"), str(tmp_path / f"p{n}"),
                            str(n)], capture_output=True, text=True, timeout=900, cwd=root)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one = load_file(str(tmp_path / "p1" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "p2" / "adapter" / "adapter_model.safetensors"))
    deltas = [training.lora_deltas(x) for x in (one, two)]
    for k in deltas[0]:
        a, b = deltas[0][k].flatten(), deltas[1][k].flatten()
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
    h1, h2 = (json.loads((tmp_path / f"p{n}" / "hashes.json").read_text()) for n in (1, 2))
    assert h1 == h2   # same seeded LoRA start, same frozen weights under it, in the launched processes too
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["adapter", "hashes.json", "train_log.csv"]
    l1, l2 = (pd.read_csv(tmp_path / f"p{n}" / "train_log.csv") for n in (1, 2))
    assert l1["loss"].iloc[0] == pytest.approx(l2["loss"].iloc[0], rel=0.02)


def test_autocast_auto_resolves_to_what_the_cpu_multiplies_in_hardware(root, tmp_path, monkeypatch):
    """`auto` is bfloat16 only where the CPU has bf16 instructions (elsewhere PyTorch emulates bf16 matmuls, about
    100x slower than float32), resolved when the profile loads so hashes and manifests record what ran; an explicit
    bfloat16 on such a CPU runs as asked, with a warning."""
    from persona_em import models

    em = load_profile(root / "params" / "smoke.yaml").em
    cpuinfo = tmp_path / "cpuinfo"
    for flags, native in [("fpu sse avx avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16", True)]:
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16\n")   # only `flags` counts
        assert models.native_bf16(cpuinfo) is native
    assert models.native_bf16(tmp_path / "missing") is False
    for native in (False, True):
        monkeypatch.setattr(models, "native_bf16", lambda native=native: native)
        hw = HardwareConfig(training_autocast="auto", sampling_autocast="auto")
        want = "bfloat16" if native else "none"
        assert hw.training_autocast == hw.sampling_autocast == want
        assert HardwareConfig.model_validate(hw.model_dump()).model_dump() == hw.model_dump()   # stable
        assert training.common_args(em, 0, "/tmp/x", hw)["bf16"] is native
        assert HardwareConfig(device="cuda", precision="bfloat16", training_autocast="auto").training_autocast == "none"
    monkeypatch.setattr(models, "native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="training_autocast: bfloat16 on a CPU without bf16 instructions"):
        assert HardwareConfig(training_autocast="bfloat16").training_autocast == "bfloat16"
    monkeypatch.setattr(models, "native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HardwareConfig(training_autocast="bfloat16")
