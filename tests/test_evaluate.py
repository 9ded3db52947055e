"""Evaluation: the metric functions on hand-built examples, `evaluate_run` on tiny trained runs of both stages (its
numbers agree with training's own held-out evaluation), and the LLM judge against a fake OpenAI-compatible server."""
from __future__ import annotations

import itertools
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from evaluate import evaluate_run
from preflexor.errors import UserError
from preflexor.metrics import (concept_recall, key_concepts, lcs_length, parse_scores, parse_verdict, reference_answer,
                               rouge_l, token_f1)
from preflexor.thinking import THINK_END, THINK_START

# -----------------------------------------------------------------------------
# metric functions


def test_token_f1_and_rouge_l_exact_values():
    # 6 words each, 5 shared (the x2, cat, on, mat): P = R = 5/6; the LCS "the cat on the mat" has 5 words
    assert token_f1("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # same bag of words, different order: F1 = 1 but the LCS is 2 of 3 words
    assert token_f1("b a c", "a b c") == pytest.approx(1.0)
    assert rouge_l("b a c", "a b c") == pytest.approx(2 / 3)
    # P = 2/4, R = 2/2 -> F1 = 2/3 for both (LCS "a c")
    assert token_f1("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # multiset overlap: "a a a" vs "a b": common 1, P = 1/3, R = 1/2 -> F1 = 0.4
    assert token_f1("a a a", "a b") == pytest.approx(0.4)
    # case, punctuation, reasoning tags are ignored; empty texts
    assert token_f1("Bone, <|thinking|>tissue!", "bone tissue") == 1.0
    assert token_f1("", "") == rouge_l("", "") == 1.0
    assert token_f1("x", "") == rouge_l("", "x") == 0.0
    assert token_f1("x y", "z") == rouge_l("x y", "z") == 0.0


def test_lcs_matches_brute_force():
    rng = random.Random(0)

    def brute(a, b):
        best = 0
        for k in range(len(a) + 1):
            for sub in itertools.combinations(a, k):
                it = iter(b)
                if all(x in it for x in sub):  # subsequence of b
                    best = max(best, k)
        return best

    for _ in range(60):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == brute(a, b)


def test_reference_answer():
    """The grounded ground truth: meta.answer, else the chosen answer after its thinking (the grammar's tests are in
    test_thinking.py)."""
    rec = {"prompt": "q", "chosen": f"{THINK_START}x{THINK_END}\nRef answer.", "rejected": "r", "meta": {}}
    assert reference_answer(rec) == "Ref answer."
    assert reference_answer({**rec, "meta": {"answer": "From meta."}}) == "From meta."


def test_concept_recall():
    concepts = [["bone tissue", "bone"], ["collagen"], ["enamel"]]
    assert concept_recall("Bones are rich in Collagen.", concepts) == pytest.approx(2 / 3)  # plural, case
    assert concept_recall("bone-tissue and enamel, collagen", concepts) == 1.0  # punctuation between words
    assert concept_recall("osteon", concepts) == 0.0
    assert concept_recall("collagenase", [["collagen"]]) == 0.0  # whole words only
    assert concept_recall("anything", []) is None


def test_key_concepts_from_a_hand_built_graph():
    from preflexor.graph import IS_A, KnowledgeGraph

    g = KnowledgeGraph()
    for node, label, syn in [("T:1", "femur", ["thigh bone"]), ("T:2", "long bone", []), ("T:3", "bone", []),
                             ("T:4", "hip", []), ("T:5", "tibia", [])]:
        g.add_concept(node, label, syn)
    g.add_edge("T:1", IS_A, "T:2")
    g.add_edge("T:1", IS_A, "T:3")
    g.add_edge("T:5", IS_A, "T:2")  # a sibling: not a key concept of the femur
    rec = {"prompt": "How does the femur relate to the hip? Use <|thinking|>.", "chosen": "c", "rejected": "r",
           "meta": {"focus": "T:1", "concepts": ["femur", "hip"]}}
    assert key_concepts(g, rec) == [["femur", "thigh bone"], ["long bone"], ["bone"], ["hip"]]
    # without provenance: the first concept the question mentions is the focus
    assert key_concepts(g, {**rec, "meta": {}})[0] == ["femur", "thigh bone"]
    assert concept_recall("The thigh bone is a long bone.", key_concepts(g, rec)) == pytest.approx(3 / 4)


def test_parse_scores_is_robust():
    assert parse_scores('{"accuracy": 7, "depth": 5, "coherence": 9}') == {"accuracy": 7, "depth": 5, "coherence": 9}
    assert parse_scores('Sure!\n```json\n{"Accuracy": "8", "Depth of reasoning": 4, "coherence": 6}\n```') == \
        {"accuracy": 8, "depth": 4, "coherence": 6}
    assert parse_scores("Accuracy: 7/10\n**Depth** - 5\nCoherence = 12") == {"accuracy": 7, "depth": 5,
                                                                              "coherence": 10}  # clamped
    assert parse_scores("accuracy 0, coherence: 3") == {"accuracy": 1, "depth": None, "coherence": 3}
    assert parse_scores("no numbers here") == {"accuracy": None, "depth": None, "coherence": None}


def test_parse_verdict_is_robust():
    assert parse_verdict('{"winner": "B"}') == "B"
    assert parse_verdict('I think so. {"winner": "tie"}') == "tie"
    assert parse_verdict("A") == "A"
    assert parse_verdict("b.") == "B"
    assert parse_verdict("Answer B is clearly better because it is accurate.") == "B"
    assert parse_verdict("The better answer is A.") == "A"
    assert parse_verdict("Both are equally good: tie") == "tie"
    assert parse_verdict("I cannot decide which one to pick") is None


# -----------------------------------------------------------------------------
# a fake OpenAI-compatible judge


class _Judge(BaseHTTPRequestHandler):
    mode = "fair"  # fair: the answer containing GOOD wins; biased: always "A"
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        type(self).requests.append(body)
        if "Answer A:" in prompt:
            a = prompt.split("Answer A:", 1)[1].split("Answer B:", 1)[0]
            winner = "A" if self.mode == "biased" or "GOOD" in a else "B"
            text = f'After comparing both: {{"winner": "{winner}"}}'
        else:
            good = "GOOD" in prompt.split("Answer to grade:", 1)[1]
            text = f"Accuracy: {9 if good else 3}/10\nDepth: 6\nCoherence - 7"
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                       "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    _Judge.requests = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_judge_rubric_and_pairwise_both_orders(judge_url):
    from preflexor.metrics import Judge, judge_answers

    rows = [{"question": f"q{i}", "reference": "ref", "response": "GOOD answer" if i % 2 == 0 else "weak"}
            for i in range(4)]
    baseline = ["weak baseline" if i % 2 == 0 else "GOOD baseline" for i in range(4)]
    _Judge.mode = "fair"
    out = judge_answers(Judge(judge_url, "fake-judge"), rows, baseline)
    assert out["accuracy"] == pytest.approx(6.0) and out["depth"] == 6.0 and out["coherence"] == 7.0
    assert out["win_rate"] == pytest.approx(0.5) and out["position_consistency"] == 1.0
    assert [r["judge"]["pairwise"]["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    prompts = [r["messages"][-1]["content"] for r in _Judge.requests]
    pair_prompts = [p for p in prompts if "Answer A:" in p]
    assert len(pair_prompts) == 8  # every question asked in both orders
    assert all(r["temperature"] == 0.0 and r["model"] == "fake-judge" for r in _Judge.requests)
    # a judge that always picks the first position: both orders cancel to 1/2 and never agree
    _Judge.mode = "biased"
    rows2 = [{k: v for k, v in r.items() if k != "judge"} for r in rows]
    out = judge_answers(Judge(judge_url), rows2, baseline)
    assert out["win_rate"] == pytest.approx(0.5) and out["position_consistency"] == 0.0
    _Judge.mode = "fair"


# -----------------------------------------------------------------------------
# evaluate_run on tiny trained runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """Grounded pairs (with provenance), a tiny stage-1 ORPO run on them and a stage-2 EXO run from it."""
    import train_dpo
    import train_orpo

    from preflexor import metrics
    from preflexor.datagen import DatagenConfig, build_sources, build_teacher, generate_pairs

    root = tmp_path_factory.mktemp("evalruns")
    cfg = DatagenConfig(seed=3)
    docs, chunks, graph, retriever = build_sources(cfg)
    metrics._GRAPHS.setdefault("ontology", graph)  # the same graph evaluate would build: build it once
    pairs = root / "pairs.jsonl"
    generate_pairs(8, build_teacher(cfg, docs, chunks, graph, retriever), docs, chunks, graph, retriever,
                   rejected_source="teacher_incorrect", out_path=pairs, seed=3, progress=False)
    common = [f"data.pairs={pairs}", "data.heldout_pairs=3", "train.iterations=1", "train.steps_per_iteration=2",
              "train.batch_size=2", "train.grad_accum=1", "train.lr=1e-3", "train.eval_generations=0", "lora.r=4",
              "lora.alpha=8", "data.max_length=128", "data.max_prompt_len=64"]
    s1, s2 = root / "stage1", root / "stage2"
    train_orpo.main(["--config", "configs/stage1_grounded.yaml", f"model.source={tiny_llama_dir}",
                     f"train.out_dir={s1}", *common])
    train_dpo.main(["--config", "configs/stage2_grounded.yaml", f"model.source={s1 / 'final' / 'model'}",
                    f"train.out_dir={s2}", *common])
    return {"pairs": pairs, "s1": s1, "s2": s2, "base": tiny_llama_dir}


def _last_eval(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "eval/loss" in r][-1]


@pytest.mark.slow
def test_evaluate_run_stage1_and_stage2(runs, judge_url):
    r1 = evaluate_run(runs["s1"], n_questions=3, max_new_tokens=6, judge_url=judge_url, baseline_run="base",
                      base_model=str(runs["base"]))
    r2 = evaluate_run(runs["s2"], n_questions=3, max_new_tokens=6)
    for run, r in ((runs["s1"], r1), (runs["s2"], r2)):
        for name in ("eval.json", "eval.md", "eval.png"):
            assert (run / name).is_file() and (run / name).stat().st_size > 200
        assert json.loads((run / "eval.json").read_text())["metrics"] == pytest.approx(r["metrics"])
        m, last = r["metrics"], _last_eval(run)
        # the merged final model on the run's held-out pairs reproduces training's last held-out evaluation
        assert m["loss"] == pytest.approx(last["eval/loss"], rel=1e-3, abs=1e-4)
        assert m["rewards/accuracies"] == pytest.approx(last["eval/rewards/accuracies"], abs=1e-6)
        assert m["rewards/margins"] == pytest.approx(last["eval/rewards/margins"], rel=1e-3, abs=1e-4)
        assert m["nll"] == pytest.approx(last["eval/nll"], rel=1e-3, abs=1e-4)  # one set of names, one computation
        for k in ("format_rate", "opens_thinking_rate", "token_f1", "rouge_l", "logps/accuracies", "rewards/accuracies"):
            assert 0.0 <= m[k] <= 1.0, k
        assert m["nll"] > 0 and m["tokens_per_s"] > 0 and r["n_questions"] == 3
        assert len(r["pairs"]["margins"]) == 3 and len(r["samples"]) == 3
        assert all(s["key_concepts"] for s in r["samples"])  # the grounded provenance gives key concepts
        assert "| rewards/accuracies |" in (run / "eval.md").read_text()
    assert r1["loss"] == "orpo" and r1["reference"] is None and r1["stage"] == 1
    assert r2["loss"] == "exo_pair" and r2["reference"] == str(runs["s1"] / "final" / "model") and r2["stage"] == 2
    assert r1["metrics"]["loss"] != pytest.approx(r2["metrics"]["loss"])  # different objectives, different numbers
    # judge: rubric scores parsed, and the pairwise comparison against the base model's answers in both orders
    assert r1["judge"]["baseline"] == "base" and 0.0 <= r1["metrics"]["judge_win_rate"] <= 1.0
    assert r1["metrics"]["judge_accuracy"] == pytest.approx(3.0)  # the fake judge: no GOOD marker -> 3
    assert all("baseline_response" in s for s in r1["samples"])


def test_evaluate_base_and_bad_input(tmp_path, tiny_llama_dir):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({
        "prompt": f"What is bone, and how does it relate to skeletal tissue {i}? Use <|thinking|>.",
        "chosen": f"{THINK_START}\nsteps\n{THINK_END}\nBone is a skeletal tissue.", "rejected": "Bone is a gas.",
        "meta": {"question": "What is bone?", "answer": "Bone is a skeletal tissue."}}) + "\n" for i in range(2)))
    out = tmp_path / "base"
    r = evaluate_run("base", n_questions=2, max_new_tokens=4, heldout=held, out_dir=out, base_model=str(tiny_llama_dir))
    assert r["loss"] == "orpo" and r["stage"] == 0 and r["reference"] is None and (out / "eval.json").is_file()
    assert r["pairs"]["n"] == 2 and r["n_questions"] == 2  # the whole file is held out for the base model
    assert r["samples"][0]["reference"] == "Bone is a skeletal tissue."
    with pytest.raises(UserError, match="--heldout"):
        evaluate_run("base", out_dir=out)
    with pytest.raises(UserError, match="config.json"):
        evaluate_run(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"source": "x"}, "loss": {"name": "orpo"},
                                                               "data": {"pairs": str(held), "heldout_pairs": 1}}))
    with pytest.raises(UserError, match="final/model"):
        evaluate_run(tmp_path / "run")
    with pytest.raises(UserError, match="judge"):
        evaluate_run(tmp_path / "run", baseline_run="base")


def test_cli_exit_code_on_bad_input(tmp_path, capsys):
    from evaluate import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err


def test_format_rate_stops_rows_that_cannot_be_well_formed(tiny_llama_dir):
    """The early stop only ends rows whose text can no longer be well formed; it never cuts a thinking response."""
    import torch

    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.metrics import format_rate, generate_responses

    model, tok = load_model_and_tokenizer(tiny_llama_dir, dtype="float32")
    enc = lambda s: tok.encode(s, allow_special=True)  # noqa: E731
    start = tok.reasoning_ids[THINK_START]  # the token-by-token rule (`FormatWatch`) is tested in test_thinking.py

    def force(token_id: int) -> None:
        """Make greedy decoding emit `token_id` every step: its (tied) head row dominates every logit."""
        with torch.no_grad():
            w = model.model.embed_tokens.weight
            w[token_id] = 1e3 * model.model.norm.weight

    questions = ["What is bone? Use <|thinking|>.", "What is a cell? Use <|thinking|>."]
    word = enc(" Bone")[0]
    force(word)  # a model that answers without the tag: rows end after the first token, not at the budget
    full = generate_responses(model, tok, questions, 24)
    fr = format_rate(model, tok, questions, 24)
    assert [g["n_tokens"] for g in full["rows"]] == [24, 24]
    assert fr["format_rate"] == 0.0 and all(s["stopped_early"] for s in fr["samples"])
    assert [s["response"] for s in fr["samples"]] == [tok.decode([word])] * 2

    with torch.no_grad():
        model.model.embed_tokens.weight[word] = 0.0
    force(start)  # a model that opens with the tag (and repeats it): cut at the second tag, flagged as malformed
    fr = format_rate(model, tok, questions[:1], 6)
    assert fr["samples"][0]["response"] == THINK_START + THINK_START and fr["samples"][0]["stopped_early"]
