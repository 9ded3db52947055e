"""Teachers write the questions, thinking sections and answers of the preference pairs (preflexor.md §2.2, §2.4).

Every teacher offers the data methods datagen.py calls, so datagen is teacher-agnostic: `question_for(chunks)`,
`thinking_sections(question, context, concepts)`, `knowledge_graph(question, context, triples)`, `answer(question,
context, thinking)`, `incorrect_answer(question)`. `HTTPTeacher` talks to any OpenAI-compatible endpoint (vLLM,
llama.cpp, Ollama, mistral.rs, OpenAI, our server.py) through `client.ChatClient`; `LocalTeacher` runs our sampler on a
checkpoint; `GroundedTeacher` uses no LLM and writes everything from the ontology corpus and the knowledge graph with
seeded templates, so its answers can be checked against the ontology. The LLM teachers' prompts are our wording with the
reference's structure: a question prompt over a context, one prompt per thinking category plus "Additional Background",
a knowledge-graph prompt in the Graph-PRefLexOR style (arXiv 2501.08120, §4.1: `[A] -[RELATION]-> [B]` lines), an answer
prompt, and an "incorrect answer" prompt for the teacher-side rejected source.
"""
from __future__ import annotations

import hashlib
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from preflexor.client import ChatClient
from preflexor.errors import UserError
from preflexor.graph import parse_triples

CATEGORIES = ["Reasoning Steps", "Relevant Materials or Concepts", "Design Principles", "Material Properties",
              "Hypothesis"]  # preflexor.md §2.2 step 4
BACKGROUND = "Additional Background"  # step 4, the RAG "background" call
KNOWLEDGE_GRAPH = "Knowledge Graph"  # Graph-PRefLexOR adds it, placed first
SECTIONS = [KNOWLEDGE_GRAPH, *CATEGORIES, BACKGROUND]
LLM_RELATIONS = ["IS-A", "RELATES-TO", "INFLUENCES"]  # the relation vocabulary Graph-PRefLexOR asks for

# -- Prompts (our wording, the reference's structure and intent) -------------------------------------------------------

SYSTEM_EXAMINER = "You are an experienced materials scientist who writes rigorous examination questions."
SYSTEM_ANALYST = "You are a careful professor who gives well-reasoned, concise explanations."
SYSTEM_EXPERT = "You are an expert in biological and bio-inspired materials."

QUESTION_PROMPT = (
    "You are preparing a written examination for domain experts. Read the context below and write ONE question "
    "about an important fact in it. An expert who has not seen the context must be able to answer it, so the "
    "question has to stand on its own: do not mention the context, a text, a study, a paper, authors or any person. "
    "Make it specific and demanding; it should probe deep expert knowledge.\n"
    "Reply with the question and nothing else.\n\nContext:\n{context}")
SECTION_PROMPT = (
    "Question: {question}\n\nContext:\n{context}\n\n"
    "Write the \"{category}\" that matter for answering the question, using the context. Be brief and reason step "
    "by step. Reply with the \"{category}\" only: no introduction, no mention of the context. If there are none, "
    "reply with an empty message.")
BACKGROUND_PROMPT = (
    "Question: {question}\n\nContext:\n{context}\n\n"
    "Give a short piece of additional background that helps with this question: relevant facts, mechanisms and "
    "insights. Do not answer the question itself, and do not mention the context.")
KG_PROMPT = (
    "Question: {question}\n\nRelations already in our knowledge graph:\n{triples}\n\n"
    "List 3 to 5 relations between the key concepts of the question, one per line, each written exactly as\n"
    "[Concept A] -[RELATION]-> [Concept B]\n"
    "with RELATION one of: {relations}. Prefer concept names from the relations above. Reply with the lines only.")
ANSWER_PROMPT = (
    "Answer the question below. Use the reasoning and the context; give a complete, accurate and well-explained "
    "answer that stands on its own (do not mention the context or the reasoning).\n\n"
    "Question: {question}\n\nReasoning:\n{thinking}\n\nContext:\n{context}")
INCORRECT_PROMPT = (
    "Write a wrong answer to the question below. It should read like a confident expert answer but be factually "
    "incorrect. Reply with the wrong answer only.\n\nQuestion: {question}")

def format_context(chunks: Sequence) -> str:
    """Concatenate chunk texts (the reference joins its random chunks with spaces; we keep one per paragraph)."""
    return "\n\n".join(c.text for c in chunks)


# -- LLM-backed teachers -----------------------------------------------------------------------------------------------

class ChatTeacher:
    """Base of the LLM teachers: `complete` is the backend; the data methods are prompts on top of it."""

    concurrency = 1  # how many examples datagen may run at once with this teacher
    name = "chat"

    def complete(self, messages: list[dict], temperature: float = 0.2, max_tokens: int = 1024) -> str:
        raise NotImplementedError

    def complete_many(self, list_of_messages: list[list[dict]], temperature: float = 0.2,
                      max_tokens: int = 1024) -> list[str]:
        return [self.complete(m, temperature, max_tokens) for m in list_of_messages]

    def _ask(self, system: str, user: str, temperature: float = 0.2, max_tokens: int = 1024) -> str:
        """One chat call; an empty reply is asked once more at a higher temperature."""
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        out = self.complete(msgs, temperature, max_tokens).strip()
        return out or self.complete(msgs, max(temperature, 0.8), max_tokens).strip()

    # the data methods datagen.py calls -----------------------------------------------------------------------------
    max_tokens = 1024

    def question_for(self, chunks: Sequence) -> str:
        q = self._ask(SYSTEM_EXAMINER, QUESTION_PROMPT.format(context=format_context(chunks)), 0.7, self.max_tokens)
        return next((line.strip() for line in q.splitlines() if line.strip()), "")  # the first non-empty line

    def thinking_sections(self, question: str, context: str, concepts: Sequence[str] = ()) -> dict[str, str]:
        """One prompt per category plus the background prompt, sent together (concurrently for HTTP)."""
        prompts = [SECTION_PROMPT.format(question=question, context=context, category=c) for c in CATEGORIES]
        prompts.append(BACKGROUND_PROMPT.format(question=question, context=context))
        msgs = [[{"role": "system", "content": SYSTEM_ANALYST}, {"role": "user", "content": p}] for p in prompts]
        outs = self.complete_many(msgs, 0.2, self.max_tokens)
        return {name: out.strip() for name, out in zip([*CATEGORIES, BACKGROUND], outs)}

    def knowledge_graph(self, question: str, context: str, triples: Sequence[tuple[str, str, str]]) -> list[tuple]:
        """(A, relation, B) triples the teacher proposes for the question; the graph's neighbourhood is the hint."""
        hint = "\n".join(f"[{a}] -[{r}]-> [{b}]" for a, r, b in triples) or "(none)"
        relations = ", ".join(dict.fromkeys([*LLM_RELATIONS, *(r.upper().replace("_", "-") for _, r, _ in triples)]))
        out = self._ask(SYSTEM_ANALYST, KG_PROMPT.format(question=question, triples=hint, relations=relations),
                        0.2, self.max_tokens)
        return parse_triples(out)

    def answer(self, question: str, context: str, thinking: str = "") -> str:
        return self._ask(SYSTEM_EXPERT, ANSWER_PROMPT.format(question=question, context=context,
                                                             thinking=thinking or "(none)"), 0.2, self.max_tokens)

    def incorrect_answer(self, question: str) -> str:
        return self._ask(SYSTEM_EXPERT, INCORRECT_PROMPT.format(question=question), 0.7, self.max_tokens)


class HTTPTeacher(ChatTeacher):
    """Any OpenAI-compatible endpoint, through `client.ChatClient`; `complete_many` sends `max_concurrency` at once."""

    name = "http"

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_concurrency: int = 4,
                 max_tokens: int = 1024):
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, backoff, max_concurrency)
        self.url, self.model, self.max_tokens = self.client.url, model, max_tokens
        self.concurrency = self.max_concurrency = self.client.max_concurrency

    retries = property(lambda self: self.client.retries)  # retried requests so far (for logs and tests)

    def complete(self, messages: list[dict], temperature: float = 0.2, max_tokens: int = 1024) -> str:
        return self.client.complete(messages, temperature, max_tokens).text

    def complete_many(self, list_of_messages: list[list[dict]], temperature: float = 0.2,
                      max_tokens: int = 1024) -> list[str]:
        if len(list_of_messages) <= 1:
            return [self.complete(m, temperature, max_tokens) for m in list_of_messages]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(list_of_messages))) as pool:
            return list(pool.map(lambda m: self.complete(m, temperature, max_tokens), list_of_messages))


class LocalTeacher(ChatTeacher):
    """A checkpoint as teacher, through our batched sampler; `complete_many` is one batched `generate` call."""

    name = "local"

    def __init__(self, model, tokenizer, top_k: int | None = 50, top_p: float | None = 0.9, seed: int = 0,
                 max_tokens: int = 256):
        self.model, self.tok = model, tokenizer
        self.top_k, self.top_p, self.seed, self.max_tokens = top_k, top_p, seed, max_tokens
        self._calls = 0
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], temperature: float = 0.2, max_tokens: int = 1024) -> str:
        return self.complete_many([messages], temperature, max_tokens)[0]

    def complete_many(self, list_of_messages: list[list[dict]], temperature: float = 0.2,
                      max_tokens: int = 1024) -> list[str]:
        from preflexor.sampler import generate

        prompts = [self.tok.encode_chat(m, add_generation_prompt=True, allow_special=True) for m in list_of_messages]
        with self._lock:  # one generation at a time; the seed advances per call so repeated prompts differ
            seed = self.seed + self._calls
            self._calls += 1
            outs = generate(self.model, prompts, max_new_tokens=max_tokens, temperature=temperature,
                            top_k=self.top_k, top_p=self.top_p, num_samples=1, stop_ids=self.tok.stop_ids,
                            seed=seed, pad_id=self.tok.pad_id)
        return [self.tok.decode(o[0], skip_special=True) for o in outs]


def stable_rng(*parts) -> random.Random:
    """A `random.Random` seeded from the parts' text (sha256), independent of PYTHONHASHSEED and call order."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# -- The grounded teacher: no LLM, everything from the corpus and the ontology -----------------------------------------

_CITATION = re.compile(r"\s*\[(?:Automatically generated definition|[A-Za-z]{1,12}(?:[:,][^\[\]]{0,20})?|\d+)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_FUNCTION_WORDS = re.compile(r"\b(function|involved in|responsible|support|protect|secret|produc|connect|transmit|"
                             r"regulat|form[s]? (?:the|a|part)|serv(?:es|ing) as)", re.I)
_COMPOSITION_WORDS = re.compile(r"\b(compos|consist|made (?:up )?of|formed (?:by|from)|contain|matrix|layer|"
                                r"arrang|organi[sz])", re.I)
_PROPERTY_WORDS = re.compile(r"\b(stiff|elastic|hard|soft|strength|strong|tough|mineral|calcif|porous|dens|flexib|"
                             r"rigid|brittle|viscous|tensile|compress|fibr|collagen|keratin|thick|thin|dimension|"
                             r"shape|size|mass|weight|charge|solub|crystal)\w*", re.I)
MAX_LISTED = 3  # parents named in one sentence
DOMAINS = {"UBERON": "anatomical structures", "CL": "cell types", "PATO": "phenotypic qualities",
           "CHEBI": "chemical entities"}


@dataclass
class Term:
    """One concept the grounded teacher can ask about: an ontology term, or a document of a plain-text corpus."""
    key: str
    label: str
    definition: str  # citations stripped
    parents: list[str]  # keys of direct parents (ontology distance 1: is_a or part_of)
    ancestors: list[str]  # keys at distance >= 2, nearest first
    synonyms: list[str]
    ontology: str
    chunk_id: str


def clean_definition(text: str) -> str:
    """Definition text without bracketed citations ("[WP]", "[Automatically generated definition]")."""
    text = " ".join(_CITATION.sub("", text).split())
    return re.sub(r"\.(\s*\.)+", ".", text).strip()


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s.strip()]


def _join(items: Sequence[str], word: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]


class GroundedTeacher:
    """The no-LLM teacher. Questions ask what a term is and how it relates to an ontology parent; answers state its
    definition (verbatim, citations stripped), parents, grandparents and siblings, so every answer can be checked
    against the ontology; the thinking sections fill the reference's six categories from the definition, hierarchy
    and retrieved context. The incorrect answer describes the term with a sibling's (or another term's) definition
    and parents: fluent, on topic, wrong. Each call draws from an RNG seeded by (seed, method, input text), so the
    output is deterministic for a seed and independent of call order.
    """

    name = "grounded"
    concurrency = 1

    def __init__(self, docs, chunks, graph=None, retriever=None, seed: int = 0, section_lines: int | None = None):
        self.graph, self.retriever, self.seed = graph, retriever, seed
        self.section_lines = section_lines  # keep at most this many lines per thinking section (CPU-sized data)
        first_chunk: dict[str, str] = {}
        for c in chunks:
            first_chunk.setdefault(c.doc_id, c.chunk_id)
        self.terms: dict[str, Term] = {}
        for d in docs:
            m = d.meta or {}
            if "term_id" in m:
                label = m.get("label") or d.title
                definition = d.text[len(label) + 2:] if d.text.startswith(label + ": ") else d.text
                anc = m.get("ancestors") or {}
                parents = [a for a, dist in anc.items() if dist == 1]
                higher = [a for a, dist in sorted(anc.items(), key=lambda x: x[1]) if dist > 1]
                term = Term(d.doc_id, label, clean_definition(definition), parents, higher, list(m.get("synonyms", [])),
                            m.get("ontology", ""), first_chunk.get(d.doc_id, f"{d.doc_id}#0"))
            else:  # a plain-text corpus: the document title is the concept, its first sentences the definition
                text = clean_definition(d.text)
                term = Term(d.doc_id, d.title or d.doc_id, " ".join(sentences(text)[:2]) or text[:300], [], [], [], "",
                            first_chunk.get(d.doc_id, f"{d.doc_id}#0"))
            if term.definition:
                self.terms[term.key] = term
        self.children: dict[str, list[str]] = {}
        for t in self.terms.values():  # keep only links inside the corpus
            t.parents = [p for p in t.parents if p in self.terms]
            t.ancestors = [a for a in t.ancestors if a in self.terms]
            for p in t.parents:
                self.children.setdefault(p, []).append(t.key)
        self._by_label = {t.label.lower(): t.key for t in self.terms.values()}
        self._questions: dict[str, tuple[str, str | None]] = {}  # question -> (focus key, parent key)
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _rng(self, *parts) -> random.Random:
        return stable_rng(self.seed, *parts)

    def siblings(self, key: str) -> list[str]:
        """Terms sharing a direct parent with `key` (sorted by key, without `key` itself)."""
        t = self.terms[key]
        return sorted({s for p in t.parents for s in self.children.get(p, []) if s != key})

    def label(self, key: str) -> str:
        return self.terms[key].label

    def gloss(self, key: str) -> str:
        """The first sentence of a term's definition."""
        return (sentences(self.terms[key].definition) or [self.terms[key].definition])[0]

    def focus_of(self, question: str) -> str | None:
        """The term a question (written by this teacher) is about; else the first (longest) label it mentions."""
        with self._lock:
            if question in self._questions:
                return self._questions[question][0]
        q = question.lower()
        hits = []  # (position, -length, key): our questions name their subject first
        for lab, k in self._by_label.items():
            m = re.search(rf"\b{re.escape(lab)}\b", q) if len(lab) > 2 else None
            if m:
                hits.append((m.start(), -len(lab), k))
        return min(hits)[2] if hits else None

    def _focus(self, question: str) -> tuple[Term, Term | None]:
        with self._lock:
            hit = self._questions.get(question)
        if hit is None:
            key = self.focus_of(question)
            if key is None:
                raise UserError(f"grounded teacher: no known concept in question {question[:80]!r}")
            parent = next((p for p in self.terms[key].parents if self.terms[p].label.lower() in question.lower()),
                          None)
            hit = (key, parent)
        return self.terms[hit[0]], (self.terms[hit[1]] if hit[1] else None)

    # -- data methods ------------------------------------------------------------------------------------------------
    def question_for(self, chunks: Sequence) -> str:
        rng = self._rng("question", *[c.chunk_id for c in chunks])
        terms = [t for t in (self.terms.get((c.meta or {}).get("term_id") or c.doc_id) for c in chunks) if t]
        if not terms:
            raise UserError(f"grounded teacher: chunks {[c.chunk_id for c in chunks]} belong to no known document")
        with_parent = [t for t in terms if t.parents]
        term = rng.choice(with_parent or terms)
        parent = self.terms[rng.choice(term.parents)] if term.parents else None
        domain = DOMAINS.get(term.ontology, "concepts")
        if parent is not None:
            q = rng.choice([
                f"What is {term.label}, and how does it relate to {parent.label}?",
                f"How would you define {term.label}, and in what sense does it fall under {parent.label}?",
                f"What distinguishes {term.label} from other members of the {parent.label} category?",
                f"Describe {term.label} and explain its place relative to {parent.label} among {domain}.",
                f"Which defining features characterise {term.label}, and how is it connected to {parent.label}?",
            ])
        else:
            q = rng.choice([f"What is {term.label}, and which concepts is it most closely related to?",
                            f"Describe the defining features of {term.label}."])
        with self._lock:
            self._questions[q] = (term.key, parent.key if parent else None)
        return q

    def thinking_sections(self, question: str, context: str, concepts: Sequence[str] = ()) -> dict[str, str]:
        term, qparent = self._focus(question)
        rng = self._rng("sections", question)
        sibs = self.siblings(term.key)
        sib_pick = rng.sample(sibs, min(3, len(sibs)))
        parents = [self.label(p) for p in term.parents[:MAX_LISTED]]
        grand = [self.label(a) for a in term.ancestors[:2]]
        defn_first = self.gloss(term.key)
        out = {}

        steps = [
            rng.choice([f"Identify the subject of the question: {term.label}",
                        f"Pin down what is being asked about: {term.label}",
                        f"Start from the concept in question, {term.label}"])
            + (f" (also known as {_join(term.synonyms[:2], 'or')})." if term.synonyms else "."),
            rng.choice(["Recall its definition: ", "State what defines it: ", "Write down its defining statement: "])
            + defn_first,
        ]
        if parents:
            steps.append(rng.choice(["Place it in the hierarchy: it falls under ", "Locate it in the ontology: its "
                                     "direct parents are ", "Find its broader categories: "]) + _join(parents)
                         + (f"; further up lie {_join(grand)}." if grand else "."))
        if sib_pick:
            steps.append(rng.choice(["Compare it with concepts that share a parent: ",
                                     "Contrast it with its closest relatives: "]) + _join(self.label(s) for s in
                                                                                          sib_pick) + ".")
        if qparent is not None:
            steps.append(f"Relate it to {qparent.label}: " + rng.choice([
                f"{term.label} is a more specific concept than {qparent.label}, so it inherits its general features.",
                f"{qparent.label} is the broader category; {term.label} narrows it down."]))
        steps.append(rng.choice(["Combine the definition, the hierarchy and the related concepts into the answer.",
                                 "Assemble the answer from the definition and the relations found above."]))
        out["Reasoning Steps"] = "\n".join(f"{k}. {s}" for k, s in enumerate(steps, 1))

        related = [term.key, *term.parents[:2], *sib_pick[:2]]
        for c in concepts:
            k = self._by_label.get(str(c).lower())
            if k is not None and k not in related and len(related) < 7:
                related.append(k)
        out["Relevant Materials or Concepts"] = "\n".join(f"- {self.label(k)}: {self.gloss(k)}" for k in related)

        principles = []
        if parents:
            principles.append(rng.choice([
                f"Hierarchical organisation: {term.label} shares the general features of {_join(parents)} and adds "
                f"its own specific ones.",
                f"Inheritance along the hierarchy: what holds for {_join(parents)} holds for {term.label}, which "
                f"then specialises it."]))
        defn_sents = sentences(term.definition)
        func = next((s for s in defn_sents if _FUNCTION_WORDS.search(s)), None)
        comp = next((s for s in defn_sents if _COMPOSITION_WORDS.search(s)), None)
        if func:
            principles.append(rng.choice(["Form follows function: ", "Structure serves function: "]) + func)
        if comp and comp != func:
            principles.append(rng.choice(["Composition and arrangement: ", "Built from its constituents: "]) + comp)
        if not principles:
            principles.append(f"Specificity: the definition of {term.label} singles it out by: {defn_first}")
        out["Design Principles"] = "\n".join(f"- {p}" for p in principles)

        props = [s for s in defn_sents if _PROPERTY_WORDS.search(s)]
        for para in context.split("\n\n"):
            for s in sentences(clean_definition(para))[:2]:
                if len(props) < 3 and s not in props and _PROPERTY_WORDS.search(s) and term.label.lower() in s.lower():
                    props.append(s)
        if props:
            out["Material Properties"] = "\n".join(f"- {p}" for p in props[:3])
        else:
            source = f"{_join(parents)}: {self.gloss(term.parents[0])}" if parents else "its definition."
            out["Material Properties"] = (f"The definition records no measurable property of {term.label}; its "
                                          f"properties follow from {source}")

        other = self.label(sib_pick[0]) if sib_pick else None
        hyp = rng.choice([
            f"If {term.label} is a specialised form of {_join(parents) or 'its category'}, it should keep that "
            f"category's defining features while differing in the respects its own definition names.",
            f"The features that set {term.label} apart are those in its definition but absent from "
            f"{_join(parents) or 'its broader category'}."])
        if other:
            hyp += f" Comparing it with {other}, which shares a parent, would show which features are specific."
        out["Hypothesis"] = hyp

        background = []
        for para in context.split("\n\n"):
            para = para.strip()
            if not para or para.startswith("Additional information") or para.startswith(term.label + ":"):
                continue
            s = sentences(clean_definition(para))
            if s and s[0] not in background:
                background.append(s[0])
        rng.shuffle(background)
        out["Additional Background"] = "\n".join(f"- {b}" for b in background[:3]) or \
            f"- {term.label} belongs to the {DOMAINS.get(term.ontology, 'concepts')} of the corpus."
        if self.section_lines:
            out = {k: "\n".join(v.split("\n")[:self.section_lines]) for k, v in out.items()}
        return out

    def knowledge_graph(self, question: str, context: str, triples: Sequence[tuple[str, str, str]]) -> list[tuple]:
        """The graph's own triples, those that touch the question's subject first (never invented ones)."""
        term, _ = self._focus(question)
        lab = term.label.lower()
        touching = [t for t in triples if lab in (str(t[0]).lower(), str(t[2]).lower())]
        return touching + [t for t in triples if t not in touching]

    def _describe(self, label: str, key: str, rng: random.Random, qparent: Term | None, exclude: str = "") -> str:
        """The answer text about `label`, built from the definition and relations of term `key`."""
        t = self.terms[key]
        parts = [rng.choice([f"{label[:1].upper() + label[1:]} can be defined as follows: {t.definition}",
                             f"By definition, {label} is described as: {t.definition}",
                             f"The accepted definition of {label} reads: {t.definition}"])]
        if t.parents:
            parents = [self.label(p) for p in t.parents[:MAX_LISTED]]
            s = rng.choice([f"In the ontology, {label} is classified directly under {_join(parents)} (as a kind "
                            f"or a part of {'it' if len(parents) == 1 else 'them'})",
                            f"Its direct parent concepts (is-a or part-of) are {_join(parents)}"])
            grand = [self.label(a) for a in t.ancestors[:2]]
            parts.append(s + (f", and further up the hierarchy lie {_join(grand)}." if grand else "."))
        if qparent is not None:
            parts.append(rng.choice([f"So {label} relates to {qparent.label} as a more specific concept; "
                                     f"{qparent.label} is the broader category, defined as: {self.gloss(qparent.key)}",
                                     f"Relative to {qparent.label}, {label} is the narrower concept; "
                                     f"{qparent.label} itself is defined as: {self.gloss(qparent.key)}"]))
        sibs = [s for s in self.siblings(key) if s != exclude]
        if sibs:
            picks = [self.label(s) for s in rng.sample(sibs, min(3, len(sibs)))]
            parts.append(rng.choice(["Closely related concepts that share a parent with it include ",
                                     "Its nearest relatives in the hierarchy are "]) + _join(picks) + ".")
        return " ".join(p if p.endswith((".", "!", "?", ")")) else p + "." for p in parts)

    def answer(self, question: str, context: str = "", thinking: str = "") -> str:
        term, qparent = self._focus(question)
        return self._describe(term.label, term.key, self._rng("answer", question), qparent)

    def decoy_of(self, question: str) -> str:
        """The term whose definition the incorrect answer borrows: a sibling, else a term of the same ontology."""
        term, _ = self._focus(question)
        rng = self._rng("incorrect", question)
        others = [s for s in self.siblings(term.key) if self.terms[s].definition != term.definition]
        if not others:
            others = sorted([k for k, t in self.terms.items() if k != term.key and t.ontology == term.ontology
                             and t.definition != term.definition] or [k for k in self.terms if k != term.key])
        return rng.choice(others)

    def incorrect_answer(self, question: str) -> str:
        term, _ = self._focus(question)
        decoy = self.decoy_of(question)
        return self._describe(term.label, decoy, self._rng("incorrect-text", question), None, exclude=term.key)
