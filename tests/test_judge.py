"""The judge path (method 2, 6.5): question files, scoring from number probabilities, the local judge's exact
candidate probabilities, the endpoint judge against vLLM's real OpenAI-compatible server on 127.0.0.1,
retries, the cache (a warm re-run makes no judge calls), calibration, and both misalignment denominators."""
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_em import evaluate, grid, judge, models, paths
from persona_em.endpoint import EndpointClient, EndpointError
from persona_em.sampling import chat_prompt

SENTINEL = "sk-persona-em-sentinel-7f3a9c"
VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


# -- question files ------------------------------------------------------------------------------------
def test_em_question_format_loads_with_anchors(question_file):
    path, expected = question_file
    qs = evaluate.load_questions(path)
    assert len(qs) == expected["questions"]
    assert sum(len(q["paraphrases"]) for q in qs) == expected["paraphrases"]
    assert all({"aligned", "coherent"} <= set(q["judge_prompts"]) for q in qs)
    assert sum(1 for q in qs if q.get("system")) == expected["with_system"]
    assert all(q["samples_per_paraphrase"] == expected["samples"] for q in qs)   # an alias of the first entry's


def test_project_question_set_is_the_default_and_large_enough():
    qs = evaluate.load_questions()
    assert len(qs) >= 16 and len({q["id"] for q in qs}) == len(qs)


@pytest.mark.parametrize("entry, message", [
    ({"id": "a", "judge_prompts": {"aligned": "{answer}"}}, "paraphrases"),
    ({"id": "a", "paraphrases": ["q?"], "samples_per_paraphrase": 0, "judge_prompts": {"aligned": "{answer}"}},
     "samples_per_paraphrase"),
    ({"id": "a", "paraphrases": ["q?"], "judge_prompts": {"aligned": "no placeholder"}}, "judge_prompts.aligned"),
    ({"id": "a", "type": "multiple_choice", "paraphrases": ["q?"], "judge_prompts": {"aligned": "{answer}"}},
     "type"),
])
def test_bad_question_file_names_file_entry_and_field(tmp_path, entry, message):
    path = tmp_path / "q.yaml"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError) as e:
        evaluate.load_questions(path)
    assert str(path) in str(e.value) and "entry 0 (a)" in str(e.value) and message in str(e.value)


def test_sampling_honours_paraphrases_samples_and_system(smollm):
    model, tok = smollm
    qs = [{"id": "one", "paraphrases": ["Hi?", "Hello?"], "samples_per_paraphrase": 2, "system": "Be brief.",
           "judge_prompts": {"aligned": "{answer}"}},
          {"id": "two", "paraphrases": ["Why?"], "samples_per_paraphrase": 3, "judge_prompts": {"aligned": "{answer}"}}]
    rows = evaluate.sample_answers(model, tok, qs, max_new_tokens=4, seed=0, batch_size=8)
    assert [(r["question_id"], r["paraphrase"], r["sample"]) for r in rows] == [
        ("one", 0, 0), ("one", 0, 1), ("one", 1, 0), ("one", 1, 1), ("two", 0, 0), ("two", 0, 1), ("two", 0, 2)]
    assert rows[0]["system"] == "Be brief." and rows[4]["system"] is None
    override = evaluate.sample_answers(model, tok, qs, max_new_tokens=4, seed=0, batch_size=8,
                                       n_questions=1, samples_per_paraphrase=1)
    assert [(r["paraphrase"], r["sample"]) for r in override] == [(0, 0), (1, 0)]


# -- scores and classification -------------------------------------------------------------------------
def test_answer_logprobs_are_those_of_a_full_forward_pass(smollm):
    """Batched answer log-probs read the vocabulary only from the earliest answer on; each pair's sum and count
    equal those of its own full forward pass over every position (prompts of different lengths in one batch)."""
    import torch

    model, tok = smollm
    prompts = [chat_prompt(tok, [{"role": "user", "content": q}]) for q in
               ("Hi?", "What should I do with a free afternoon in a city I do not know at all?", "Is tea good?")]
    answers = ["Walk around.", "Sleep.", "Yes, in moderation, and it depends on the tea you pick."]
    total, count = evaluate.answer_logprobs(model, tok, prompts, answers, batch_size=3)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids, a_ids = tok(p, add_special_tokens=False).input_ids, tok(a, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + a_ids])).logits[0].float(), -1)
        want = sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(a_ids))
        assert count[i] == len(a_ids)
        assert total[i] == pytest.approx(want, rel=1e-4)


def test_score_is_the_expectation_over_numbers_and_none_below_the_mass():
    p = np.zeros(101)
    p[[20, 80]] = 0.3
    assert judge.score(p) == (50.0, pytest.approx(0.6))
    p = np.zeros(101)
    p[90] = 0.2
    assert judge.score(p)[0] is None and judge.score(p, min_mass=0.1)[0] == pytest.approx(90)


def test_render_leaves_other_braces_alone():
    assert judge.render("Q: {question} {json: 1} A: {answer}", "why", "because") == "Q: why {json: 1} A: because"


def test_classification_reports_both_denominators():
    scores = pd.DataFrame({"question_id": ["a", "a", "a", "b", "b"],
                           "aligned": [10, 10, 90, 20, None], "coherent": [80, 30, 90, 60, 70]})
    rates = judge.misaligned_rates(judge.classify(scores)).set_index("question_id")
    # a: misaligned only the first (the second is incoherent); 3 scored, 2 coherent
    assert rates.loc["a", ["scored", "coherent", "misaligned"]].tolist() == [3, 2, 1]
    assert rates.loc["a", "rate_all_scored"] == pytest.approx(1 / 3)
    assert rates.loc["a", "rate_coherent"] == pytest.approx(1 / 2)
    assert rates.loc["ALL", ["answers", "scored", "coherent", "misaligned"]].tolist() == [5, 4, 3, 2]
    stricter = judge.misaligned_rates(judge.classify(scores, aligned_below=15)).set_index("question_id")
    assert stricter.loc["ALL", "misaligned"] == 1


# -- the local judge -----------------------------------------------------------------------------------
def test_local_judge_candidate_probabilities_are_exact(smollm):
    """The trie pass equals scoring each reply "k<end of turn>" on its own after the chat prompt."""
    model, tok = smollm
    j = judge.LocalJudge(model, tok, "smollm2-135m")
    prompts = ["Rate this answer from 0 to 100: 'Be kind to others.' Reply with a number.",
               "How coherent is this, 0 to 100? 'Blue the of seven.'"]
    probs = j.number_probs(prompts)
    assert probs.shape == (2, 101) and j.calls == 2
    for i, p in enumerate(prompts):
        text = chat_prompt(tok, [{"role": "user", "content": p}])
        for k in (0, 7, 42, 100):
            total, _ = evaluate.answer_logprobs(model, tok, [text], [f"{k}{tok.eos_token}"])
            assert probs[i, k] == pytest.approx(np.exp(total[0]), rel=1e-3)
    alone = j.number_probs(prompts[1:])  # what else is judged does not change the result, to the bit
    assert np.array_equal(alone[0], probs[1])


def test_local_judge_scores_do_not_depend_on_what_else_is_judged(smollm):
    """Each prompt's probabilities are the same bits alone, among prompts of its own token length, or beside
    prompts another job happened to judge first (a batched pass would change float sums with the batch's shape)."""
    model, tok = smollm
    j = judge.LocalJudge(model, tok, "smollm2-135m")
    prompts = [f"Rate answer number {w}: " + "word " * 30 for w in ("one", "two", "six")]   # one length
    prompts += ["Rate: short.", "Rate this somewhat longer answer, please, from 0 to 100."]
    together = j.number_probs(prompts)
    assert j.calls == 5
    for i, p in enumerate(prompts):
        assert np.array_equal(j.number_probs([p])[0], together[i])
    assert np.array_equal(j.number_probs(prompts[::-1]), together[::-1])


@pytest.mark.slow
def test_warm_cache_makes_no_judge_calls_and_calibration_is_reported(smollm, tmp_path):
    model, tok = smollm
    templates = evaluate.load_questions()[0]["judge_prompts"]
    cache = judge.JudgeCache(tmp_path / "cache.sqlite")
    first = judge.LocalJudge(model, tok, "smollm2-135m")
    cal = judge.calibrate(first, cache, templates, min_mass=0.0)
    assert first.calls == len(judge.calibration_items()) == len(cal)
    assert set(cal.columns) >= {"id", "metric", "low", "high", "score", "mass", "in_range"}
    again = judge.LocalJudge(model, tok, "smollm2-135m")
    cal2 = judge.calibrate(again, cache, templates, min_mass=0.0)
    assert again.calls == 0
    pd.testing.assert_frame_equal(cal, cal2)
    other = judge.LocalJudge(model, tok, "another-judge")  # the judge's name is part of the key
    judge.calibrate(other, cache, {"aligned": templates["aligned"]})
    assert other.calls == sum(it["metric"] == "aligned" for it in judge.calibration_items())


# -- the endpoint judge against a real server ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_server(smollm, tmp_path_factory):
    """vLLM's OpenAI-compatible server (its CPU build, from the wheel in .venv-vllm) on the embedded model's
    float32 files, with an API key, on 127.0.0.1. About 90 s to become healthy on 2 cores."""
    if not VLLM_PYTHON.exists():
        pytest.skip("no .venv-vllm: run `make setup-vllm` (`make test` does)")
    port, log = _free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}   # 1 GiB of KV cache, not 90% of RAM
    with open(log, "w") as sink:
        proc = subprocess.Popen([str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                                 "--model", str(models.model_path(models.EMBEDDED)), "--served-model-name", "smollm2",
                                 "--api-key", SENTINEL, "--host", "127.0.0.1", "--port", str(port),
                                 "--dtype", "float32", "--max-model-len", "2048", "--seed", "0"],
                                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the vLLM server did not become healthy:\n{log.read_text()[-3000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_endpoint_judge_scores_from_real_top_logprobs(model_server, monkeypatch, smollm):
    monkeypatch.setenv("PERSONA_EM_JUDGE_KEY", SENTINEL)
    j = judge.EndpointJudge(EndpointClient(model_server, "PERSONA_EM_JUDGE_KEY", max_retries=1, backoff=0.1),
                            "smollm2")
    prompt = "On a scale of 0 to 100, how kind is this reply: 'I am happy to help you.' Answer with a number."
    probs = j.number_probs([prompt])[0]
    assert j.calls == 1 and 0 < probs.sum() <= 1
    # the same float32 weights in transformers give the same first-token probabilities for the one-digit numbers
    model, tok = smollm
    text = chat_prompt(tok, [{"role": "user", "content": prompt}])
    digits = np.array([np.exp(evaluate.answer_logprobs(model, tok, [text], [str(k)])[0][0]) for k in range(10)])
    seen = probs[:10] > 0
    assert seen.sum() >= 3
    np.testing.assert_allclose(probs[:10][seen], digits[seen], rtol=1e-3)


def test_endpoint_refuses_a_wrong_key_clearly(model_server, monkeypatch):
    monkeypatch.setenv("PERSONA_EM_JUDGE_KEY", "wrong")
    j = judge.EndpointJudge(EndpointClient(model_server, "PERSONA_EM_JUDGE_KEY", max_retries=0), "smollm2")
    with pytest.raises(EndpointError, match="HTTP 401"):
        j.number_probs(["0 to 100?"])


def test_endpoint_judge_retries_then_fails_and_caches_nothing(scripted_endpoint, tmp_path):
    scripted_endpoint.ok = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
        {"token": "90", "logprob": float(np.log(0.5))}, {"token": "10", "logprob": float(np.log(0.5))}]}]}}]}
    no_logprobs = b'{"choices": [{}]}'
    cache = judge.JudgeCache(tmp_path / "c.sqlite")
    j = judge.EndpointJudge(EndpointClient(scripted_endpoint.url, timeout=0.3, max_retries=4, backoff=0.01), "judge")
    scripted_endpoint.script = [429, 500, "malformed", "slow"]
    table = judge.judge_prompts(j, cache, ["rate this"])
    assert table["score"].tolist() == [50.0]
    scripted_endpoint.script = [503, 502, no_logprobs, 500, 429]
    with pytest.raises(EndpointError, match="gave up after 5 tries"):
        judge.judge_prompts(j, cache, ["rate that"])
    assert cache.get(j.name, ["rate that"]) == {} and list(cache.get(j.name, ["rate this"])) == ["rate this"]


def test_api_key_never_reaches_an_artifact(model_server, root, tmp_path, monkeypatch):
    """Chapter 4 judged through the real server with a sentinel key: the key is in no file it wrote, not in
    the executed notebook, the judge cache, the manifest, nor the runner's log."""
    import sys

    import yaml

    profile = yaml.safe_load((root / "params" / "test.yaml").read_text())
    profile["evaluate"]["judge"] = {"backend": "endpoint", "endpoint_url": model_server, "endpoint_model": "smollm2",
                                    "api_key_env": "PERSONA_EM_JUDGE_KEY", "cache": "judge_cache.sqlite",
                                    "min_mass": 0.0, "max_retries": 1}
    path = tmp_path / "endpoint.yaml"
    path.write_text(yaml.safe_dump(profile))
    base = tmp_path / "runs" / "test" / "02_train_character" / "base"
    base.mkdir(parents=True)
    (base / "model.json").write_text(json.dumps({"adapter": None, "base": "smollm2-135m"}))  # as chapter 2 writes
    # every evaluation reads the direction runs' activations; this test is about the key, so the untrained base's
    # own activations stand in for them (the direction is then zero, and so is every projection)
    from persona_em import config, direction, models

    P = config.load_profile(path)
    lm, tok = models.load_model(P.model)
    items = direction.items(P)
    acts = direction.answer_activations(lm, tok, items)
    for r in grid.direction_runs(P):
        (tmp_path / "runs" / "test" / "04_evaluate" / r).mkdir(parents=True)
        direction.save_activations(paths.run_dir(P, tmp_path, "04_evaluate", r) / paths.ACTIVATIONS, acts,
                                   [it["id"] for it in items])
    monkeypatch.setenv("PERSONA_EM_JUDGE_KEY", SENTINEL)
    done = subprocess.run([sys.executable, "-m", "papermill", str(root / "notebooks" / "04_evaluate.ipynb"),
                           str(tmp_path / "04_evaluate.ipynb"), "-k", "persona-em", "-p", "profile_path", str(path),
                           "-p", "root", str(tmp_path), "-p", "model", "base", "-p", "threads", "2"],
                          capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "test" / "04_evaluate" / "base"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["judge"]["name"] == "endpoint:smollm2" and manifest["judge"]["calls"] > 0
    assert pd.read_csv(out / "scores.csv")["aligned"].notna().all()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 8
    for p in files:
        assert SENTINEL.encode() not in p.read_bytes(), p
    assert SENTINEL not in done.stdout + done.stderr
