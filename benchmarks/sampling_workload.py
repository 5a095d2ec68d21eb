"""Chapter 1's sampling workload, the one `sampling_backends` and `sampling_ceiling` measure: `tiny`'s best-of-n
contexts (3 same-domain demonstrations before each question, both sides, 2 answers each, 40 new tokens at most,
temperature 0.7, top-p 0.95) for 10 questions per life domain, about as many as `tiny`'s draws hold, from the
first `n_domains` domains."""
import json

from persona_em import constitution, pairs, questions, sampling, scorer

N, MAX_NEW, T, TOP_P = 2, 40, 0.7, 0.95


def workload(tok, n_domains: int) -> tuple[list[str], dict[str, list[str]]]:
    """(prompts: one chat prompt per sample, N per question and side; groups: each shared context, as the JSON
    of its messages before the last turn, -> the user turns asked after it)."""
    c = constitution.load("candor")
    pool = questions.build_pool("candor", 0, c.traits[0].trait, 10 * len(questions.situations()["domains"]), seed=0)
    pool = [q for q in pool if q["cell"] in sorted({q["cell"] for q in pool})[:n_domains]]
    contexts = pairs.side_contexts(pool, scorer.load_items(scorer.items_path("candor")),
                                   constitution.system_prompt(c, "Sage"), k=3, seed=0)
    convs = [ctx for sides in contexts.values() for ctx in sides.values() for _ in range(N)]
    groups: dict[str, list[str]] = {}
    for sides in contexts.values():
        for ctx in sides.values():
            groups.setdefault(json.dumps(ctx[:-1]), []).append(ctx[-1]["content"])
    return [sampling.chat_prompt(tok, m) for m in convs], groups
