import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"


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
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/reference is not next to this checkout")
    return SHARED


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
