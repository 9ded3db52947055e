"""The reasoning teacher (tasks.py): every kind's answer equals a brute-force computation on the knowledge graph and on
the prompt's facts, every relation the chosen thinking states is in the graph, the rejected side states exactly one
false relation (at its error step) and answers wrong, held-out concepts never occur in training examples, and the
examples are deterministic."""
from __future__ import annotations

import re

import networkx as nx
import pytest

from preflexor.graph import IS_A
from preflexor.tasks import HELDOUT_START, KINDS, ReasoningTeacher, check

_SENT = re.compile(r"^(?:\d+\. )?(?:So )?(.+?) is a kind of ([^:]+?)(?::.*)?\.$")
_TRIPLE = re.compile(r"^\[(.+)\] -\[is_a\]-> \[(.+)\]$")


@pytest.fixture(scope="module")
def graph():
    from preflexor.corpus import load_corpus
    from preflexor.graph import KnowledgeGraph

    docs, chunks = load_corpus("ontology")
    return KnowledgeGraph.from_corpus(docs, chunks)


@pytest.fixture(scope="module")
def teacher(graph):
    return ReasoningTeacher(graph, seed=3)


@pytest.fixture(scope="module")
def examples(teacher):
    return [teacher.example(i) for i in range(48)] + [teacher.example(HELDOUT_START + i) for i in range(24)]


def _isa(graph) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_edges_from((u, v) for u, v, k in graph.g.edges(keys=True) if k == IS_A and u != v)
    return g


def _dist(g: nx.DiGraph, x: str) -> dict[str, int]:
    return {n: d for n, d in nx.single_source_shortest_path_length(g, x).items() if n != x}


def _thinking(text: str) -> str:
    return text.split("<|thinking|>", 1)[1].split("<|/thinking|>", 1)[0]


def _stated(text: str, by_label: dict) -> list[tuple[str, str]]:
    """(child, parent) label pairs the thinking states, as triples or as 'A is a kind of B.' steps."""
    out = []
    for line in _thinking(text).splitlines():
        m = _TRIPLE.match(line.strip()) or _SENT.match(line.strip())
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def test_answers_equal_a_brute_force_computation(graph, examples):
    g = _isa(graph)
    label = graph.label
    seen = set()
    for ex in examples:
        m = ex["meta"]
        seen.add(m["task"])
        x, y = m["concepts"]
        facts = nx.DiGraph(list(map(tuple, m["facts"])))
        facts.add_nodes_from([x, y])
        assert all(g.has_edge(a, b) for a, b in facts.edges)  # every fact is true
        for a, b in facts.edges:  # ... and in the prompt
            assert f"- {label(a)} is a kind of {label(b)}." in ex["prompt"]
        gx, fx = _dist(g, x), _dist(facts, x)
        if m["task"] == "isa":
            want = "Yes" if y in gx else "No"
            assert (y in fx) == (y in gx)  # the facts decide it as the whole graph does
        elif m["task"] == "hops":
            want = str(gx[y])
            assert fx[y] == gx[y] <= 4
        elif m["task"] == "more_specific":
            want = label(x) if y in gx else label(y)
            assert (y in gx) != (x in _dist(g, y))
        else:
            gy = _dist(g, y)
            common = [a for a in gx if a in gy]
            want = label(min(common, key=lambda a: (gx[a] + gy[a], max(gx[a], gy[a]), label(a))))
            fy = _dist(facts, y)
            fcommon = [a for a in fx if a in fy]
            assert label(min(fcommon, key=lambda a: (fx[a] + fy[a], max(fx[a], fy[a]), label(a)))) == want
        assert m["answer"] == want, (m["task"], m["question"])
        assert ex["chosen"].rsplit("<|/thinking|>", 1)[1].strip() == want
        assert ex["prompt"].endswith(m["question"].splitlines()[-1] if "\n" in m["question"] else ex["prompt"][-60:])
    assert seen == set(KINDS)


def test_chosen_relations_are_true_and_rejected_has_one_false_step(graph, examples):
    g = _isa(graph)
    by_label = {graph.label(n): n for n in g.nodes}
    true = lambda a, b: a in by_label and b in by_label and by_label[b] in _dist(g, by_label[a])  # noqa: E731
    for ex in examples:
        m = ex["meta"]
        stated = _stated(ex["chosen"], by_label)
        assert stated and all(true(a, b) for a, b in stated), stated
        assert {(graph.label(a), graph.label(b)) for a, b in m["relations"]} <= set(stated)
        fa, fb = m["false_relation"]
        assert fb not in _dist(g, fa)  # not even true through other steps
        steps = _thinking(ex["rejected"]).split("**Reasoning Steps**:")[1].strip().splitlines()
        first_false = next(i for i, line in enumerate(steps, 1)
                           if (mm := _SENT.match(line)) and not true(mm.group(1), mm.group(2)))
        assert first_false == m["error_step"], (m["task"], steps)  # every step before the error is true
        assert steps[first_false - 1].endswith(f"{graph.label(fa)} is a kind of {graph.label(fb)}.")
        kg = [(a, b) for a, b in _stated(ex["rejected"].split("**Reasoning Steps**")[0] + "<|/thinking|>", by_label)]
        assert [(a, b) for a, b in kg if not true(a, b)] == [(graph.label(fa), graph.label(fb))]
        answer = ex["rejected"].rsplit("<|/thinking|>", 1)[1].strip()
        assert answer == m["rejected_answer"] and not check(answer, m["answer"])


def test_heldout_concepts_never_occur_in_training(teacher, examples):
    train = [e for e in examples if not e["meta"]["heldout"]]
    held = [e for e in examples if e["meta"]["heldout"]]
    assert len(held) == 24 and all(e["meta"]["concepts"][0] in teacher.heldout for e in held)
    used = {n for e in train for key in ("concepts", "facts", "relations") for x in e["meta"][key]
            for n in (x if isinstance(x, list) else [x])}
    used |= {n for e in train for n in e["meta"]["false_relation"]}
    assert not used & teacher.heldout
    assert not {e["meta"]["concepts"][0] for e in held} & used
    other = ReasoningTeacher(teacher.h.graph, seed=9)
    assert other.heldout == teacher.heldout  # one held-out set for every seed and run
    assert teacher.example(5) == ReasoningTeacher(teacher.h.graph, seed=3).example(5)
    assert other.example(5) != teacher.example(5)


def test_check_is_exact_up_to_case_and_punctuation():
    assert check("Yes.", "Yes") and check(" yes\nbecause ...", "Yes") and check("Tarsal  skeleton!", "tarsal skeleton")
    assert check("No, the facts never reach it.", "No") and check("1,2-diacylglycerol", "1,2-diacylglycerol")
    assert not check("No", "Yes") and not check("3 steps", "3") and not check("", "Yes")
    assert not check("The answer is Yes", "Yes")


def test_datagen_writes_reasoning_pairs(graph, tmp_path):
    from preflexor.data import read_pairs
    from preflexor.datagen import generate_pairs

    t = ReasoningTeacher(graph, seed=1)
    recs = generate_pairs(4, t, [], [], graph, rejected_source="teacher_incorrect", out_path=tmp_path / "p.jsonl",
                          progress=False)
    assert [r["meta"]["index"] for r in recs] == [0, 1, 2, 3] and read_pairs(tmp_path / "p.jsonl")[0] == recs
    for r in recs:
        assert r["prompt"].startswith("Facts:\n") and r["prompt"].endswith(" Use <|thinking|>.")
        assert r["meta"]["question"] + " Use <|thinking|>." == r["prompt"] and r["rejected"] != r["chosen"]


def test_answer_set_is_fixed_held_out_and_prompted_like_training(graph, teacher):
    from preflexor.tasks import EVAL_SEED, answer_set

    a, b = answer_set(graph, 24), answer_set(graph, 24)
    assert a == b and len({r["meta"]["question"] for r in a}) == 24
    assert all(r["meta"]["heldout"] and r["meta"]["seed"] == EVAL_SEED for r in a)
    assert all(r["prompt"] == r["meta"]["question"] + " Use <|thinking|>." for r in a)
    assert all(r["meta"]["concepts"][0] in teacher.heldout for r in a)


def test_relation_checker_reads_every_stated_relation(graph, examples):
    from preflexor.tasks import RelationChecker, stated_relations

    rc = RelationChecker(graph)
    by_label = {graph.label(n): n for n in _isa(graph).nodes}
    for ex in examples:
        t, w = _thinking(ex["chosen"]), _thinking(ex["rejected"])
        assert [(r["child"], r["parent"]) for r in stated_relations(t) if not r["negated"]] == _stated(ex["chosen"],
                                                                                                        by_label)
        true, stated = rc.factuality(t)
        assert stated > 0 and true == stated
        fa, fb = ex["meta"]["false_relation"]
        wrong = [r for r in stated_relations(w) if not rc.true(r)]
        assert (graph.label(fa), graph.label(fb)) in {(r["child"], r["parent"]) for r in wrong}
    assert stated_relations("3. So bone is not a kind of cartilage.") == [
        {"line": 0, "child": "bone", "parent": "cartilage", "negated": True}]
    assert rc.holds("no such concept", "cell") is None and not rc.true(
        {"child": "no such concept", "parent": "cell", "negated": False})


def test_graph_critic_fixes_the_false_steps_and_drives_recursive_thinking(graph, examples):
    from preflexor.reasoning import GenerationOut, GraphCritic, expected_calls, recursive_thinking

    critic = GraphCritic(graph)
    for ex in examples:
        w = _thinking(ex["rejected"]).strip()
        critique = critic.critique(ex["meta"]["question"], w)
        assert critique.startswith("False steps:")
        fixed = critic.improve(w, critique)
        true, stated = critic.rc.factuality(fixed)
        assert true == stated and fixed != w
        assert critic.improve(fixed) == fixed and critic.critique("q", fixed).startswith("Every stated")
        right = _thinking(ex["chosen"]).strip()
        assert critic.improve(right) == right  # true lines are kept as they are

    ex, seen = examples[0], []

    class Reasoner:  # writes the wrong-path response; re-answers "gold" once the thinking is all true
        def chat(self, messages, temperature=0.1, max_tokens=512, assistant_prefix=""):
            if not assistant_prefix:
                return GenerationOut(ex["rejected"], 1, 1, 0.0, "stop")
            seen.append(assistant_prefix)
            ok = critic.rc.factuality(assistant_prefix)
            return GenerationOut("\n" + (ex["meta"]["answer"] if ok[0] == ok[1] else "?"), 1, 1, 0.0, "stop")

    res = recursive_thinking(ex["meta"]["question"], Reasoner(), critic, n_rounds=3)
    assert res.n_calls == expected_calls("thinking", 3) and len(seen) == 2
    assert res.answers == [ex["meta"]["rejected_answer"], ex["meta"]["answer"], ex["meta"]["answer"]]
    assert check(res.final_answer, ex["meta"]["answer"])  # the majority of the three
    assert critic.integrate("q", ["No", "Yes.", "yes"]) == "yes" and critic.integrate("q", ["A", "B"]) == "B"


def test_without_the_kg_section_the_thinking_is_the_reasoning_steps_alone(graph, teacher):
    """`kg_section=False` (data.kg_triples: 0): the same examples with the Knowledge Graph section left out of both
    sides' thinking; prompts, answers, meta and the Reasoning Steps are unchanged."""
    from preflexor.tasks import RelationChecker, answer_set, stated_relations
    from preflexor.thinking import split_thinking

    plain = ReasoningTeacher(graph, seed=3, kg_section=False)
    rc = RelationChecker(graph)
    for i in (0, 1, 2, 3, HELDOUT_START + 5):
        a, b = teacher.example(i), plain.example(i)
        assert (a["prompt"], a["meta"]) == (b["prompt"], b["meta"])
        for side in ("chosen", "rejected"):
            ta, tb = split_thinking(a[side]), split_thinking(b[side])
            assert ta["answer"] == tb["answer"] and "**Knowledge Graph**" in ta["thinking"]
            assert "**Knowledge Graph**" not in tb["thinking"] and tb["thinking"].startswith("**Reasoning Steps**")
            assert tb["thinking"] in ta["thinking"]  # the steps, as they were
        rels = stated_relations(split_thinking(b["chosen"])["thinking"])
        assert rels and all(rc.true(r) for r in rels)
    held = answer_set(graph, 4, kg_section=False)
    assert [r["meta"] for r in held] == [r["meta"] for r in answer_set(graph, 4)]
    assert all("**Knowledge Graph**" not in r["chosen"] for r in held)


def test_retrieval_none_leaves_the_facts_out_of_the_prompt(graph, teacher):
    """`facts=False` (data.retrieval: none, the reference's use_rag=False): the question alone, the same answers and
    thinking; the data fingerprint tells the two apart."""
    from preflexor.datagen import teacher_id

    bare = ReasoningTeacher(graph, seed=3, facts=False)
    for i in (0, 1, 2, 3):
        a, b = teacher.example(i), bare.example(i)
        assert a["prompt"].startswith("Facts:\n- ") and "Facts" not in b["prompt"]
        assert a["prompt"].endswith("\n\n" + b["prompt"]) and b["prompt"] == a["meta"]["question"]
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
    assert teacher_id(teacher) != teacher_id(bare)


def test_static_data_is_made_before_the_first_step(graph, tmp_path, monkeypatch):
    """data.refresh: false: iteration 0 generates every iteration's pairs into data/static.jsonl (the same examples
    the active loop makes one iteration at a time), and each iteration takes its slice."""
    import torch

    from preflexor import datagen
    from preflexor.config import RunConfig, load_config
    from preflexor.runtime import Runtime

    monkeypatch.setattr(datagen, "save_graph", lambda *a, **k: None)
    got = {}
    for refresh in (True, False):
        cfg = load_config(RunConfig, None, ["data.teacher=reasoning", "data.retrieval=graph", "data.kg_triples=0",
                                            "data.rejected_source=teacher_incorrect", "data.pairs_per_iteration=3",
                                            "train.iterations=2", f"data.refresh={str(refresh).lower()}"])
        src = object.__new__(datagen.PairSource)
        src.cfg, src.tok, src.model, src.stage = cfg, None, torch.nn.Linear(1, 1), 1
        src.rt, src.dir = Runtime(torch.device("cpu"), torch.float32, None), tmp_path / str(refresh) / "data"
        src.sources = (datagen.build_teacher(cfg.data, None, [], graph, None), None, [], graph, None)
        first = src.for_iteration(0)
        files = sorted(p.name for p in src.dir.iterdir())
        assert files == (["iter_000.jsonl"] if refresh else ["static.jsonl"])
        got[refresh] = [first, src.for_iteration(1)]
    assert [[r["meta"]["index"] for r in it] for it in got[False]] == [[0, 1, 2], [3, 4, 5]]
    assert got[False] == got[True]


def test_only_wrong_answers_drops_pairs_whose_rejected_answer_is_right(graph, tmp_path, monkeypatch):
    """A model-written rejected answer to a checkable question is marked `meta.rejected_correct` in the pair file;
    data.only_include_wrong_answers trains only on the pairs where it is wrong (the file keeps them all)."""
    import torch

    from preflexor import datagen
    from preflexor.config import RunConfig, load_config
    from preflexor.runtime import Runtime

    monkeypatch.setattr(datagen, "save_graph", lambda *a, **k: None)
    monkeypatch.setattr(datagen, "model_rejected", lambda model, tok, qs, *a, **k: [
        "<|thinking|>\n**Reasoning Steps**:\n\n1. a guess.\n\n<|/thinking|>\nYes\nbecause" for _ in qs])
    kept = {}
    for only in (False, True):
        cfg = load_config(RunConfig, None, ["data.teacher=reasoning", "data.retrieval=graph", "data.kg_triples=0",
                                            "data.pairs_per_iteration=16", f"data.only_include_wrong_answers={only}"])
        src = object.__new__(datagen.PairSource)
        src.cfg, src.tok, src.model, src.stage = cfg, object(), torch.nn.Linear(1, 1), 2
        src.rt, src.dir = Runtime(torch.device("cpu"), torch.float32, None), tmp_path / str(only) / "data"
        src.sources = (datagen.build_teacher(cfg.data, None, [], graph, None), None, [], graph, None)
        kept[only] = src.for_iteration(0)
        on_disk = datagen.load_pairs(src.dir / "iter_000.jsonl")
        assert [r["meta"]["rejected_correct"] for r in on_disk] == [r["meta"]["answer"] == "Yes" for r in on_disk]
    assert len(kept[False]) == 16 and 0 < len(kept[True]) < 16
    assert kept[True] == [r for r in kept[False] if r["meta"]["answer"] != "Yes"]
