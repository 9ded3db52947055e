"""The reasoning evaluation (metrics.answer_accuracy / thinking_probe / recursion_accuracy, eval_reasoning.py) on a
random tiny Llama: pre-filled generation equals generating from the concatenated ids, the probe and the recursion
score what a direct computation scores, and the script writes its table. The effect itself is measured in README."""
from __future__ import annotations

import json

import pytest

from preflexor.checkpoint import load_model_and_tokenizer
from preflexor.datagen import DatagenConfig, build_sources
from preflexor.metrics import answer_accuracy, generate_responses, question_prompt_ids, recursion_accuracy, thinking_probe
from preflexor.reasoning import GraphCritic
from preflexor.sampler import generate_ex
from preflexor.tasks import RelationChecker, answer_set, check
from preflexor.thinking import final_answer, split_thinking, thinking_prefix


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    graph = build_sources(DatagenConfig(corpus="ontology", retrieval="none"))[2]
    model, tok = load_model_and_tokenizer(tiny_llama_dir, add_reasoning_tokens=True)
    # the six shortest of the fixed set: prompt + thinking fit the tiny model's 512 positions
    ex = sorted(answer_set(graph, 40), key=lambda r: len(tok.encode(r["prompt"] + r["chosen"])))[:6]
    return graph, ex, model.eval(), tok


def test_prefilled_generation_is_the_continuation_of_prompt_plus_prefix(setup):
    _, ex, model, tok = setup
    pre = [thinking_prefix(split_thinking(r["chosen"])["thinking"]) for r in ex[:3]]
    rows = generate_responses(model, tok, [r["prompt"] for r in ex[:3]], 8, batch_size=2, prefixes=pre)["rows"]
    for r, p, row in zip(ex, pre, rows):
        ids = question_prompt_ids(tok, r["prompt"]) + tok.encode(p, allow_special=True)
        out = generate_ex(model, [ids], 8, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        assert row["response"] == tok.decode(out.tokens[0][0], skip_special=True)


def test_probe_and_recursion_score_their_answers(setup):
    graph, ex, model, tok = setup
    probe = thinking_probe(model, tok, ex, max_new_tokens=6, batch_size=4)
    assert probe["n"] == 6 and 0 <= probe["follows_decoy"] <= 1 and len(probe["samples_rejected"]) == 6
    want = sum(check(a, r["meta"]["rejected_answer"]) for a, r in zip(probe["samples_rejected"], ex)) / 6
    assert probe["follows_decoy"] == pytest.approx(want)

    checker = RelationChecker(graph)
    acc = answer_accuracy(model, tok, [r["prompt"] for r in ex], [r["meta"]["answer"] for r in ex], 12,
                          checker=checker)
    assert acc["n"] == 6 and acc["ci95"][0] <= acc["exact_accuracy"] <= acc["ci95"][1]
    first = [s["response"] for s in acc["samples"]]
    rec = recursion_accuracy(model, tok, ex, GraphCritic(checker), rounds=2, max_new_tokens=12, answer_tokens=6,
                             first=first)
    r1, r2 = rec["rounds"]
    assert r1["N"] == 1 and r1["accuracy"] == acc["exact_accuracy"] == r1["integrated"]
    assert r1["vs_first"] == 0.0 and r2["vs_first"] == pytest.approx(r2["accuracy"] - r1["accuracy"])  # paired
    # round 2 re-answers after the critic's rewrite: every statement the rewrite keeps is true in the graph
    assert r2["factuality"] in (None, 1.0)
    assert [final_answer(t) for t in first] == [final_answer(s["response"]) for s in acc["samples"]]


def test_eval_reasoning_writes_its_table(setup, tiny_llama_dir, tmp_path):
    import eval_reasoning

    res = eval_reasoning.main([str(tiny_llama_dir), "--n", "4", "--max-new-tokens", "8", "--probe", "2",
                               "--recursive", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "reasoning.json").read_text())
    assert saved["models"][0]["answers"]["n"] == 4 and saved["models"][0]["probe"]["n"] == 2
    assert [r["N"] for r in saved["models"][0]["recursion"]["rounds"]] == [1, 2]
    md = (tmp_path / "reasoning.md").read_text()
    assert "exact accuracy" in md and "Probe" in md and "grounded critic" in md and res["n"] == 4
    assert "difference to" in md and "+0.000 [0.000, 0.000]" in md  # the first model against itself
    with pytest.raises(SystemExit) as e:
        eval_reasoning.main(["/no/such/run", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_a_saved_models_answer_evaluation_is_kept_for_its_weights_only(tmp_path):
    """The next stage reads the evaluation a run kept beside the model it saved ("before" = that run's "after"),
    and only for the same questions, budget and system prompt and the same weight files."""
    import os

    from preflexor.metrics import answer_eval_key, load_answer_eval, save_answer_eval

    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    key = answer_eval_key(["q1", "q2"], ["Yes", "No"], 384, None)
    assert load_answer_eval(d, key) is None  # nothing kept
    save_answer_eval(d, key, {"exact_accuracy": 0.5, "n": 2})
    assert load_answer_eval(d, key) == {"exact_accuracy": 0.5, "n": 2}
    assert load_answer_eval(d, answer_eval_key(["q1", "q2"], ["Yes", "No"], 256, None)) is None  # another budget
    assert load_answer_eval(d, answer_eval_key(["q1", "q2"], ["Yes", "No"], 384, "Be brief.")) is None
    (d / "model.safetensors").write_bytes(b"other weights")  # rewritten since
    os.utime(d / "model.safetensors", ns=(1, 1))
    assert load_answer_eval(d, key) is None
    assert load_answer_eval(tmp_path / "no_such_model", key) is None


def test_paired_delta_resamples_the_questions_together():
    from preflexor.metrics import paired_delta

    before = {"n": 4, "samples": [{"correct": c} for c in (False, False, True, True)]}
    after = {"n": 4, "samples": [{"correct": c} for c in (True, True, True, True)]}
    d = paired_delta(before, after)
    assert d["delta"] == 0.5 and 0.0 <= d["ci95"][0] <= 0.5 <= d["ci95"][1] <= 1.0
    same = paired_delta(after, after)
    assert same == {"delta": 0.0, "ci95": [0.0, 0.0]}  # no change: a zero-width interval, not the unpaired one
    with pytest.raises(ValueError):
        paired_delta(before, {"n": 3, "samples": after["samples"][:3]})
