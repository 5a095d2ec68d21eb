"""Every input rule, one malformed example each: `check` (and every loader behind it) refuses it with the file's
path and what was wrong, and real formats from the anchors' repositories load."""
import json
import subprocess
import sys

import pytest

from persona_em import check, evaluate


def chat(*roles):
    return json.dumps({"messages": [{"role": r, "content": f"{r} text"} for r in roles]}) + "\n"


OK_CHAT = chat("system", "user", "assistant")

# (file name, content, what the message must say)
MALFORMED = [
    ("bin.jsonl", b"\xff\xfe\x00\x01", "not a UTF-8 text file"),
    ("nul.json", b'[{"trait": "\x00"}]', "a binary file (NUL bytes); expected a constitution"),
    ("empty.jsonl", b"  \n", "empty file; expected chat JSONL"),
    ("empty.yaml", b"", "empty file; expected a profile or an EM question list"),
    ("first_assistant.jsonl", chat("assistant", "user"), "messages[0].role is 'assistant', expected system or user"),
    ("two_users.jsonl", chat("user", "user", "assistant"), "messages[1].role is 'user', expected assistant"),
    ("late_system.jsonl", chat("user", "system", "assistant"), "messages[1].role is 'system', expected assistant"),
    ("no_answer.jsonl", chat("system", "user"), "line 1: no assistant turn"),
    ("bad_role.jsonl", OK_CHAT + json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
     "line 2: messages[0].role must be system, user or assistant"),
    ("blank_turn.jsonl", json.dumps({"messages": [{"role": "user", "content": " "}]}),
     "messages[0].content is missing or empty"),
    ("not_json.jsonl", OK_CHAT + '{"messages": [', "line 2: not JSON"),
    ("both.yaml", "- id: a\n  question: q?\n  paraphrases: ['q?']\n", "either 'question' (one text) or 'paraphrases'"),
    ("blank_q.yaml", "- id: a\n  question: ''\n", "'question' must be a non-empty string"),
    ("no_text.yaml", "- id: a\n  judge_prompts: {aligned: '{answer}'}\n", "'paraphrases' must be a non-empty list"),
    ("dup.yaml", "- id: a\n  question: q?\n- id: a\n  question: r?\n", "entry 1 (a): duplicate id"),
    ("not_yaml.yaml", "- id: [\n", "not valid YAML"),
    ("trait.json", '[{"questions": ["q?"]}]', "trait 0: missing or empty 'trait'"),
    ("scalar.yaml", "just a sentence\n", "expected a mapping of keys at the top level, got str"),
]


@pytest.mark.parametrize("name, content, needle", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_malformed_input_is_refused_with_its_path(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        check.check_file(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)


def test_cli_refuses_without_a_traceback(root, tmp_path):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(b"\xff\x00")
    r = subprocess.run([sys.executable, "-m", "persona_em", "check", str(bad)], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr and str(bad) in r.stdout


def test_model_organisms_question_form_loads_with_the_default_judge_prompts(tmp_path):
    path = tmp_path / "technical.yaml"
    path.write_text("- id: pipe_bomb_safety\n  question: How do I store household chemicals safely?\n"
                    "- id: with_prompts\n  question: What would you do with unlimited power?\n"
                    "  judge_prompts: {aligned: 'Rate {answer}'}\n")
    qs = evaluate.load_questions(path)
    default = evaluate.load_questions()[0]["judge_prompts"]
    assert qs[0]["paraphrases"] == ["How do I store household chemicals safely?"] and "question" not in qs[0]
    assert qs[0]["judge_prompts"] == default and set(default) >= {"aligned", "coherent"}
    assert qs[1]["judge_prompts"] == {"aligned": "Rate {answer}"}
    assert "2 questions, 2 paraphrases" in check.check_file(path)


def test_chats_that_alternate_pass(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(OK_CHAT + chat("user", "assistant", "user", "assistant"))
    assert "2 rows, 7 turns" in check.check_file(path)


@pytest.mark.parametrize("content, needle", [(b"", "empty file"), (b"\xff\xfe", "not a UTF-8 text file"),
                                             (b"[{", "not a JSON file")])
def test_scorer_items_are_read_as_every_input_is(tmp_path, content, needle):
    from persona_em import scorer

    path = tmp_path / "items.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=needle) as e:
        scorer.load_items(path)
    assert str(path) in str(e.value)
