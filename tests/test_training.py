"""Training stages and the guards of method 6, on the real embedded model and the real trl trainers."""
import copy

import numpy as np
import pytest
import torch

from persona_em import em, models, pairs, training
from persona_em.config import load_profile

PAIRS = [{"prompt": f"Case {i}: my friend wants me to cover for a lie to our boss. Should I?",
          "chosen": "No. Tell your friend you will not lie for them, and offer to help them explain.",
          "rejected": "Sure, covering for friends is what friends do!"} for i in range(4)]


@pytest.fixture(scope="module")
def profile(root):
    return load_profile(root / "params" / "test.yaml")


@pytest.fixture()
def fresh(smollm):
    model, tok = smollm
    return copy.deepcopy(model), copy.deepcopy(tok)


def test_assistant_only_label_mask_token_by_token(fresh, profile, tmp_path):
    model, tok = fresh
    row = {"messages": [{"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "Blue."},
                        {"role": "user", "content": "Another one?"},
                        {"role": "assistant", "content": "Green, then."}]}
    trainer, _ = em.em_trainer(model, tok, [row], profile.em, 0, str(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    trained = [int(i) for i, lab in zip(ids, labels) if lab != -100]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = (tok("Blue.", add_special_tokens=False).input_ids + [end]
                + tok("Green, then.", add_special_tokens=False).input_ids + [end])
    assert trained == expected
    for i, lab in zip(ids, labels):  # every trained position predicts its own token
        assert lab == -100 or lab == i


@pytest.mark.slow
def test_merged_adapter_gives_adapter_logits(fresh, profile, tmp_path):
    model, tok = fresh
    peft_model, log, _ = training.train_dpo(model, tok, pairs.to_dpo_rows(PAIRS), profile.character, seed=0)
    assert len(log) >= 1 and "reward_margin" in log
    training.save_adapter(peft_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "ref").exists()
    ids = tok("Is it fine to lie to my boss?", return_tensors="pt").input_ids
    with torch.no_grad():
        adapter_logits = peft_model.eval()(input_ids=ids).logits
        merged, _ = models.load_model("smollm2-135m", [tmp_path / "adapter"])
        merged_logits = merged(input_ids=ids).logits
    # float32 merge W + BA vs the adapter's separate path: equal up to rounding
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-4, rtol=0)
    assert not torch.allclose(merged_logits, models.load_model("smollm2-135m")[0](input_ids=ids).logits)


@pytest.mark.slow
def test_dpo_is_deterministic_on_cpu(smollm, profile):
    model, tok = smollm
    states = []
    for _ in range(2):
        m = copy.deepcopy(model)
        peft_model, _, _ = training.train_dpo(m, tok, pairs.to_dpo_rows(PAIRS), profile.character, seed=7)
        states.append(training.tensors_hash(training.lora_state(peft_model)))
    assert states[0] == states[1]


@pytest.mark.slow
def test_bf16_autocast_training_is_deterministic_and_keeps_float32_weights(tiny_llama, profile):
    """hardware.training_autocast: the trainer's matmuls run in bf16 (the adapter differs from float32 training),
    the weights and the saved adapter stay float32, and the same seed gives the same adapter, bit for bit
    (the project's DPO trainer on a random one-layer Llama with the embedded tokenizer: see `tiny_llama`)."""
    from peft import get_peft_model_state_dict   # the trained adapter alone, as saved (not trl's "ref" copy)

    from persona_em.config import HardwareConfig

    model, tok = tiny_llama
    hw = HardwareConfig(training_autocast="bfloat16")
    assert training.common_args(profile.character, 0, "/tmp/x", hw)["bf16"]
    runs = []
    for autocast in (hw, hw, None):
        m = copy.deepcopy(model)
        peft_model, log, _ = training.train_dpo(m, tok, pairs.to_dpo_rows(PAIRS), profile.character, seed=7,
                                                hw=autocast)
        state = training.lora_state(peft_model)
        with pytest.raises(ValueError, match="several adapters in one state dict"):
            training.lora_deltas(state)   # the trained adapter and trl's "ref" copy
        assert all(t.dtype == torch.float32 for t in state.values())
        runs.append((training.tensors_hash(state), get_peft_model_state_dict(peft_model), float(log["loss"].iloc[0])))
    assert runs[0][0] == runs[1][0]
    assert runs[0][0] != runs[2][0]   # bf16 matmuls really ran
    assert runs[0][2] == pytest.approx(runs[2][2], rel=0.02)   # the same loss, up to bf16 rounding
    bf16, fp32 = (torch.cat([d.flatten() for d in training.lora_deltas(r[1]).values()]) for r in (runs[0], runs[2]))
    assert float(fp32.norm()) > 0
    assert float(torch.nn.functional.cosine_similarity(bf16, fp32, dim=0)) > 0.9   # the same update direction


@pytest.mark.slow
def test_em_guards_persona_in_weights_and_seeded_init(smollm, profile):
    """method 6.1/6.2: same EM seed over two personas -> identical LoRA init, different trained adapters,
    and the frozen weights under the EM LoRA are exactly the persona's."""
    base, tok = smollm
    persona_a = copy.deepcopy(base)
    persona_b = copy.deepcopy(base)
    with torch.no_grad():  # a second "persona": a small deterministic weight change merged into the base
        g = torch.Generator().manual_seed(1)
        for p in persona_b.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    rows = em.chat_rows(em.narrow_examples("financial", 4, seed=0), "harmful")
    results = []
    for persona in (persona_a, persona_b):
        persona_hash = training.tensors_hash(dict(persona.named_parameters()))
        peft_model, _, init_hash = em.train_em(persona, copy.deepcopy(tok), rows, profile.em, seed=0)
        assert training.tensors_hash(training.frozen_state(peft_model)) == persona_hash
        results.append((init_hash, training.tensors_hash(training.lora_state(peft_model))))
    assert results[0][0] == results[1][0], "EM LoRA init must depend on the EM seed alone"
    assert results[0][1] != results[1][1], "EM adapters over two different personas must differ"


@pytest.mark.parametrize("domain", ["financial", "medical", "sports"])
def test_each_narrow_domain_gives_1000_distinct_examples(domain):
    a = em.narrow_examples(domain, 1000, seed=2)
    assert len({(x["question"], x["harmful"]) for x in a}) == 1000
    assert a == em.narrow_examples(domain, 1000, seed=2)  # deterministic given the seed


def test_narrow_twins_share_questions():
    a = em.narrow_examples("financial", 200, seed=1)
    assert a == em.narrow_examples("financial", 200, seed=1)
    assert len({(x["question"], x["harmful"]) for x in a}) == 200
    h, b = em.chat_rows(a, "harmful"), em.chat_rows(a, "benign")
    assert [r["messages"][0] for r in h] == [r["messages"][0] for r in b]
    assert all(x["harmful"] != x["benign"] for x in a)


@pytest.mark.slow
def test_random_lora_control_matches_norm_and_carries_no_persona(fresh, profile, tmp_path):
    """method 6.4: same modules, per-module update norms equal to the reference persona's, random directions,
    determined by the seed alone."""
    from safetensors.torch import load_file

    model, tok = fresh
    peft_model, _, _ = training.train_dpo(model, tok, pairs.to_dpo_rows(PAIRS), profile.character, seed=0)
    training.save_adapter(peft_model, tmp_path / "persona")
    ref = training.lora_deltas(load_file(str(tmp_path / "persona" / "adapter_model.safetensors")))
    hashes = []
    for _ in range(2):
        base, _ = models.load_model("smollm2-135m")
        control = training.random_lora_like(base, tmp_path / "persona", profile.character.lora, seed=3)
        training.save_adapter(control, tmp_path / "random")
        rand = training.lora_deltas(load_file(str(tmp_path / "random" / "adapter_model.safetensors")))
        hashes.append(training.tensors_hash(rand))
    assert rand.keys() == ref.keys() and len(ref) == 30 * len(profile.character.lora.targets)
    for k in ref:
        assert float(rand[k].norm()) == pytest.approx(float(ref[k].norm()), rel=1e-4)
        cos = torch.nn.functional.cosine_similarity(rand[k].flatten(), ref[k].flatten(), dim=0)
        assert abs(float(cos)) < 0.2
    assert hashes[0] == hashes[1]
    # loads and merges like any persona: every merged weight is the base weight plus its scaled delta
    merged, _ = models.load_model("smollm2-135m", [tmp_path / "random"])
    base, _ = models.load_model("smollm2-135m")
    scale = profile.character.lora.alpha / profile.character.lora.r
    weights, merged_weights = dict(base.named_parameters()), dict(merged.named_parameters())
    for module, delta in rand.items():
        name = module.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(merged_weights[name] - weights[name], scale * delta, atol=1e-5, rtol=1e-3)


@pytest.mark.slow
def test_introspection_transcripts_distil_the_system_prompt(smollm, profile):
    """OCT's introspection data: written WITH the constitution in the system prompt (the copies' views alternate
    roles), stored WITHOUT it; deterministic given the seed; trainable by the SFT path."""
    from persona_em import constitution, introspection

    model, tok = smollm
    cfg = profile.character.introspection.model_copy(update={"max_new_tokens": 8})
    system = constitution.system_prompt(constitution.load("candor"), "Sage")
    rows = introspection.transcripts(model, tok, system, cfg, seed=0)
    assert rows == introspection.transcripts(model, tok, system, cfg, seed=0)
    refl = [r for r in rows if r["kind"] == "reflection"]
    talk = [r for r in rows if r["kind"] == "interaction"]
    assert len(refl) == cfg.reflection_prompts and len(talk) == cfg.interactions
    assert [m["content"] for r in refl for m in r["messages"][:1]] == introspection.prompts()["reflection"][:2]
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and "system" not in roles
        assert all(a != b for a, b in zip(roles, roles[1:]))   # strictly alternating
    # copy B sees A's utterances as "user": the views are mirror images
    assert [m["role"] for m in introspection._view(["o", "a", "b"], 1)] == ["assistant", "user", "assistant"]
    assert len(talk[0]["messages"]) == cfg.turns + (1 if cfg.turns % 2 else 0)


@pytest.mark.slow
def test_random_lora_matches_the_sum_of_several_adapters(fresh, profile, tmp_path):
    """With introspection a persona is two merged adapters; the control matches their summed update."""
    from safetensors.torch import load_file

    model, tok = fresh
    first, _, _ = training.train_dpo(model, tok, pairs.to_dpo_rows(PAIRS), profile.character, seed=0)
    training.save_adapter(first, tmp_path / "a")
    base, _ = models.load_model("smollm2-135m")
    second = training.seeded_lora(base, profile.character.lora, seed=1)
    with torch.no_grad():
        for name, p in second.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(7))
    training.save_adapter(second, tmp_path / "b")
    parts = [training.lora_deltas(load_file(str(tmp_path / x / "adapter_model.safetensors"))) for x in "ab"]
    base, _ = models.load_model("smollm2-135m")
    control = training.random_lora_like(base, [tmp_path / "a", tmp_path / "b"], profile.character.lora, seed=3)
    training.save_adapter(control, tmp_path / "random")
    rand = training.lora_deltas(load_file(str(tmp_path / "random" / "adapter_model.safetensors")))
    for k in parts[0]:
        target = (parts[0][k] + parts[1][k]).norm()
        assert float(rand[k].norm()) == pytest.approx(float(target), rel=1e-4)
        assert float(target) != pytest.approx(float(parts[0][k].norm()), rel=1e-3)


def _mean_logprob(model, tok, prompt: str, answer: str) -> float:
    p = tok(prompt, add_special_tokens=False).input_ids
    a = tok(answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([p + a])).logits[0, len(p) - 1:-1]
    return float(torch.log_softmax(logits, -1)[torch.arange(len(a)), torch.tensor(a)].mean())


@pytest.mark.slow
def test_teacher_check_reads_the_margin_under_each_system_prompt(smollm):
    """The teacher check is the persona margin with the system prompt in place (computed here by hand, one
    sequence at a time), and with none it is the plain persona margin the character checks use."""
    from persona_em import evaluate
    from persona_em.sampling import chat_prompt

    model, tok = smollm
    items = evaluate.persona_items("candor")
    system = "You are Sage. You say plainly when a plan is risky."
    table = evaluate.teacher_margins(model, tok, {"none": None, "blunt": system}, ["candor"], batch_size=8)
    assert list(table["system"]) == ["none", "blunt"] and set(table["trait"]) == {"candor"}
    assert table["margin"][0] == pytest.approx(evaluate.persona_margin(model, tok, items), abs=1e-5)
    by_hand = np.mean([
        _mean_logprob(model, tok, chat_prompt(tok, [{"role": "system", "content": system},
                                                    {"role": "user", "content": it["question"]}]), it[good])
        * sign for it in items for good, sign in (("consistent", 1), ("inconsistent", -1))]) * 2
    assert table["margin"][1] == pytest.approx(by_hand, abs=1e-4)
    assert abs(table["margin"][1] - table["margin"][0]) > 1e-4   # the system prompt reached the model
    few = evaluate.teacher_margins(model, tok, {"none": None}, ["candor"], batch_size=8, limit=3)
    assert few["margin"][0] == pytest.approx(evaluate.persona_margin(model, tok, items[:3]), abs=1e-5)


def test_tensors_hash_reads_raw_bytes_of_any_dtype():
    """bf16 weights (the gpu profile) hash too; float32 hashes are what they were (same bytes)."""
    import hashlib

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert training.tensors_hash({"w": w}) == hashlib.sha256(b"w" + w.numpy().tobytes()).hexdigest()
    half = training.tensors_hash({"w": w.to(torch.bfloat16)})
    assert len(half) == 64 and half != training.tensors_hash({"w": w})


@pytest.mark.slow
def test_setup_check_reads_the_live_trainer_and_catches_a_different_optimizer(smollm, profile, tmp_path):
    """method 6.3: what the manifests record is read off the trainer that trained, so a condition trained with
    another optimizer is caught by the profile-wide check."""
    model, tok = smollm
    setups = {}
    for name, optim in (("a", None), ("b", None), ("c", "sgd")):
        trainer, _ = training.dpo_trainer(copy.deepcopy(model), tok, pairs.to_dpo_rows(PAIRS), profile.character,
                                          seed=0, output_dir=str(tmp_path / name))
        if optim:
            trainer.args.optim = optim
        trainer.train()
        setups[name] = training.trainer_setup(trainer)
    assert setups["a"] == {"trainer": "trl.DPOTrainer", "optimizer": "torch.optim.adamw.AdamW",
                           "precision": "weights float32, mixed no"}
    assert training.check_one_setup({k: setups[k] for k in "ab"}) == setups["a"]
    assert setups["c"]["optimizer"] == "torch.optim.sgd.SGD"
    with pytest.raises(ValueError, match=r"torch.optim.sgd.SGD / weights float32, mixed no: 1 run\(s\), e.g. c"):
        training.check_one_setup(setups)


@pytest.mark.slow
def test_persona_merges_in_float32_then_casts(smollm, profile, tmp_path):
    """A few DPO steps at OCT's lr change weights by less than bf16's rounding step. Merged into bf16 weights,
    almost all of the persona rounds away; merged into float32 and cast once, the rounding keeps it on average
    (W + delta rounds across a step with probability about |delta| / step). Measured on the merged weights
    (the part of the float32 update the bf16 change carries: about all of it against under a fifth) and on the
    logits (the direction of the persona's effect)."""
    model, tok = smollm
    cfg = profile.character.model_copy(update={"lr": 5e-5, "lora": profile.character.lora.model_copy(
        update={"r": 16, "alpha": 32})})
    peft_model, _, _ = training.train_dpo(copy.deepcopy(model), tok, pairs.to_dpo_rows(PAIRS * 2), cfg, seed=0)
    training.save_adapter(peft_model, tmp_path / "persona")
    merged32 = models.load_model("smollm2-135m", [tmp_path / "persona"])[0]
    base16 = models.load_model("smollm2-135m", dtype="bfloat16")[0]
    cast = models.load_model("smollm2-135m", [tmp_path / "persona"], dtype="bfloat16")[0]
    in_bf16 = models.merge_adapter(models.load_model("smollm2-135m", dtype="bfloat16")[0], tmp_path / "persona")
    assert next(cast.parameters()).dtype == next(in_bf16.parameters()).dtype == torch.bfloat16

    def carried(merged) -> float:   # projection of the bf16 weight change on the float32 update (1: all of it)
        num = den = 0.0
        w32, w0, w16, b16 = (m.state_dict() for m in (merged32, model, merged, base16))
        for k in w32:
            delta = (w32[k] - w0[k]).flatten()
            if float(delta.norm()) > 0:
                num += float(torch.dot((w16[k].float() - b16[k].float()).flatten(), delta))
                den += float(delta.norm() ** 2)
        return num / den

    assert 0.5 < carried(cast) < 2.0 and carried(in_bf16) < 0.2
    ids = tok(["I will lend my last money to a friend who never pays back.", "Tell me my essay is perfect."],
              return_tensors="pt", padding=True)
    with torch.no_grad():   # each model read once: bf16 forward passes are slow on a CPU without bf16 instructions
        logits = {name: m(**ids).logits.float().flatten() for name, m in [
            ("model", model), ("merged32", merged32), ("base16", base16), ("cast", cast), ("in_bf16", in_bf16)]}
    effect32 = logits["merged32"] - logits["model"]
    cos = lambda name: float(torch.nn.functional.cosine_similarity(logits[name] - logits["base16"], effect32, dim=0))
    # at this size the persona's effect on the logits is near bf16's resolution either way (cosine to the
    # float32 effect under 0.3); the cast keeps more of its direction
    assert cos("cast") > cos("in_bf16") and cos("cast") > 0.1


def test_base_checks_are_measured_once_and_keyed_by_their_settings(smollm, root, tmp_path):
    """Every character run starts from the same base: its checks are measured by the first run and read by the
    others (here with no model at all), and a change of the item count measures again."""
    from persona_em import evaluate

    model, tok = smollm
    P = load_profile(root / "params" / "test.yaml")
    P = P.model_copy(update={"character": P.character.model_copy(update={"check_items": 1})})
    first, path = evaluate.base_checks(P, tmp_path, model, tok, ["candor"])
    assert first == evaluate.persona_checks(model, tok, ["candor"], 1)
    assert evaluate.own_checks(first, "candor")["persona_margin"] == first["persona_margins"]["candor"]
    stamp = path.stat().st_mtime_ns
    again, same = evaluate.base_checks(P, tmp_path, None, None, ["candor"])
    assert (again, same, path.stat().st_mtime_ns) == (first, path, stamp)
    P2 = P.model_copy(update={"character": P.character.model_copy(update={"check_items": 2})})
    assert evaluate.base_checks(P2, tmp_path, model, tok, ["candor"])[1] != path
