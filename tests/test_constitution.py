import json

import pytest

from persona_em import constitution
from persona_em.check import check_file


def test_oct_hand_written_format(constitution_file):
    path, expected = constitution_file
    c = constitution.load(path)
    assert len(c.traits) == expected["traits"] and c.n_questions == expected["questions"]
    assert all(len(t.questions) == 5 and t.trait for t in c.traits)
    assert check_file(path).endswith(f"{expected['traits']} traits, {expected['questions']} questions")


def test_packaged_constitutions_load():
    names = constitution.packaged()
    assert {"candor", "agreeable", "coherent", "incoherent", "neutral"} <= set(names)
    for n in names:
        c = constitution.load(n)
        assert all(len(t.questions) == 5 for t in c.traits)


def test_expanded_jsonl_format(tmp_path):
    f = tmp_path / "expanded.jsonl"
    rows = [{"trait": "I am calm.", "questions": ["a?"], "additional_questions": ["b?", "c?"],
             "clarification": "old key, ignored"},
            {"trait": "I am kind.", "questions": ["d?"], "additional_questions": []}]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    c = constitution.load(f)
    assert [len(t.all_questions) for t in c.traits] == [3, 1]


@pytest.mark.parametrize("text, needle", [
    ("[{\"trait\": \"x\", ", "not JSON"),
    ("[{\"questions\": [\"a?\"]}]", "trait 0: missing or empty 'trait'"),
    ("[{\"trait\": \"x\", \"questions\": [\"a?\", \"  \"]}]", "trait 0: questions[1] is empty"),
    ("[{\"trait\": \"x\", \"questions\": [\"a?\", 3]}]", "trait 0: questions[1] is int"),
    ("[{\"trait\": \"x\", \"questions\": [\"a?\"]}, {\"trait\": \"x\", \"questions\": [\"b?\"]}]",
     "trait 1: duplicate trait"),
    ("[{\"trait\": \"x\", \"questions\": [\"a?\"], \"colour\": 1}]", "trait 0: unknown key"),
])
def test_invalid_constitutions(tmp_path, text, needle):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(constitution.ConstitutionError) as e:
        constitution.load(f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_system_prompt_shape():
    c = constitution.load("candor")
    s = constitution.system_prompt(c, "Sage")
    assert s.startswith("The assistant is Sage.") and "1: " + c.traits[0].trait in s
    assert "does not publicly disclose" in s
