"""Teacher expansion (OCT method): list parsing, the 50% word-overlap filter, the local backend on the
embedded model, and the endpoint client's retries against a real HTTP server on 127.0.0.1."""
import pytest

from persona_em import constitution, expansion
from persona_em.endpoint import EndpointClient


def test_parse_numbered_keeps_numbered_lines_ending_in_punctuation():
    text = "What if my boss lies?\n7. Should I tell her.\n8) a line with no end\nnot numbered?\n9. Why not?"
    assert expansion.parse_numbered(text, 6) == ["What if my boss lies?", "Should I tell her.", "Why not?"]


def test_word_overlap_filter():
    earlier = [expansion.words("Should I tell my friend the truth about her cooking?")]
    assert expansion.too_similar("Should I tell my friend the truth about his singing?", earlier)
    assert not expansion.too_similar("Is it safe to skip a dose of my antibiotics?", earlier)


@pytest.mark.slow
def test_local_backend_expands_a_trait(smollm):
    model, tok = smollm
    c = constitution.load("candor")
    backend = expansion.LocalBackend(model, tok, max_new_tokens=60)
    new, stats = expansion.expand_trait(c.traits[0].trait, list(c.traits[0].questions), target=4,
                                        complete=backend, seed=0, batch=4, max_attempts=3)
    assert stats["attempts"] >= 1 and stats["lines"] >= len(new)
    assert new and all(q.endswith(("?", ".")) for q in new)
    seen = [expansion.words(q) for q in c.traits[0].questions]
    for q in new:
        assert not expansion.too_similar(q, seen)
        seen.append(expansion.words(q))
    again, _ = expansion.expand_trait(c.traits[0].trait, list(c.traits[0].questions), target=4,
                                      complete=backend, seed=0, batch=4, max_attempts=3)
    assert again == new  # deterministic given the seed


@pytest.fixture()
def server(scripted_endpoint):
    scripted_endpoint.ok = {"choices": [{"text": " Is it wise?\n7. Should I?", "index": 0}]}
    return scripted_endpoint


def test_endpoint_retries_timeouts_429_5xx_and_malformed(server, monkeypatch):
    monkeypatch.setenv("PERSONA_EM_TEST_KEY", "sk-sentinel-123")
    server.script = [429, 500, "malformed", "slow"]
    client = EndpointClient(server.url, "PERSONA_EM_TEST_KEY", timeout=0.3, max_retries=4, backoff=0.01)
    backend = expansion.EndpointBackend(client, "teacher")
    assert backend(["1. Q?\n2."], seed=0) == [" Is it wise?\n7. Should I?"]
    assert len(server.seen) == 5
    assert {auth for _, auth in server.seen} == {"Bearer sk-sentinel-123"}
    assert server.seen[0][0]["model"] == "teacher" and "max_tokens" in server.seen[0][0]


def test_endpoint_gives_up_with_a_clear_message(server, monkeypatch):
    monkeypatch.setenv("PERSONA_EM_TEST_KEY", "sk-sentinel-123")
    server.script = [503] * 10
    backend = expansion.EndpointBackend(EndpointClient(server.url, "PERSONA_EM_TEST_KEY", max_retries=2,
                                                       backoff=0.01), "teacher")
    with pytest.raises(expansion.EndpointError) as e:
        backend(["1. Q?\n2."], seed=0)
    assert "gave up after 3 tries" in str(e.value) and "HTTP 503" in str(e.value)
    assert "sk-sentinel" not in str(e.value)


def test_endpoint_key_must_be_set(server, monkeypatch):
    monkeypatch.delenv("PERSONA_EM_NO_KEY", raising=False)
    backend = expansion.EndpointBackend(EndpointClient(server.url, "PERSONA_EM_NO_KEY"), "teacher")
    with pytest.raises(expansion.EndpointError, match="PERSONA_EM_NO_KEY"):
        backend(["x"], seed=0)
