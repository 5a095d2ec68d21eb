import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
FORMATS = ROOT / "tests" / "data" / "formats"
STATSMODELS = Path(importlib.util.find_spec("statsmodels").submodule_search_locations[0])

# Files in formats the project must read, each with what a correct reader finds in it: the project's own file
# of each format (tests/data/formats/, always present), and the public original where ../shared/reference lies
# next to the checkout. A test that takes one of these arguments runs once for each file present, so a plain
# clone runs every test and skips none.
REFERENCE_INPUTS = {
    "constitution_file": [
        (FORMATS / "oct_handwritten.txt", {"traits": 3, "questions": 15}),
        (SHARED / "oct_sycophancy.txt", {"traits": 10, "questions": 50}),
    ],
    "question_file": [
        (FORMATS / "em_questions.yaml", {"questions": 5, "paraphrases": 7, "with_system": 2, "samples": 50}),
        (SHARED / "em_first_plot_questions.yaml", {"questions": 24, "paraphrases": 24, "with_system": 8,
                                                   "samples": 100}),
    ],
    # Reaction-style data for a random intercept and slope, y ~ x + (x | group), with lme4's REML fit. dietox
    # (pig weights over time) ships in statsmodels' wheel with lme4's numbers printed in statsmodels'
    # regression/tests/test_lme.py (test_dietox_slopes); statsmodels' REML optimum lies a hair from lme4's
    # there (same criterion to 1e-3, variances within 0.3%), hence the tolerances (about 0.2-0.5%). sleepstudy's are lme4's
    # printed digits (half a unit of the last one).
    "lme4_fit": [
        (STATSMODELS / "regression" / "tests" / "results" / "dietox.csv",
         {"y": "Weight", "x": "Time", "group": "Pig", "lme4": {
             "intercept": (15.738650, 1e-5), "slope": (6.939014, 1e-5),
             "se_intercept": (0.5501253, 1e-3), "se_slope": (0.0798254, 1e-6),
             "var_intercept": (19.4934552, 0.1), "var_slope": (0.4160620, 1e-5),
             "corr": (0.2938323 / (19.4934552 * 0.4160620) ** 0.5, 1e-3),
             "residual": (6.03745, 2e-3), "reml_criterion": (2 * 2217.047, 5e-3)}}),
        (SHARED / "sleepstudy.csv",
         {"y": "Y", "x": "U", "group": "G", "lme4": {
             "intercept": (251.405, 5e-4), "slope": (10.467, 5e-4),
             "se_intercept": (6.825, 5e-4), "se_slope": (1.546, 5e-4),
             "var_intercept": (612.10, 5e-3), "var_slope": (35.07, 5e-3), "corr": (0.07, 5e-3),
             "residual": (654.94, 5e-3), "reml_criterion": (1743.6, 5e-2)}}),
    ],
}


def pytest_report_header(config):
    shared = sum(case[0].is_file() for cases in REFERENCE_INPUTS.values() for case in cases[1:])
    return f"reference inputs: the project's own formats, and {shared} public originals from {SHARED}"


def pytest_generate_tests(metafunc):
    for name, cases in REFERENCE_INPUTS.items():
        if name in metafunc.fixturenames:
            present = [case for case in cases if case[0].is_file()]
            metafunc.parametrize(name, present, ids=[path.stem for path, _ in present])


SERVER_FIXTURES = {"model_server", "served"}   # fixtures that start a model server


def pytest_collection_modifyitems(items):
    """`make test-fast` leaves out the tiers marked here and in the modules (e2e, browser)."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smollm():
    import torch

    from persona_em import models

    torch.set_num_threads(2)
    return models.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama():
    """A randomly initialised one-layer Llama with the embedded model's tokenizer and vocabulary, for properties
    of the trainers that do not need the trained weights: under bf16 autocast on a CPU without bf16 instructions
    (emulated matmuls, about 100x slower than float32) a DPO step of the embedded model takes minutes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from persona_em import models

    tok = models.load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


class ScriptedEndpoint:
    """An OpenAI-style HTTP endpoint on 127.0.0.1 that plays `script` first (an HTTP status code, "slow",
    "malformed", or raw body bytes), then answers every request with the JSON body `ok`. `seen` records each
    request's JSON body and Authorization header."""

    def __init__(self):
        import json
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.script, self.seen, self.ok = [], [], {}
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                state.seen.append((body, self.headers.get("Authorization")))
                fault = state.script.pop(0) if state.script else "ok"
                if fault == "slow":
                    time.sleep(0.6)
                if isinstance(fault, int):
                    self.send_response(fault)
                    self.end_headers()
                    return
                payload = (fault if isinstance(fault, bytes) else b"{not json" if fault == "malformed"
                           else json.dumps(state.ok).encode())
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture()
def scripted_endpoint():
    endpoint = ScriptedEndpoint()
    yield endpoint
    endpoint.httpd.shutdown()
