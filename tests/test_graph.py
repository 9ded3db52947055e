"""Knowledge graph: typed edges with provenance, PMI co-occurrence, triples, queries, GraphML/JSON round trips."""
import math

import networkx as nx
import pytest

from preflexor.corpus import Document, chunk_documents, load_corpus
from preflexor.graph import CO_OCCURS, IS_A, KnowledgeGraph, format_triples, normalize_relation, parse_triples


def _term(tid, label, definition, synonyms=(), ancestors=None):
    meta = {"term_id": tid, "label": label, "synonyms": list(synonyms), "ancestors": ancestors or {}, "ontology": "T"}
    return Document(tid, f"{label}: {definition}", label, "test", meta)


TERMS = [
    _term("T:1", "tissue", "An aggregate of cells and matrix."),
    _term("T:2", "bone tissue", "A mineralized tissue of collagen and hydroxyapatite.", ["osseous tissue"],
          {"T:1": 1}),
    _term("T:3", "cartilage tissue", "An avascular tissue rich in collagen.", (), {"T:1": 1}),
    _term("T:4", "collagen", "A fibrous structural protein."),
    _term("T:5", "hydroxyapatite", "A calcium phosphate mineral."),
    _term("T:6", "tendon", "Dense connective tissue joining muscle to bone tissue.", (), {"T:1": 1}),
    _term("T:7", "compact bone tissue", "Dense bone tissue.", (), {"T:2": 1, "T:1": 2}),
]
PAPERS = [
    Document("p1", "Collagen fibrils template hydroxyapatite crystals."),
    Document("p2", "In dentin, hydroxyapatite platelets sit between collagen molecules."),
    Document("p3", "A tendon transmits load; collagenous tissue is tough."),
    Document("p4", "The tendon and the tendon sheath glide."),
    Document("p5", "Unrelated text about glass."),
]


@pytest.fixture()
def small():
    docs = TERMS + PAPERS
    chunks = chunk_documents(docs)
    return docs, chunks, KnowledgeGraph.from_corpus(docs, chunks)


def _mentions(chunks, kg, node):
    return {c.chunk_id for c in chunks if node in kg.find_concepts(c.text, max_n=None)}


def test_typed_edges_with_provenance(small):
    docs, chunks, kg = small
    assert dict(kg.g.edges["T:2", "T:1", IS_A]) == {"relation": IS_A, "weight": 1.0, "count": 1,
                                                   "chunk_ids": ["T:2#0"], "origin": "ontology"}
    assert kg.g.has_edge("T:7", "T:2", key=IS_A) and not kg.g.has_edge("T:7", "T:1")  # no transitive edges
    for _, _, data in kg.g.edges(data=True):
        assert data["chunk_ids"] and data["relation"] in (IS_A, CO_OCCURS)
    all_ids = {c.chunk_id for c in chunks}
    for node, data in kg.g.nodes(data=True):
        assert set(data["chunk_ids"]) <= all_ids
        assert set(data["chunk_ids"]) == _mentions(chunks, kg, node) | {f"{node}#0"}


def test_pmi_cooccurrence(small):
    _, chunks, kg = small
    n = len(chunks)
    n_col, n_hap = len(kg.g.nodes["T:4"]["chunk_ids"]), len(kg.g.nodes["T:5"]["chunk_ids"])
    assert (n_col, n_hap) == (5, 4)  # collagen: T:2, T:3, T:4 definitions, p1, p2 ("collagenous" is no match)
    edge = kg.g.edges["T:4", "T:5", CO_OCCURS]
    assert edge["count"] == 3 and sorted(edge["chunk_ids"]) == ["T:2#0", "p1#0", "p2#0"]
    assert edge["weight"] == pytest.approx(math.log(3 * n / (n_col * n_hap))) and edge["weight"] > 0
    # tendon co-occurs with bone tissue once only (T:6's definition): below min_count
    assert not kg.has_edge("tendon", CO_OCCURS, "bone tissue")
    assert kg.has_edge("hydroxyapatite", CO_OCCURS, "collagen")  # read in both directions
    for u, v, k, data in kg.g.edges(keys=True, data=True):
        if k == CO_OCCURS:
            assert data["weight"] > 0 and data["count"] >= 2 and u < v


def test_find_concepts_and_neighbourhood(small):
    _, _, kg = small
    text = "Osseous tissue and COMPACT bone tissue, collagenous matrix, collagen, tendons; hydroxyapatite."
    assert kg.find_concepts(text) == ["T:2", "T:7", "T:4", "T:6", "T:5"]  # longest match, whole words, plurals
    assert kg.find_concepts(text, max_n=2) == ["T:2", "T:7"]
    assert kg.find_concepts("Bone and compact bones; glass") == ["T:2", "T:7"]  # "X" stands for a label "X tissue"
    hood = kg.neighbourhood("bone tissue", hops=1)
    assert ("bone tissue", IS_A, "tissue") == hood[0]  # parents first
    assert ("compact bone tissue", IS_A, "bone tissue") in hood
    assert ("tissue", CO_OCCURS, "bone tissue") in hood
    assert kg.neighbourhood("collagen") == [("collagen", CO_OCCURS, "hydroxyapatite")]
    assert len(kg.neighbourhood("bone tissue", hops=2, max_edges=3)) == 3
    assert kg.neighbourhood("no such concept") == []
    assert kg.label("T:3") == "cartilage tissue" and kg.resolve("osseous tissue") == "T:2"


def test_paths_and_bridging(small):
    _, _, kg = small
    paths = kg.paths("compact bone tissue", "cartilage tissue", max_len=3)
    assert ["T:7", "T:2", "T:1", "T:3"] in paths and all(len(p) <= 4 for p in paths)
    assert kg.path_triples(["T:7", "T:2", "T:1"]) == [("compact bone tissue", IS_A, "bone tissue"),
                                                      ("bone tissue", IS_A, "tissue")]
    assert kg.bridging_concepts("bone tissue", "cartilage tissue")[0] == "T:1"
    assert kg.paths("tissue", "no such concept") == []


def test_parse_and_add_triples(small):
    _, _, kg = small
    text = """Knowledge graph:
- [spider silk] -[IS-A]-> [protein fiber]
1. [Spider Silk] -[Influences]-> [osseous tissue]
[collagen] -[RELATES-TO]-> [hydroxyapatite]
[collagen] -> [hydroxyapatite]
[collagen] -[is_a]- [protein]
[ ] -[is_a]-> [x]
[bone] -[ ]-> [x]
[collagen] -[is_a]-> [COLLAGEN]
no triple here"""
    assert parse_triples(text) == [("spider silk", "is_a", "protein fiber"),
                                   ("Spider Silk", "influences", "osseous tissue"),
                                   ("collagen", "relates_to", "hydroxyapatite")]
    assert normalize_relation("Relates To") == "relates_to"
    added = kg.add_triples(text, chunk_ids=["gen-7"])
    assert added == [("concept:spider silk", "is_a", "concept:protein fiber"),
                     ("concept:spider silk", "influences", "T:2"), ("T:4", "relates_to", "T:5")]
    assert kg.g.nodes["concept:spider silk"]["chunk_ids"] == ["gen-7"]
    assert "gen-7" in kg.g.nodes["T:2"]["chunk_ids"]
    assert kg.has_edge("spider silk", "INFLUENCES", "bone tissue") and not kg.has_edge("bone tissue", "influences",
                                                                                      "spider silk")
    kg.add_triples("[spider silk] -[influences]-> [bone tissue]", chunk_ids=["gen-9"])
    edge = kg.g.edges["concept:spider silk", "T:2", "influences"]
    assert edge["count"] == 2 and edge["chunk_ids"] == ["gen-7", "gen-9"] and edge["origin"] == "llm"
    assert format_triples(kg.neighbourhood("spider silk")) == \
        "[spider silk] -[is_a]-> [protein fiber]\n[spider silk] -[influences]-> [bone tissue]"
    assert format_triples([("a [b]", "is_a", "c")]) == "[a (b)] -[is_a]-> [c]"
    kg.add_triples("[x] -[is_a]-> [bone tissue]")  # a one-letter concept is kept and resolvable, never matched
    assert kg.has_edge("x", "is_a", "bone tissue") and kg.find_concepts("x marks bone tissue") == ["T:2"]


def _snapshot(g):
    return (sorted(g.nodes(data=True)), sorted(g.edges(keys=True, data=True)),
            {k: v for k, v in g.graph.items()})


def test_graphml_and_json_round_trip(small, tmp_path):
    _, _, kg = small
    kg.add_triples("[spider silk] -[influences]-> [bone tissue]", ["gen-1"])
    kg.to_graphml(tmp_path / "kg.graphml")
    raw = nx.read_graphml(tmp_path / "kg.graphml", force_multigraph=True)  # plain networkx reads it
    assert raw.number_of_nodes() == kg.g.number_of_nodes() and raw.number_of_edges() == kg.g.number_of_edges()
    back = KnowledgeGraph.from_graphml(tmp_path / "kg.graphml")
    assert _snapshot(back.g) == _snapshot(kg.g)
    kg.to_json(tmp_path / "kg.json")
    assert _snapshot(KnowledgeGraph.from_json(tmp_path / "kg.json").g) == _snapshot(kg.g)
    assert not list(tmp_path.glob("*.tmp"))


def test_grow_updates_mentions_and_pmi(small, tmp_path):
    docs, chunks, kg = small
    kg.to_graphml(tmp_path / "kg.graphml")
    loaded = KnowledgeGraph.from_graphml(tmp_path / "kg.graphml")
    new = chunk_documents([Document("p6", "Calcified cartilage tissue holds hydroxyapatite."),
                           Document("p7", "Cartilage tissue, hydroxyapatite."),
                           Document("p8", "A tendon is made of collagen."), Document("p9", "Tendon collagen.")])
    for g in (kg, loaded):
        g.grow(new)
        g.grow(new)  # already seen: no double counting
    n = len(chunks) + 4
    edge = kg.g.edges["T:3", "T:5", CO_OCCURS]
    assert edge["chunk_ids"] == ["p6#0", "p7#0"] and edge["weight"] == pytest.approx(math.log(2 * n / (3 * 6)))
    # tendon (5 chunks) and collagen (7) meet twice among 16 chunks: PMI = log(32 / 35) < 0, so no edge
    assert not kg.has_edge("tendon", CO_OCCURS, "collagen")
    assert _snapshot(loaded.g) == _snapshot(kg.g)


def test_png(small, tmp_path):
    _, _, kg = small
    kg.draw_neighbourhood_png("bone tissue", tmp_path / "hood.png", hops=2)
    data = (tmp_path / "hood.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_default_corpus_graph():
    docs, chunks = load_corpus("ontology")
    kg = KnowledgeGraph.from_corpus(docs, chunks)
    s = kg.summary()
    print("default graph:", s)
    assert s["nodes"] == len(docs) and s["relations"][IS_A] > len(docs) and s["relations"][CO_OCCURS] > 500
    ids = {c.chunk_id for c in chunks}
    assert all(d["chunk_ids"] and set(d["chunk_ids"]) <= ids for _, _, d in kg.g.edges(data=True))
    found = kg.find_concepts("How do collagen fibrils stiffen tendons, cartilage and bones?")
    assert [kg.label(n) for n in found] == ["tendon", "cartilage tissue", "bone tissue"]
    assert ("bone tissue", IS_A, "skeletal tissue") in kg.neighbourhood("bone tissue")
    # a Knowledge Graph section written from the graph reads back as edges of the graph
    section = format_triples(t for n in found for t in kg.neighbourhood(n, hops=2, max_edges=15))
    triples = parse_triples(section)
    assert len(triples) == 45 and all(kg.has_edge(a, rel, b) for a, rel, b in triples)
    assert not kg.has_edge("tendon", IS_A, "bone tissue")
