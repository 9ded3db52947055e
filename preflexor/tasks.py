"""Reasoning tasks with checkable answers, computed from the knowledge graph's is-a hierarchy (no LLM).

Each example gives the model facts (true `X is a kind of Y` relations of the graph: the ones the question needs,
shuffled among distractors, as retrieval would) and asks a question whose short answer follows from them in a few
steps. The chosen thinking writes the computation out: the relations it uses (Knowledge Graph section, every one true
in the graph) and numbered steps; the answer is exact ("Yes", "No", a concept's label, a number) and `check` scores
it. The rejected thinking follows a wrong path: one step states a relation that is not in the graph (its index is
`meta.error_step`) and the answer follows that step. Kinds:
- isa: "Is X a kind of Y?" over 1-4 hops, or a Y the facts never reach (then also false in the whole graph);
- common_ancestor: the most specific concept both X and Y are kinds of (the fewest steps from both, then the name);
- more_specific: which of X and Y (one a kind of the other) is the more specific;
- hops: how many is-a steps lead from X up to Y (the shortest way).
Held-out questions (example index >= HELDOUT_START) are about leaf concepts chosen by a fixed hash (the same for
every seed and run); training examples never mention them, in questions, facts or distractors.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import deque

from preflexor.errors import UserError
from preflexor.graph import IS_A
from preflexor.thinking import TRIGGER, assemble_thinking

KINDS = ("isa", "common_ancestor", "more_specific", "hops")
HELDOUT_START = 1_000_000  # example indices from here on are held out (datagen.PairSource's held-out range)
FACT = "{} is a kind of {}."
MAX_RELATIONS = 8  # at most this many relations in a chosen thinking (it stays under ~350 tokens)
_NORM = re.compile(r"[^\w]+")


def _hash01(*parts) -> float:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


class Hierarchy:
    """The is-a DAG of a `KnowledgeGraph`: parents, children, ancestors by shortest distance."""

    def __init__(self, graph):
        self.graph = graph
        self.parents: dict[str, list[str]] = {}
        self.children: dict[str, list[str]] = {}
        for u, v, rel in graph.g.edges(keys=True):
            if rel == IS_A and u != v:
                self.parents.setdefault(u, []).append(v)
                self.children.setdefault(v, []).append(u)
        for d in (self.parents, self.children):
            for k in d:
                d[k] = sorted(set(d[k]))

    def label(self, n: str) -> str:
        return self.graph.label(n)

    def ancestors(self, n: str, edges: set[tuple[str, str]] | None = None) -> dict[str, int]:
        """{ancestor: fewest is-a steps} over the whole graph, or over the given (child, parent) `edges` only."""
        up = self.parents if edges is None else _index(edges)
        dist, queue = {}, deque([(n, 0)])
        while queue:
            x, d = queue.popleft()
            for p in up.get(x, ()):
                if p not in dist and p != n:
                    dist[p] = d + 1
                    queue.append((p, d + 1))
        return dist

    def chain(self, x: str, y: str) -> list[str]:
        """A shortest upward path x -> ... -> y (x first), the first parent in name order at ties."""
        prev, queue = {x: None}, deque([x])
        while queue:
            n = queue.popleft()
            if n == y:
                break
            for p in self.parents.get(n, ()):
                if p not in prev:
                    prev[p] = n
                    queue.append(p)
        if y not in prev:
            raise ValueError(f"{y} is not an ancestor of {x}")
        path, n = [], y
        while n is not None:
            path.append(n)
            n = prev[n]
        return path[::-1]


def _index(edges) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c, p in edges:
        out.setdefault(c, []).append(p)
    return out


def lowest_common_ancestor(h: Hierarchy, x: str, y: str, edges=None) -> str | None:
    """The common ancestor with the fewest steps from x and y together (then from the farther one, then by name)."""
    ax, ay = h.ancestors(x, edges), h.ancestors(y, edges)
    common = [a for a in ax if a in ay]
    if not common:
        return None
    return min(common, key=lambda a: (ax[a] + ay[a], max(ax[a], ay[a]), h.label(a)))


def check(answer: str, gold: str) -> bool:
    """Exact-answer check: the answer's first line, or its first clause ("No, because ..." -> "No"), equals the gold
    answer up to case, spaces and punctuation."""
    first = (answer or "").strip().splitlines()[0] if (answer or "").strip() else ""
    norm = lambda s: _NORM.sub(" ", s).strip().lower()  # noqa: E731
    return norm(gold) in (norm(first), norm(re.split(r"[.,;:!?]", first, maxsplit=1)[0]))


class ReasoningTeacher:
    """Writes whole examples (`example(i)`): prompt with facts and question, chosen thinking + answer, a wrong-path
    rejected response, and meta (task kind, gold answer, the stated relations, the error step). Deterministic for a
    seed; the held-out concept set does not depend on the seed."""

    name = "reasoning"
    concurrency = 1

    def __init__(self, graph, seed: int = 0, heldout_fraction: float = 0.1, distractors: int = 4,
                 kg_section: bool = True, facts: bool = True):
        self.h, self.seed, self.n_distract, self.kg_section = Hierarchy(graph), seed, distractors, kg_section
        self.facts = facts  # the facts in the prompt (retrieval on); False: the question alone (the model's memory)
        with_parent = sorted(self.h.parents)
        self.heldout = {n for n in with_parent if n not in self.h.children and _hash01("heldout", n) < heldout_fraction}
        self.train = [n for n in with_parent if n not in self.heldout]
        if not self.heldout or len(self.train) < 10:
            raise UserError("teacher 'reasoning' needs a knowledge graph with an is-a hierarchy (the ontology corpus)")

    # -- the pieces of one task -----------------------------------------------------------------------------------
    def _closure(self, x: str, depth: int) -> list[tuple[str, str]]:
        """Every is-a edge on x's way up, `depth` steps deep: with them the facts decide every question about x."""
        out, frontier = [], [x]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for p in self.h.parents.get(n, ()):
                    if (n, p) not in out:
                        out.append((n, p))
                        nxt.append(p)
            frontier = nxt
        return out

    def _distractors(self, rng: random.Random, near: list[str], exclude: set, held: bool,
                     keep_out: set) -> list[tuple[str, str]]:
        """True edges near the question's concepts (siblings' and cousins' own parents) that it does not need; none
        starts at a question concept or one of its ancestors, so the facts lead from them exactly where `needed`
        does."""
        pool = []
        for n in near:
            for p in self.h.parents.get(n, ()):
                for s in self.h.children.get(p, ()):
                    for q in self.h.parents.get(s, ()):
                        if s not in keep_out and (held or s not in self.heldout):
                            pool.append((s, q))
        pool = sorted(set(e for e in pool if e not in exclude))
        rng.shuffle(pool)
        return pool[:self.n_distract]

    def _subject(self, rng: random.Random, held: bool) -> str:
        return rng.choice(sorted(self.heldout) if held else self.train)

    def _fact_line(self, e) -> str:
        return FACT.format(self.h.label(e[0]), self.h.label(e[1]))

    def _steps(self, path: list[str]) -> list[str]:
        return [FACT.format(self.h.label(a), self.h.label(b)) for a, b in zip(path, path[1:])]

    def _sibling(self, rng, child: str, parent: str, avoid: dict, held: bool) -> str | None:
        """Another child of `parent` that `child` is not a kind of: taking it for a parent is a false step."""
        alt = sorted(s for s in self.h.children.get(parent, ()) if s != child and s not in avoid
                     and s not in self.h.ancestors(child) and child not in self.h.ancestors(s)
                     and (held or s not in self.heldout))
        return rng.choice(alt) if alt else None

    def _build(self, kind: str, rng: random.Random, held: bool) -> dict | None:
        """One task of `kind` about a subject drawn from the train or held-out pool, or None when the draw does not
        make one (the caller draws again). The rejected side's false relation is `bad`, stated at `error_step`."""
        h, L = self.h, self.h.label
        x = self._subject(rng, held)
        up = h.ancestors(x)
        if kind == "common_ancestor":
            pool = sorted(n for n in (self.heldout if held else self.train) if n != x and n not in up
                          and x not in h.ancestors(n))
            y = rng.choice(pool)
            ax, ay = up, h.ancestors(y)
            lca = lowest_common_ancestor(h, x, y)
            if lca is None or max(ax[lca], ay[lca]) > 4:
                return None
            px, py = h.chain(x, lca), h.chain(y, lca)
            needed = list(dict.fromkeys(list(zip(px, px[1:])) + list(zip(py, py[1:]))))
            if lowest_common_ancestor(h, x, y, set(needed)) != lca:
                return None
            relations = list(zip(px, px[1:])) + list(zip(py, py[1:]))
            steps = self._steps(px) + self._steps(py) + [
                f"{L(lca)} is reached from both, {ax[lca]} and {ay[lca]} steps up; no concept closer to both is."]
            question, gold = f"What is the most specific concept that both {L(x)} and {L(y)} are kinds of?", L(lca)
            z = self._sibling(rng, y, py[1], ay, held) if len(py) > 1 else None  # y's path leaves for a sibling
            if z is None or z in ax or z == x:
                return None
            bad = (y, z)
            wrong_rel = list(zip(px, px[1:])) + [bad]
            wrong_steps = self._steps(px) + [FACT.format(L(y), L(z)), f"So both are related through {L(z)}."]
            error_step, wrong = len(px), L(z)
        else:
            d = rng.randint(1, 4)
            targets = sorted(a for a, k in up.items() if k == d)
            if not targets:
                return None
            y = rng.choice(targets)
            path = h.chain(x, y)
            needed = list(zip(path, path[1:]))  # the facts' shortest way up is the graph's: the path is in them
            k = rng.randrange(d)  # the step the rejected thinking gets wrong
            z = self._sibling(rng, path[k], path[k + 1], up, held)  # a sibling taken for a parent
            if kind == "isa" and z is not None:  # for "Yes": a wrong turn into a branch that does not lead to y
                near = [n for q in h.parents.get(path[k + 1], ()) for n in h.children.get(q, ())]
                turns = sorted(n for n in near if n not in up and n != x and y not in h.ancestors(n)
                               and (held or n not in self.heldout))
                z = rng.choice(turns) if turns else None
            if z is None:
                return None
            relations, steps = list(zip(path, path[1:])), self._steps(path)
            bad, error_step = (path[k], z), k + 1
            wrong_rel = relations[:k] + [bad]
            wrong_steps = self._steps(path[:k + 1]) + [FACT.format(L(path[k]), L(z))]
            if kind == "isa" and rng.random() < 0.5:  # a target neither the facts nor the graph reach
                others = sorted(a for a in h.children if a not in up and a != x and a not in self.heldout)
                y = rng.choice(others)
                needed = self._closure(x, min(d, 2))
                if len(needed) > MAX_RELATIONS - 2:
                    return None  # a short thinking: the evaluation's generation budget must fit it
                reached = sorted(h.ancestors(x, set(needed)), key=lambda a: (up[a], L(a)))
                relations = list(needed)
                steps = [self._fact_line(e) for e in needed] + [
                    f"Up from {L(x)} the facts reach {', '.join(L(a) for a in reached)}; {L(y)} is not among them."]
                bad, error_step = (path[k], y), k + 1  # the wrong path: one false step straight to y
                wrong_rel = list(zip(path[:k], path[1:k + 1])) + [bad]
                wrong_steps = self._steps(path[:k + 1]) + [FACT.format(L(path[k]), L(y)),
                                                            f"So {L(x)} is a kind of {L(y)}."]
                question, gold, wrong = f"Is {L(x)} a kind of {L(y)}?", "No", "Yes"
            elif kind == "isa":
                question, gold, wrong = f"Is {L(x)} a kind of {L(y)}?", "Yes", "No"
                steps.append(f"So {L(x)} is a kind of {L(y)}.")
                wrong_steps.append(f"{L(z)} does not lead up to {L(y)}, so {L(x)} is not a kind of {L(y)}.")
            elif kind == "hops":
                question, gold, wrong = f"How many is-a steps lead from {L(x)} up to {L(y)}?", str(d), str(d + 1)
                steps.append(f"That is {d} step{'s' * (d > 1)} from {L(x)} to {L(y)}.")
                wrong_steps.append(f"{L(z)} is a kind of {L(path[k + 1])}.")
                wrong_steps += self._steps(path[k + 1:]) + [f"That is {d + 1} steps from {L(x)} to {L(y)}."]
                wrong_rel.append((z, path[k + 1]))
                wrong_rel += list(zip(path[k + 1:], path[k + 2:]))
            else:  # more_specific: the rejected side reverses one relation
                a, b = (x, y) if rng.random() < 0.5 else (y, x)
                question, gold, wrong = f"Which is more specific, {L(a)} or {L(b)}?", L(x), L(y)
                steps.append(f"So {L(x)} is a kind of {L(y)}: {L(x)} is the more specific.")
                bad, error_step = (y, x), 1
                wrong_rel, wrong_steps = [bad], [FACT.format(L(y), L(x)), f"So {L(y)} is the more specific."]
        if bad[1] in h.ancestors(bad[0]):
            return None  # the wrong step must state a relation the graph does not have
        concepts = [x, y]
        near = concepts + [p for n in concepts for p in h.parents.get(n, ())]
        keep_out = {x, y, *up, *h.ancestors(y)}
        facts = list(dict.fromkeys([*needed, *self._distractors(rng, near, set(needed), held, keep_out)]))
        rng.shuffle(facts)
        if not held and any(n in self.heldout for e in facts for n in e):
            return None
        return {"kind": kind, "question": question, "gold": gold, "facts": facts, "steps": steps,
                "relations": relations, "wrong": wrong, "wrong_steps": wrong_steps, "wrong_relations": wrong_rel,
                "bad": bad, "error_step": error_step, "concepts": concepts}

    # -- the record -------------------------------------------------------------------------------------------------
    def example(self, index: int) -> dict:
        """{"prompt", "chosen", "rejected", "meta"} of example `index` (held out when index >= HELDOUT_START)."""
        held = index >= HELDOUT_START
        kind = KINDS[index % len(KINDS)]
        rng = random.Random(_hash01(self.seed, "task", index))
        for _ in range(200):
            t = self._build(kind, rng, held)
            if t is not None:
                break
        else:
            raise UserError(f"teacher 'reasoning': no {kind} task found for example {index}")
        L = self.h.label
        prompt = ("Facts:\n" + "\n".join(f"- {self._fact_line(e)}" for e in t["facts"]) + "\n\n"
                  if self.facts else "") + t["question"]
        kg = "\n".join(f"[{L(a)}] -[is_a]-> [{L(b)}]" for a, b in t["relations"])
        steps = "\n".join(f"{k}. {s}" for k, s in enumerate(t["steps"], 1))
        wrong_kg = "\n".join(f"[{L(a)}] -[is_a]-> [{L(b)}]" for a, b in t["wrong_relations"])
        wrong_steps = "\n".join(f"{k}. {s}" for k, s in enumerate(t["wrong_steps"], 1))
        def thinking(graph_lines: str, step_lines: str) -> str:
            kg_part = {"Knowledge Graph": graph_lines} if self.kg_section else {}
            return assemble_thinking({**kg_part, "Reasoning Steps": step_lines})

        chosen = thinking(kg, steps) + "\n" + t["gold"]
        rejected = thinking(wrong_kg, wrong_steps) + "\n" + t["wrong"]
        meta = {"index": index, "seed": self.seed, "teacher": self.name, "task": t["kind"], "question": t["question"],
                "answer": t["gold"], "rejected_answer": t["wrong"], "heldout": held, "concepts": t["concepts"],
                "facts": [list(e) for e in t["facts"]], "relations": [list(e) for e in t["relations"]],
                "error_step": t["error_step"], "false_relation": list(t["bad"]), "focus": t["concepts"][0]}
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


EVAL_SEED = 0  # the evaluation set's seed: the same questions for every run, seed and ablation cell


def answer_set(graph, n: int, kg_section: bool = True) -> list[dict]:
    """The fixed held-out evaluation set: `n` examples about held-out concepts (never in training), written with
    EVAL_SEED whatever the run's seed, each with its gold answer in meta; prompts carry the thinking trigger as the
    training prompts do (meta.question is the prompt without it). `kg_section` lays out the chosen and decoy
    thinking (the probe pre-fills them) as the run's training data; questions and answers do not depend on it."""
    teacher, out = ReasoningTeacher(graph, seed=EVAL_SEED, kg_section=kg_section), []
    for i in range(n):
        ex = teacher.example(HELDOUT_START + i)
        ex["meta"]["question"], ex["prompt"] = ex["prompt"], ex["prompt"] + TRIGGER
        out.append(ex)
    return out


# -- Checking stated relations against the graph (thinking factuality, the grounded critic) ---------------------------
_KG_LINE = re.compile(r"^\s*\[(.+?)\]\s*-\[is_a\]->\s*\[(.+?)\]\s*$")
_STEP = re.compile(r"^\s*(?:\d+\.\s*)?(?:So\s+)?(.+?) is (not )?a kind of ([^:;]+?)\.?\s*(?:[:;].*)?$", re.IGNORECASE)


def stated_relations(thinking: str) -> list[dict]:
    """The is-a statements of a thinking block, in order: Knowledge Graph lines `[a] -[is_a]-> [b]` and step lines
    `[k.] [So] a is [not] a kind of b.`, as {"line", "child", "parent", "negated"} (line = index in the block)."""
    out = []
    for i, line in enumerate((thinking or "").splitlines()):
        m = _KG_LINE.match(line)
        if m:
            out.append({"line": i, "child": m[1].strip(), "parent": m[2].strip(), "negated": False})
            continue
        m = _STEP.match(line)
        if m and ";" not in m[1]:  # "..., so X is a kind of Y." states X is a kind of Y
            child = re.split(r",\s+so\s+", m[1], flags=re.IGNORECASE)[-1]
            out.append({"line": i, "child": child.strip(), "parent": m[3].strip(), "negated": bool(m[2])})
    return out


class RelationChecker:
    """Is a stated `child is (not) a kind of parent` true in the graph? Labels are matched up to case and spaces; an
    unknown concept makes the statement false (the graph does not support it)."""

    def __init__(self, graph):
        self.h = graph if isinstance(graph, Hierarchy) else Hierarchy(graph)
        self.nodes: dict[str, list[str]] = {}
        for n in set(self.h.parents) | set(self.h.children):
            self.nodes.setdefault(self._key(self.h.label(n)), []).append(n)

    @staticmethod
    def _key(label: str) -> str:
        return " ".join(label.lower().split())

    def find(self, label: str) -> list[str]:
        return self.nodes.get(self._key(label), [])

    def holds(self, child: str, parent: str) -> bool | None:
        """True/False for a known pair of labels (is-a over any number of steps), None when a label is unknown."""
        cs, ps = self.find(child), self.find(parent)
        if not cs or not ps:
            return None
        return any(p in self.h.ancestors(c) for c in cs for p in ps)

    def true(self, rel: dict) -> bool:
        held = self.holds(rel["child"], rel["parent"])
        return held is not None and held != rel["negated"]

    def factuality(self, thinking: str) -> tuple[int, int]:
        """(true, stated) is-a statements of a thinking block."""
        rels = stated_relations(thinking)
        return sum(self.true(r) for r in rels), len(rels)

    def parents(self, child: str) -> list[str]:
        return sorted({self.h.label(p) for c in self.find(child) for p in self.h.parents.get(c, ())})
