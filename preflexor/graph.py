"""A knowledge graph over the corpus: concept nodes, typed edges, and the chunk ids every node and edge came from.

PRefLexOR's thinking sections draw on a knowledge graph built around the question (arXiv 2410.12375, §2; the
Graph-PRefLexOR follow-up writes it as "[A] -[RELATION]-> [B]" lines). A networkx MultiDiGraph, one edge per
(src, dst, relation): `is_a` from the ontology's distance-1 ancestors (transitive ones left out); `co_occurs` between
concepts mentioned in the same chunks, weighted by PMI(a, b) = log(n_ab * N / (n_a * n_b)) over N chunks and kept
when PMI > 0 and n_ab >= min_count; and LLM-extracted triples with the relation normalised (IS-A -> is_a).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import networkx as nx

from preflexor.corpus import Chunk, Document
from preflexor.utils import atomic_write, atomic_write_text, save_png

IS_A = "is_a"
CO_OCCURS = "co_occurs"
_WORD = re.compile(r"[^\W_]+")  # letters and digits; hyphens, underscores and punctuation separate words
_TRIPLE = re.compile(r"\[([^\[\]]+)\]\s*-\s*\[([^\[\]]+)\]\s*->\s*\[([^\[\]]+)\]")
_MIN_PHRASE_CHARS = 3


def normalize_phrase(text: str) -> str:
    """Lowercased words joined by single spaces: the key concept matching compares ("T-cell" == "t cell")."""
    return " ".join(_WORD.findall(text.lower()))


def normalize_relation(relation: str) -> str:
    """"IS-A" -> "is_a", "Relates To" -> "relates_to": lowercase words joined by underscores."""
    return "_".join(_WORD.findall(relation.lower()))


def parse_triples(text: str) -> list[tuple[str, str, str]]:
    """(source, relation, target) from lines holding "[A] -[RELATION]-> [B]" (bullets around it allowed), labels
    stripped and relations normalised; a triple with an empty part or the same concept on both sides is dropped."""
    out = []
    for line in text.splitlines():
        m = _TRIPLE.search(line)
        if not m:
            continue
        a, rel, b = m.group(1).strip(), normalize_relation(m.group(2)), m.group(3).strip()
        if normalize_phrase(a) and normalize_phrase(b) and rel and normalize_phrase(a) != normalize_phrase(b):
            out.append((a, rel, b))
    return out


def format_triples(triples: Iterable[tuple[str, str, str]]) -> str:
    """Lines "[bone] -[is_a]-> [skeletal tissue]": the Knowledge Graph thinking section (`parse_triples` reads it
    back; square brackets inside labels become parentheses so every line stays parseable)."""
    clean = lambda s: s.replace("[", "(").replace("]", ")")  # noqa: E731
    return "\n".join(f"[{clean(a)}] -[{rel}]-> [{clean(b)}]" for a, rel, b in triples)


class KnowledgeGraph:
    """Concept graph with provenance. Nodes: id -> {label, synonyms, chunk_ids, origin, ontology} ("origin", not
    "source", which node-link JSON uses for edge ends); edges (key = relation): {relation, weight, count, chunk_ids,
    origin}. `chunk_ids` are the chunks a concept was found in (or its defining chunk) or an edge was read from.
    `co_occurs` edges are stored once, smaller to larger node id, and read both ways. Grow it from one thread."""

    def __init__(self, graph: nx.MultiDiGraph | None = None):
        self.g = graph if graph is not None else nx.MultiDiGraph()
        self.g.graph.setdefault("min_count", 2)
        self.g.graph.setdefault("seen_chunk_ids", [])
        self._index: dict[str, list[str]] | None = None
        self._max_words = 1
        self._undirected: nx.Graph | None = None

    # -----------------------------------------------------------------------------------------------------------
    # building

    def _changed(self, concepts: bool = False) -> None:
        self._undirected = None
        if concepts:
            self._index = None

    def add_concept(self, node_id: str, label: str, synonyms: Sequence[str] = (), chunk_ids: Sequence[str] = (),
                    origin: str = "ontology", ontology: str = "") -> str:
        """Add a concept node (or merge synonyms and chunk ids into an existing one); returns its id."""
        if node_id in self.g:
            data = self.g.nodes[node_id]
            data["synonyms"] = _merged(data["synonyms"], synonyms)
            data["chunk_ids"] = _merged(data["chunk_ids"], chunk_ids)
        else:
            self.g.add_node(node_id, label=label, synonyms=_merged([], synonyms), chunk_ids=_merged([], chunk_ids),
                            origin=origin, ontology=ontology)
        self._changed(concepts=True)
        return node_id

    def add_edge(self, src: str, relation: str, dst: str, chunk_ids: Sequence[str] = (), weight: float = 1.0,
                 origin: str = "") -> None:
        """Add a typed edge between existing nodes, or merge provenance into it (count += 1) if present."""
        if src not in self.g or dst not in self.g:
            raise KeyError(f"edge {src!r} -[{relation}]-> {dst!r}: unknown node")
        if relation == CO_OCCURS and dst < src:
            src, dst = dst, src
        if self.g.has_edge(src, dst, key=relation):
            data = self.g.edges[src, dst, relation]
            data["chunk_ids"] = _merged(data["chunk_ids"], chunk_ids)
            data["count"] += 1
        else:
            self.g.add_edge(src, dst, key=relation, relation=relation, weight=float(weight), count=1,
                            chunk_ids=_merged([], chunk_ids), origin=origin)
        self._changed()

    @classmethod
    def from_corpus(cls, docs: Sequence[Document], chunks: Sequence[Chunk],
                    concept_docs: Sequence[Document] = (), min_count: int = 2) -> "KnowledgeGraph":
        """Concepts from every document with `meta["term_id"]` (in `docs` or the extra `concept_docs`, e.g. the
        ontology used to annotate a folder of papers), `is_a` edges from distance-1 ancestors, then mentions and
        PMI co-occurrence over `chunks`."""
        kg = cls()
        kg.grow(chunks, [*docs, *concept_docs], int(min_count))
        return kg

    def _add_ontology_docs(self, docs: Sequence[Document], chunk_ids_of: dict[str, list[str]]) -> None:
        terms = [d for d in docs if d.meta.get("term_id")]
        for d in terms:
            self.add_concept(d.meta["term_id"], d.meta.get("label") or d.title, d.meta.get("synonyms", []),
                             chunk_ids_of.get(d.doc_id, []), "ontology", d.meta.get("ontology", ""))
        for d in terms:
            for parent, distance in d.meta.get("ancestors", {}).items():
                if distance == 1 and parent in self.g:
                    self.add_edge(d.meta["term_id"], IS_A, parent, chunk_ids_of.get(d.doc_id, []), origin="ontology")

    def grow(self, chunks: Sequence[Chunk] = (), docs: Sequence[Document] = (), min_count: int | None = None) -> None:
        """Add new ontology docs as concepts, record concept mentions in chunks not seen before, and recompute the
        `co_occurs` edges over all chunks seen so far (counts are kept in the nodes' chunk_ids, so this works on a
        graph loaded from GraphML/JSON too)."""
        if docs:
            chunk_ids_of = defaultdict(list)
            for c in chunks:
                chunk_ids_of[c.doc_id].append(c.chunk_id)
            self._add_ontology_docs(docs, chunk_ids_of)
        if min_count is not None:
            self.g.graph["min_count"] = int(min_count)
        seen = set(self.g.graph["seen_chunk_ids"])
        new = [c for c in chunks if c.chunk_id not in seen]
        for c in new:
            for node in self.find_concepts(c.text, max_n=None):
                self.g.nodes[node]["chunk_ids"] = _merged(self.g.nodes[node]["chunk_ids"], [c.chunk_id])
        self.g.graph["seen_chunk_ids"] = self.g.graph["seen_chunk_ids"] + [c.chunk_id for c in new]
        self._recompute_cooccurrence()

    def _recompute_cooccurrence(self) -> None:
        seen = set(self.g.graph["seen_chunk_ids"])
        nodes_in = defaultdict(list)  # chunk id -> concepts it mentions
        for node, cids in self.g.nodes(data="chunk_ids"):
            for cid in cids:
                if cid in seen:
                    nodes_in[cid].append(node)
        n_a, pair_chunks = Counter(), defaultdict(list)
        for cid in sorted(nodes_in):
            found = sorted(set(nodes_in[cid]))
            n_a.update(found)
            for a, b in itertools.combinations(found, 2):
                pair_chunks[a, b].append(cid)
        self.g.remove_edges_from([(u, v, k) for u, v, k in self.g.edges(keys=True) if k == CO_OCCURS])
        for (a, b), cids in pair_chunks.items():
            if len(cids) < self.g.graph["min_count"]:
                continue
            pmi = math.log(len(cids) * len(seen) / (n_a[a] * n_a[b]))
            if pmi > 0:
                self.g.add_edge(a, b, key=CO_OCCURS, relation=CO_OCCURS, weight=pmi, count=len(cids),
                                chunk_ids=cids, origin="cooccurrence")
        self._changed()

    def add_triples(self, text: str, chunk_ids: Sequence[str] = (), origin: str = "llm") -> list[tuple[str, str, str]]:
        """Add the "[A] -[RELATION]-> [B]" lines of `text` as edges from `chunk_ids`; returns the (src_id, relation,
        dst_id) edges added. A and B resolve by label/synonym; unknown ones become new nodes "concept:<words>"."""
        added = []
        for a, rel, b in parse_triples(text):
            src, dst = self._resolve_or_create(a, chunk_ids, origin), self._resolve_or_create(b, chunk_ids, origin)
            if src != dst:
                self.add_edge(src, rel, dst, chunk_ids, origin=origin)
                added.append((src, rel, dst))
        return added

    def _resolve_or_create(self, name: str, chunk_ids: Sequence[str], origin: str) -> str:
        node = self.resolve(name)
        if node is None:
            return self.add_concept("concept:" + normalize_phrase(name), name.strip(), (), chunk_ids, origin)
        self.g.nodes[node]["chunk_ids"] = _merged(self.g.nodes[node]["chunk_ids"], chunk_ids)
        return node

    # -----------------------------------------------------------------------------------------------------------
    # queries

    def _phrase_index(self) -> dict[str, list[str]]:
        """normalised label/synonym -> node ids: labels, then synonyms, then "X" for a label "X tissue"; then by id."""
        if self._index is None:
            ranked = defaultdict(list)
            for node, data in self.g.nodes(data=True):
                phrases = [(0, data["label"])] + [(1, s) for s in data["synonyms"]]
                if data["label"].lower().endswith(" tissue"):  # "bone tissue" is what "bone" means in a question
                    phrases.append((2, data["label"][: -len(" tissue")]))
                for rank, phrase in phrases:
                    key = normalize_phrase(phrase)
                    if key:
                        ranked[key].append((rank, node))
            self._index = {k: [n for _, n in sorted(set(v))] for k, v in ranked.items()}
            self._max_words = max((k.count(" ") + 1 for k in self._index), default=1)
        return self._index

    def find_concepts(self, text: str, max_n: int | None = 10) -> list[str]:
        """Concept ids mentioned in `text` (whole words, case-insensitive, plural "s" allowed), in order of first
        mention, longest match first; phrases under 3 characters or all digits only resolve by `resolve`."""
        index = self._phrase_index()
        words = [w.lower() for w in _WORD.findall(text)]
        found: dict[str, None] = {}
        i = 0
        while i < len(words) and (max_n is None or len(found) < max_n):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                phrase = " ".join(words[i:i + n])
                if len(phrase) < _MIN_PHRASE_CHARS or phrase.isdigit():  # "a", "T", "12" are no mentions
                    continue
                nodes = index.get(phrase) or (index.get(phrase[:-1]) if phrase.endswith("s") else None)  # plurals
                if nodes:
                    found.setdefault(nodes[0])
                    i += n
                    break
            else:
                i += 1
        return list(found)

    def resolve(self, name: str) -> str | None:
        """A node id given a node id, label or synonym (case-insensitive); None when unknown."""
        nodes = self._candidates(name)
        return nodes[0] if nodes else None

    def _candidates(self, name: str) -> list[str]:
        return [name] if name in self.g else self._phrase_index().get(normalize_phrase(name), [])

    def label(self, node: str) -> str:
        return self.g.nodes[node]["label"]

    def has_edge(self, a_label: str, relation: str, b_label: str) -> bool:
        """Whether some concept named `a_label` has a `relation` edge to one named `b_label` (labels, synonyms or
        ids; co_occurs in either direction)."""
        rel = normalize_relation(relation)
        for a in self._candidates(a_label):
            for b in self._candidates(b_label):
                if self.g.has_edge(a, b, key=rel) or (rel == CO_OCCURS and self.g.has_edge(b, a, key=rel)):
                    return True
        return False

    def _edge_rank(self, node: str, u: str, v: str, data: dict) -> tuple:
        # parents first, then extracted relations, then the strongest co-occurrences, then children
        rel = data["relation"]
        group = 0 if (rel == IS_A and u == node) else 3 if rel == IS_A else 2 if rel == CO_OCCURS else 1
        return group, -data["weight"], self.label(u), rel, self.label(v)

    def neighbourhood_edges(self, node: str, hops: int = 1, max_edges: int = 20) -> list[tuple[str, str, str]]:
        """(src_id, relation, dst_id) edges within `hops` of `node`, breadth first, at most `max_edges`."""
        start = self.resolve(node)
        if start is None:
            return []
        out, seen_edges, seen_nodes, frontier = [], set(), {start}, [start]
        for _ in range(hops):
            cand = []
            for n in frontier:
                for u, v, key, data in itertools.chain(self.g.out_edges(n, keys=True, data=True),
                                                       self.g.in_edges(n, keys=True, data=True)):
                    if (u, v, key) not in seen_edges:
                        seen_edges.add((u, v, key))
                        cand.append((self._edge_rank(n, u, v, data), (u, key, v)))
            nxt = []
            for _, (u, key, v) in sorted(cand):
                if len(out) >= max_edges:
                    return out
                out.append((u, key, v))
                for w in (u, v):
                    if w not in seen_nodes:
                        seen_nodes.add(w)
                        nxt.append(w)
            frontier = nxt
        return out

    def neighbourhood(self, node: str, hops: int = 1, max_edges: int = 20) -> list[tuple[str, str, str]]:
        """(src_label, relation, dst_label) triples around `node` (an id, label or synonym); [] if unknown."""
        return [(self.label(u), r, self.label(v)) for u, r, v in self.neighbourhood_edges(node, hops, max_edges)]

    def undirected(self) -> nx.Graph:
        if self._undirected is None:
            self._undirected = nx.Graph(self.g.to_undirected(as_view=True))
        return self._undirected

    def paths(self, a: str, b: str, max_len: int = 4, max_paths: int = 5) -> list[list[str]]:
        """Up to `max_paths` shortest simple paths (node id lists) of at most `max_len` edges, ignoring direction."""
        src, dst = self.resolve(a), self.resolve(b)
        if src is None or dst is None or src == dst:
            return []
        out = []
        try:
            for path in nx.shortest_simple_paths(self.undirected(), src, dst):
                if len(path) - 1 > max_len or len(out) >= max_paths:
                    break
                out.append(path)
        except nx.NetworkXNoPath:
            pass
        return out

    def path_triples(self, path: Sequence[str]) -> list[tuple[str, str, str]]:
        """A node path as (src_label, relation, dst_label) triples in each edge's own direction."""
        out = []
        for u, v in zip(path, path[1:]):
            edges = [(x, k, y) for x, y in ((u, v), (v, u)) for k in (self.g.get_edge_data(x, y) or {})]
            x, k, y = min(edges, key=lambda e: (e[1] == CO_OCCURS, e[1], e[0] != u))
            out.append((self.label(x), k, self.label(y)))
        return out

    def bridging_concepts(self, a: str, b: str, k: int = 5) -> list[str]:
        """Concepts linking `a` and `b`: common neighbours (most specific, i.e. lowest degree, first), then the
        inner nodes of short paths."""
        src, dst = self.resolve(a), self.resolve(b)
        if src is None or dst is None:
            return []
        u = self.undirected()
        common = (set(u[src]) & set(u[dst])) - {src, dst}
        out = sorted(common, key=lambda n: (u.degree(n), n))
        for path in self.paths(src, dst, max_len=4, max_paths=10):
            out += [n for n in path[1:-1] if n not in out]
        return out[:k]

    def summary(self) -> dict:
        rel = Counter(key for _, _, key in self.g.edges(keys=True))
        return {"nodes": self.g.number_of_nodes(), "edges": self.g.number_of_edges(), "relations": dict(rel),
                "chunks": len(self.g.graph["seen_chunk_ids"])}

    # -----------------------------------------------------------------------------------------------------------
    # export

    def to_graphml(self, path: str | os.PathLike) -> None:
        """GraphML (scalar attributes only): list/dict attributes are stored as JSON strings and named in the
        graph attributes json_node_attrs / json_edge_attrs / json_graph_attrs, so `from_graphml` restores them."""
        h = nx.MultiDiGraph()
        encoded = {"node": set(), "edge": set(), "graph": set()}

        def enc(kind: str, attrs: dict) -> dict:
            nested = {k for k, v in attrs.items() if isinstance(v, (list, dict, tuple))}
            encoded[kind] |= nested
            return {k: json.dumps(v, ensure_ascii=False) if k in nested else v for k, v in attrs.items()}

        for n, data in self.g.nodes(data=True):
            h.add_node(n, **enc("node", data))
        for u, v, key, data in self.g.edges(keys=True, data=True):
            h.add_edge(u, v, key=key, **enc("edge", data))
        h.graph.update(enc("graph", self.g.graph))
        for kind, names in encoded.items():
            h.graph[f"json_{kind}_attrs"] = json.dumps(sorted(names))
        atomic_write(path, lambda f: nx.write_graphml(h, f), binary=True)

    @classmethod
    def from_graphml(cls, path: str | os.PathLike) -> "KnowledgeGraph":
        h = nx.read_graphml(path, force_multigraph=True)
        if not isinstance(h, nx.MultiDiGraph):
            h = nx.MultiDiGraph(h)
        names = {kind: set(json.loads(h.graph.pop(f"json_{kind}_attrs", "[]"))) for kind in ("node", "edge", "graph")}

        def dec(kind: str, attrs: dict) -> None:
            for k in names[kind] & set(attrs):
                attrs[k] = json.loads(attrs[k])

        for _, data in h.nodes(data=True):
            dec("node", data)
        for _, _, data in h.edges(data=True):
            dec("edge", data)
        dec("graph", h.graph)
        h.graph.pop("node_default", None)
        h.graph.pop("edge_default", None)
        return cls(h)

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(nx.node_link_data(self.g, edges="edges"), ensure_ascii=False))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "KnowledgeGraph":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(nx.node_link_graph(data, directed=True, multigraph=True, edges="edges"))

    def draw_neighbourhood_png(self, node: str, path: str | os.PathLike, hops: int = 1, max_edges: int = 30) -> None:
        """Draw the neighbourhood of `node` (spring layout, relation names on the edges) to a PNG file."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        start = self.resolve(node)
        h = nx.DiGraph()
        if start is not None:
            h.add_node(start)
        for u, rel, v in self.neighbourhood_edges(node, hops, max_edges):
            h.add_edge(u, v, relation=rel)
        fig = Figure(figsize=(10, 8), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title(f"{self.label(start)}: {hops}-hop neighbourhood" if start else f"{node}: not in the graph")
        if h.number_of_nodes():
            pos = nx.spring_layout(h, seed=0)
            colors = ["#f4a261" if n == start else "#a8dadc" for n in h.nodes]
            nx.draw_networkx_nodes(h, pos, ax=ax, node_color=colors, node_size=600)
            nx.draw_networkx_edges(h, pos, ax=ax, arrows=True, edge_color="#555555")
            nx.draw_networkx_labels(h, pos, ax=ax, labels={n: self.label(n) for n in h.nodes}, font_size=8)
            nx.draw_networkx_edge_labels(h, pos, ax=ax, edge_labels=nx.get_edge_attributes(h, "relation"), font_size=7)
        save_png(fig, path)


def _merged(old: Sequence[str], new: Iterable[str]) -> list[str]:
    """`old` plus the items of `new` it lacks, order kept (provenance lists stay stable and duplicate-free)."""
    have = set(old)
    return list(old) + [x for x in dict.fromkeys(new) if x not in have]
