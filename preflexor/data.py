"""Preference pairs: JSONL I/O and validation, chat tokenization, truncation, thinking masks, collation.

A record is `{"prompt", "chosen", "rejected", "meta"?}` (prompt = question + " Use <|thinking|>.", preflexor.md §2.2).
Tokenization follows the reference pair builder (§1.3, §10.3): the prompt is the chat-formatted user turn with the
generation prompt, each response is its text plus the end-of-turn token, labels are -100 on the prompt. Truncation
follows TRL 0.11 (§4.5): if prompt + longer response exceeds `max_length`, the prompt keeps its last
`max_prompt_len` tokens, then the responses are cut to the remaining budget. Stage 2 masks thinking tokens (§4.2).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from preflexor.errors import UserError
from preflexor.utils import json_line

IGNORE_INDEX = -100
REQUIRED_KEYS = ("prompt", "chosen", "rejected")
MASK_MODES = ("none", "answer_only", "random_fraction")


# -- JSONL reading and validation --------------------------------------------------------------------------------------

def validate_record(obj) -> str | None:
    """Why `obj` is not a valid preference record, or None when it is."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key in REQUIRED_KEYS:
        if key not in obj:
            return f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return f"key {key!r} must be a string, got {type(obj[key]).__name__}"
        if not obj[key].strip():
            return f"key {key!r} is empty"
    if "meta" in obj and obj["meta"] is not None and not isinstance(obj["meta"], dict):
        return f"key 'meta' must be an object, got {type(obj['meta']).__name__}"
    return None


def read_pairs(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Parse a preference JSONL file; returns (records, problems) where problems are "file:line: reason" strings.

    Blank lines are ignored. A bad line raises `UserError("file:line: reason")` unless `skip_bad`, in which case it
    is skipped and reported in `problems`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: preference data file not found")
    records, problems = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json_line(raw)
                reason = validate_record(obj)
            except ValueError as e:
                reason = str(e)
            if reason is not None:
                msg = f"{path}:{lineno}: {reason}"
                if not skip_bad:
                    raise UserError(msg)
                problems.append(msg)
                continue
            records.append(obj)
    return records, problems


def load_pairs(path: str | Path, skip_bad: bool = False) -> list[dict]:
    """Read and validate preference JSONL; with `skip_bad`, bad lines are skipped and their count printed to stderr."""
    records, problems = read_pairs(path, skip_bad=skip_bad)
    if problems:
        print(f"warning: skipped {len(problems)} bad line(s) of {path} (first: {problems[0]})", file=sys.stderr)
    if not records:
        raise UserError(f"{path}: no valid preference pairs")
    return records


def heldout_pairs(run_dir: Path, cfg: dict) -> list[dict]:
    """The held-out pairs a run evaluated on: data/heldout.jsonl of the active loop, or the last
    `data.heldout_pairs` records of its preference JSONL (as `datagen.PairSource` splits them)."""
    path = Path(run_dir) / "data" / "heldout.jsonl"
    if path.is_file():
        return load_pairs(path)
    data = cfg.get("data") or {}
    if data.get("pairs"):
        records = load_pairs(data["pairs"])
        n_held = min(int(data.get("heldout_pairs", 16)), max(len(records) - 1, 0))
        if n_held:
            return records[len(records) - n_held:]
    raise UserError(f"{run_dir}: no held-out pairs (no data/heldout.jsonl and no data.pairs file); pass --heldout")

# -- Tokenization and truncation ---------------------------------------------------------------------------------------

def tokenize_pair(tok, record: dict, max_prompt_len: int = 512, max_length: int = 1024, system: str | None = None,
                  mask_mode: str = "none", keep_delimiter: bool = True, fraction: float = 0.2,
                  generator: torch.Generator | None = None) -> dict | None:
    """Token ids of one pair with the chat format, truncated like the reference; None if a response is cut to nothing.

    Returns `{"prompt_ids", "chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask"}`; the masks (bool lists over
    the response tokens, True = keep the label) come from `thinking_mask(mode=mask_mode)`, the same rule for both.
    """
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": record["prompt"]})
    prompt = list(tok.encode_chat(messages, add_generation_prompt=True, allow_special=True))
    chosen = list(tok.encode(record["chosen"], allow_special=True)) + [tok.eot_id]
    rejected = list(tok.encode(record["rejected"], allow_special=True)) + [tok.eot_id]
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        prompt = prompt[-max_prompt_len:]  # TRL truncation_mode="keep_end"
    budget = max_length - len(prompt)
    if budget <= 0:
        return None
    chosen, rejected = chosen[:budget], rejected[:budget]
    kw = dict(mode=mask_mode, think_start_id=tok.think_start_id, think_end_id=tok.think_end_id,
              keep_delimiter=keep_delimiter, fraction=fraction, generator=generator)
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "chosen_mask": thinking_mask(chosen, **kw).tolist(),
            "rejected_mask": thinking_mask(rejected, **kw).tolist()}


def tokenize_pairs(tok, records: Iterable[dict], **kw) -> tuple[list[dict], int]:
    """`tokenize_pair` over records; returns (examples, number dropped because a response was truncated away)."""
    out, dropped = [], 0
    for r in records:
        ex = tokenize_pair(tok, r, **kw)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


# -- Thinking masks (stage 2, preflexor.md §4.2) -----------------------------------------------------------------------

def tokenize_for(tok, records: Iterable[dict], data_cfg, loss_cfg, seed: int) -> tuple[list[dict], int]:
    """`tokenize_pairs` with a run's lengths and system prompt (`config.DataConfig`) and thinking mask
    (`config.LossConfig`), the random-fraction mask drawn from a generator seeded `seed`."""
    return tokenize_pairs(tok, records, generator=torch.Generator().manual_seed(seed),
                          max_prompt_len=data_cfg.max_prompt_len, max_length=data_cfg.max_length,
                          system=data_cfg.system_prompt, mask_mode=loss_cfg.mask,
                          keep_delimiter=loss_cfg.keep_delimiter, fraction=loss_cfg.mask_fraction)


def thinking_spans(ids: Sequence[int], think_start_id: int, think_end_id: int) -> list[tuple[int, int]]:
    """(start, end) positions of matched thinking blocks: each end is matched to the nearest preceding start that
    follows the previous matched end; ends without a start and an unclosed final start yield no span."""
    spans, start = [], None
    for i, t in enumerate(ids):
        if t == think_start_id:
            start = i
        elif t == think_end_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def thinking_mask(response_ids: Sequence[int] | torch.Tensor, mode: str, think_start_id: int, think_end_id: int,
                  keep_delimiter: bool = True, fraction: float = 0.2,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask over the response tokens, True = the label stays in the loss.

    - `none`: keep everything.
    - `answer_only` (the reference's `dynamic_answer_comparison`): drop every label before the LAST `<|/thinking|>`;
      the delimiter itself stays when `keep_delimiter`; a response without `<|/thinking|>` keeps all labels.
    - `random_fraction` (`mask_thinking_tokens`): in each matched block drop floor(fraction * L) randomly chosen of the
      L tokens strictly inside it (with `keep_delimiter=False` the two delimiters join the maskable span).
    """
    ids = response_ids.tolist() if isinstance(response_ids, torch.Tensor) else list(response_ids)
    keep = torch.ones(len(ids), dtype=torch.bool)
    if mode == "none":
        return keep
    if mode == "answer_only":
        ends = [i for i, t in enumerate(ids) if t == think_end_id]
        if ends:
            last = ends[-1]
            keep[: last if keep_delimiter else last + 1] = False
        return keep
    if mode == "random_fraction":
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"thinking mask fraction must be in [0, 1], got {fraction}")
        for s, e in thinking_spans(ids, think_start_id, think_end_id):
            lo, hi = (s + 1, e) if keep_delimiter else (s, e + 1)
            n = hi - lo
            k = math.floor(fraction * n + 1e-9)
            if k > 0:
                keep[lo + torch.randperm(n, generator=generator)[:k]] = False
        return keep
    raise UserError(f"unknown thinking mask mode {mode!r} (choose from {', '.join(MASK_MODES)})")


# -- Collation ---------------------------------------------------------------------------------------------------------

def collate_pairs(batch: list[dict], pad_id: int, nll_prompt: bool = False) -> dict:
    """Right-padded tensors for one forward over chosen rows then rejected rows ([2B, T], split with `chunk(2)`).

    Alignment: `labels[:, t]` is the target of the logits at position t (input_ids shifted left by one), -100 at prompt,
    padding and thinking-masked tokens, so `token_logps(hidden, W, labels)` needs no further shift. Also returns
    `targets` (the shifted ids with -100 only at prompt and padding), `loss_mask = labels != -100`, `nll_mask` (every
    chosen response token, ignoring thinking masks, for ORPO's NLL; False on rejected rows), `attention_mask`,
    `prompt_lens` and `response_lens` ([2B]). `nll_prompt` (TRL's and the official ORPO code's NLL, over prompt +
    response): `prompt_targets` holds the chosen rows' shifted prompt tokens (-100 elsewhere) and `nll_mask` covers
    them too.
    """
    B = len(batch)
    if B == 0:
        raise ValueError("collate_pairs needs at least one example")
    rows = []  # (prompt, response, keep-mask, is_chosen)
    for side in ("chosen", "rejected"):
        for ex in batch:
            resp = ex[f"{side}_ids"]
            mask = ex.get(f"{side}_mask") or [True] * len(resp)
            rows.append((ex["prompt_ids"], resp, mask, side == "chosen"))
    T = max(len(p) + len(r) for p, r, _, _ in rows)
    input_ids = torch.full((2 * B, T), pad_id, dtype=torch.long)
    targets = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    labels = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((2 * B, T), dtype=torch.bool)
    nll_mask = torch.zeros((2 * B, T), dtype=torch.bool)
    prompt_targets = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long) if nll_prompt else None
    prompt_lens = torch.zeros(2 * B, dtype=torch.long)
    response_lens = torch.zeros(2 * B, dtype=torch.long)
    for i, (p, r, m, is_chosen) in enumerate(rows):
        P, R = len(p), len(r)
        if P == 0:
            raise ValueError("collate_pairs: empty prompt (the chat format always yields prompt tokens)")
        input_ids[i, :P + R] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, :P + R] = True
        resp = torch.tensor(list(r), dtype=torch.long)
        # the response token at sequence position P + j is predicted by the logits at position P + j - 1
        targets[i, P - 1:P + R - 1] = resp
        labels[i, P - 1:P + R - 1] = torch.where(torch.tensor(list(m), dtype=torch.bool), resp, IGNORE_INDEX)
        if is_chosen:
            nll_mask[i, P - 1:P + R - 1] = True
            if nll_prompt:  # prompt token j + 1 is predicted at position j
                prompt_targets[i, :P - 1] = torch.tensor(list(p[1:]), dtype=torch.long)
                nll_mask[i, :P - 1] = True
        prompt_lens[i], response_lens[i] = P, R
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "targets": targets,
           "loss_mask": labels != IGNORE_INDEX, "nll_mask": nll_mask, "prompt_lens": prompt_lens,
           "response_lens": response_lens}
    if nll_prompt:
        out["prompt_targets"] = prompt_targets
    return out


# -- Data order --------------------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def take_items(n: int, seed: int, position: int, count: int) -> list[int]:
    """Items `position .. position+count-1` of an endless stream of seeded permutations of range(n)."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(position, n)
        order = epoch_order(n, seed, epoch)
        take = min(count - len(out), n - offset)
        out.extend(order[offset:offset + take])
        position += take
    return out
