"""Evaluation of a trained run (or the base model) on held-out questions and pairs.

The original PRefLexOR has no evaluation code (preflexor.md §6): its notebooks print generations for a few prompts
and its trainers log reward curves; the Graph-PRefLexOR follow-up grades answers with an LLM judge. Here, for one
model and the run's own held-out data:

- preference metrics on the held-out pairs with the run's own loss (reference = the model the run started from,
  for stage 2 its `model.source`; ORPO and the base model need none): loss, reward accuracy and margins, the NLL of
  the chosen responses (token mean), and the loss-free "logp accuracy" (mean log-prob of chosen > rejected);
- greedy generations on held-out questions: thinking-format compliance, answer quality against the grounded ground
  truth (the chosen answer after `<|/thinking|>`): token F1 and ROUGE-L, recall of the key concepts the knowledge
  graph says the answer should name (the question's focus concept, its direct `is_a` parents, the concepts the
  question mentions), answer length and tokens per second;
- optionally an LLM judge through any OpenAI-compatible endpoint: a 1-10 rubric (accuracy, depth of reasoning,
  coherence) and a pairwise win rate against a baseline model's answers, asked in both orders to cancel position bias.

A response is well formed when it opens with one `<|thinking|>…<|/thinking|>` block (leading whitespace allowed),
contains no further thinking delimiters, and is followed by a non-empty answer.

CLI: python -m preflexor.evaluate RUN_DIR|base [--n 16] [--max-new-tokens 192] [--questions FILE] [--heldout FILE]
         [--judge-url URL --judge-model M] [--baseline RUN_DIR|base] [--out DIR]
Writes eval.json, eval.md and eval.png in the run dir (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from preflexor.errors import UserError, exit_on_user_error

THINK_START, THINK_END = "<|thinking|>", "<|/thinking|>"
TRIGGER = " Use <|thinking|>."  # appended to every question (preflexor.md §1.3)
_TAG = re.compile(r"<\|/?(?:thinking|reflect|scratchpad|response)\|>")
_WORD = re.compile(r"[^\W_]+")  # letters and digits; punctuation and underscores separate words


def split_thinking(text: str) -> dict:
    """`{"thinking", "answer", "well_formed", "issue"}` for one response; never raises on missing or unclosed tags."""
    body = text.lstrip()
    if not body.startswith(THINK_START):
        return {"thinking": None, "answer": text.strip(), "well_formed": False, "issue": "no opening <|thinking|>"}
    rest = body[len(THINK_START):]
    if THINK_END not in rest:
        return {"thinking": rest.strip(), "answer": "", "well_formed": False, "issue": "unclosed <|thinking|>"}
    thinking, answer = rest.split(THINK_END, 1)
    if THINK_START in thinking or THINK_START in answer or THINK_END in answer:
        return {"thinking": thinking.strip(), "answer": answer.strip(), "well_formed": False,
                "issue": "more than one thinking block"}
    if not answer.strip():
        return {"thinking": thinking.strip(), "answer": "", "well_formed": False, "issue": "empty answer"}
    return {"thinking": thinking.strip(), "answer": answer.strip(), "well_formed": True, "issue": None}


def question_prompt_ids(tok, question: str, system: str | None = None) -> list[int]:
    """Chat-formatted prompt ids for a question (the thinking trigger is part of the stored prompt)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.encode_chat(messages, add_generation_prompt=True, allow_special=True)


@torch.no_grad()
def format_rate(model, tok, prompts: list[str], max_new_tokens: int = 128, system: str | None = None,
                batch_size: int = 8) -> dict:
    """Greedy answers to `prompts` (already carrying the trigger); the fraction that is well formed, with samples.

    A row stops as soon as it cannot be well formed any more (its first non-blank text is not `<|thinking|>`, or it
    opens a second thinking block), so an untrained model's long answers cost one step instead of a full budget.
    Those samples are cut there ("stopped early")."""
    gens = generate_responses(model, tok, prompts, max_new_tokens, system, batch_size, stop_when_malformed=True)
    texts = [g["response"] for g in gens["rows"]]
    parsed = [split_thinking(t) for t in texts]
    ok = sum(p["well_formed"] for p in parsed)
    opened = sum(t.lstrip().startswith(THINK_START) for t in texts)
    return {"format_rate": ok / max(len(texts), 1), "opens_thinking_rate": opened / max(len(texts), 1),
            "n": len(texts), "tokens_per_s": gens["tokens_per_s"],
            "samples": [{"prompt": p, "response": t, "issue": q["issue"], "stopped_early": g["stopped_early"]}
                        for p, t, q, g in zip(prompts, texts, parsed, gens["rows"])]}


class _MalformedStop:
    """`on_token` for `generate_ex`: ends a row once its text can no longer be a well-formed response."""

    def __init__(self, tok, n_rows: int):
        self.tok, self.start = tok, tok.reasoning_ids.get(THINK_START)
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.opened = [False] * n_rows
        self.stopped = [False] * n_rows

    def __call__(self, row: int, token: int) -> bool:
        if self.opened[row]:
            bad = token == self.start  # a second <|thinking|>
        else:
            self.ids[row].append(token)
            text = self.tok.decode(self.ids[row]).lstrip()
            if not text:
                return False
            self.opened[row] = text.startswith(THINK_START)
            bad = not self.opened[row] and not THINK_START.startswith(text)
        self.stopped[row] = self.stopped[row] or bad
        return bad


@torch.no_grad()
def generate_responses(model, tok, prompts: Sequence[str], max_new_tokens: int, system: str | None = None,
                       batch_size: int = 8, stop_when_malformed: bool = False) -> dict:
    """Greedy responses, batched through the sampler: `{"rows": [{"response", "n_tokens", "stopped_early"}],
    "tokens_per_s", "seconds"}`. Tokens per second = generated tokens / wall time of the batched generation.
    `stop_when_malformed` ends rows that can no longer be well formed (see `format_rate`)."""
    from preflexor.sampler import generate_ex

    was_training = model.training
    model.eval()
    rows, n_tokens, t0 = [], 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        ids = [question_prompt_ids(tok, p, system) for p in prompts[i:i + batch_size]]
        room = model.config.max_position_embeddings - max(len(x) for x in ids)
        if room < 1:
            raise UserError(f"a prompt of {max(len(x) for x in ids)} tokens does not fit the model's context")
        watch = _MalformedStop(tok, len(ids)) if stop_when_malformed else None
        res = generate_ex(model, ids, min(max_new_tokens, room), temperature=0.0, stop_ids=tok.stop_ids,
                          pad_id=tok.pad_id, on_token=watch)
        for r, o in enumerate(res.tokens):
            n_tokens += len(o[0])
            rows.append({"response": tok.decode(o[0], skip_special=True), "n_tokens": len(o[0]),
                         "stopped_early": bool(watch and watch.stopped[r])})
    model.train(was_training)
    dt = time.perf_counter() - t0
    return {"rows": rows, "tokens_per_s": n_tokens / dt if dt > 0 else 0.0, "seconds": dt}


# -----------------------------------------------------------------------------
# Answer quality: token F1, ROUGE-L, concept recall (pure functions)

def words(text: str) -> list[str]:
    """Lowercased word tokens (letters and digits), reasoning tags removed: the unit of F1 and ROUGE-L."""
    return _WORD.findall(_TAG.sub(" ", text).lower())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1: harmonic mean of precision and recall of the bag of words (multiset overlap).
    Two empty texts score 1, one empty text 0."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len a * len b) time, O(len b) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, §3.1 with beta = 1): P = LCS/|prediction|, R = LCS/|reference|, F = 2PR/(P+R), on
    `words`. Two empty texts score 1, one empty text 0."""
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def final_answer(response: str) -> str:
    """The answer part of a response: the text after the last `<|/thinking|>`; an unclosed thinking block has no
    answer; a response without thinking is all answer. Reasoning tags are removed."""
    if THINK_END in response:
        text = response.rsplit(THINK_END, 1)[1]
    elif response.lstrip().startswith(THINK_START):
        text = ""
    else:
        text = response
    return " ".join(_TAG.sub(" ", text).split())


def reference_answer(record: dict) -> str:
    """The grounded ground truth of a held-out pair: the teacher's answer (meta.answer), else the chosen response
    after `<|/thinking|>`."""
    meta = record.get("meta") or {}
    if isinstance(meta.get("answer"), str) and meta["answer"].strip():
        return meta["answer"].strip()
    return final_answer(record["chosen"])


def _phrase(text: str) -> str:
    return " ".join(words(text))


def concept_recall(text: str, concepts: Sequence[Sequence[str]]) -> float | None:
    """Fraction of `concepts` mentioned in `text`; each concept is a list of names (label, synonyms), mentioned when
    one of them occurs as a whole-word phrase (case and punctuation ignored; a plural "s" is accepted). None when
    there is nothing to recall."""
    if not concepts:
        return None
    hay = f" {_phrase(text)} "
    hit = 0
    for names in concepts:
        phrases = [p for p in (_phrase(n) for n in names) if len(p) >= 3]
        if any(f" {p} " in hay or f" {p}s " in hay for p in phrases):
            hit += 1
    return hit / len(concepts)


def key_concepts(graph, record: dict, max_parents: int = 3) -> list[list[str]]:
    """The concepts an answer to `record`'s question should name, by the knowledge graph: the question's focus
    concept (meta.focus, written by the grounded teacher; else the first concept the question mentions), its direct
    `is_a` parents (at most `max_parents`, in graph order, as the grounded answers list them), and the other
    concepts named in the question (meta.concepts, else found in the question text). Each as [label, *synonyms]."""
    from preflexor.graph import IS_A

    meta = record.get("meta") or {}
    question = meta.get("question") or record["prompt"].replace(TRIGGER, "")
    mentioned = [graph.resolve(c) for c in meta.get("concepts") or []] or graph.find_concepts(question)
    mentioned = [n for n in mentioned if n is not None]
    focus = meta.get("focus") if meta.get("focus") in graph.g else (mentioned[0] if mentioned else None)
    if focus is None:
        return []
    parents = [v for _, v, rel in graph.g.out_edges(focus, keys=True) if rel == IS_A][:max_parents]
    nodes = list(dict.fromkeys([focus, *parents, *mentioned]))
    return [[graph.label(n), *graph.g.nodes[n].get("synonyms", [])] for n in nodes]


def score_answers(responses: Sequence[str], records: Sequence[dict], graph=None) -> list[dict]:
    """Per-question answer quality of `responses` against the held-out `records` (same order)."""
    rows = []
    for resp, rec in zip(responses, records):
        ans, ref = final_answer(resp), reference_answer(rec)
        concepts = key_concepts(graph, rec) if graph is not None else []
        parsed = split_thinking(resp)
        rows.append({"question": (rec.get("meta") or {}).get("question") or rec["prompt"], "reference": ref,
                     "response": resp, "answer": ans, "well_formed": parsed["well_formed"], "issue": parsed["issue"],
                     "opens_thinking": resp.lstrip().startswith(THINK_START),
                     "token_f1": token_f1(ans, ref), "rouge_l": rouge_l(ans, ref),
                     "concept_recall": concept_recall(ans, concepts), "key_concepts": [c[0] for c in concepts],
                     "answer_words": len(words(ans))})
    return rows


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_answers(rows: Sequence[dict]) -> dict:
    """Means over questions of the per-question scores (concept recall over questions that have key concepts)."""
    return {"format_rate": _mean([float(r["well_formed"]) for r in rows]),
            "opens_thinking_rate": _mean([float(r["opens_thinking"]) for r in rows]),
            "token_f1": _mean([r["token_f1"] for r in rows]), "rouge_l": _mean([r["rouge_l"] for r in rows]),
            "concept_recall": _mean([r["concept_recall"] for r in rows]),
            "answer_words": _mean([r["answer_words"] for r in rows])}


# -----------------------------------------------------------------------------
# Preference metrics on held-out pairs

@torch.no_grad()
def _pair_logps(model, examples: list[dict], pad_id: int, average: bool, device, batch_size: int = 4) -> list[dict]:
    """Per example: chosen/rejected log-probs under the loss mask (sum or mean per the loss), the token-mean NLL of
    the whole chosen response, and the mean log-probs of both whole responses."""
    from preflexor.data import collate_pairs
    from preflexor.logprobs import sequence_logps
    from preflexor.train import Runtime, response_token_logps

    was_training = model.training
    model.eval()
    rt = Runtime(torch.device(device), next(model.parameters()).dtype, None)  # fp32 log-probs, no autocast
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[i:i + batch_size], pad_id)
        B = len(examples[i:i + batch_size])
        tl = response_token_logps(model, batch, rt)  # (2B, T)
        targets = batch["targets"].to(device)
        seq = sequence_logps(tl, batch["loss_mask"].to(device), average=average)  # (2B,)
        full = sequence_logps(tl, targets != -100, average=True)  # (2B,) mean over every response token
        for b in range(B):
            out.append({"chosen": seq[b].cpu(), "rejected": seq[B + b].cpu(), "nll": -full[b].cpu(),
                        "mean_chosen": full[b].cpu(), "mean_rejected": full[B + b].cpu()})
    model.train(was_training)
    return out


def pair_metrics(model, tok, records: list[dict], loss_cfg, data_cfg, device, ref_model=None) -> dict:
    """Held-out preference metrics with the run's loss (`loss_cfg`: name, beta, label_smoothing, mask, ...), pairs
    tokenized and masked exactly as training's held-out evaluation does (`data_cfg`: lengths, system prompt; mask
    generator seeded 0). `ref_model` supplies the reference log-probs for DPO-style losses."""
    from preflexor.data import tokenize_pairs
    from preflexor.losses import get_loss
    from preflexor.train import loss_kwargs

    spec = get_loss(loss_cfg.name, key="loss.name")
    examples, dropped = tokenize_pairs(tok, records, generator=torch.Generator().manual_seed(0),
                                       max_prompt_len=data_cfg.max_prompt_len, max_length=data_cfg.max_length,
                                       system=data_cfg.system_prompt, mask_mode=loss_cfg.mask,
                                       keep_delimiter=loss_cfg.keep_delimiter, fraction=loss_cfg.mask_fraction)
    if not examples:
        raise UserError(f"no usable held-out pairs ({dropped} dropped by truncation; raise data.max_length)")
    pol = _pair_logps(model, examples, tok.pad_id, spec.average_logps, device)
    stack = lambda rows, k: torch.stack([r[k] for r in rows])  # noqa: E731  (N,)
    if spec.needs_nll:
        losses, m = spec.fn(stack(pol, "chosen"), stack(pol, "rejected"), stack(pol, "nll"), loss_cfg.beta)
    else:
        if ref_model is None:
            raise UserError(f"loss {loss_cfg.name} needs a reference model")
        ref = _pair_logps(ref_model, examples, tok.pad_id, spec.average_logps, device)
        losses, m = spec.fn(stack(pol, "chosen"), stack(pol, "rejected"), stack(ref, "chosen"),
                            stack(ref, "rejected"), loss_cfg.beta,
                            **loss_kwargs(loss_cfg.name, loss_cfg.label_smoothing))
    margins = m["rewards/margins"].float()
    return {"loss": float(losses.mean()), "reward_accuracy": float(m["rewards/accuracies"].mean()),
            "reward_margin": float(margins.mean()), "reward_chosen": float(m["rewards/chosen"].mean()),
            "reward_rejected": float(m["rewards/rejected"].mean()), "nll_chosen": float(stack(pol, "nll").mean()),
            "logp_accuracy": float((stack(pol, "mean_chosen") > stack(pol, "mean_rejected")).float().mean()),
            "n_pairs": len(examples), "dropped": dropped, "margins": [round(float(x), 5) for x in margins]}


# -----------------------------------------------------------------------------
# LLM judge (any OpenAI-compatible endpoint)

SYSTEM_JUDGE = "You are a strict and fair examiner of scientific answers. You follow the output format exactly."
RUBRIC_PROMPT = (
    "Grade the answer to the question below. A reference answer, written from a curated source, is given to help you "
    "check facts; it may be incomplete.\n\nQuestion: {question}\n\nReference answer:\n{reference}\n\n"
    "Answer to grade:\n{answer}\n\n"
    "Give three integer scores from 1 (very poor) to 10 (excellent):\n"
    "- accuracy: are the statements correct and consistent with the reference?\n"
    "- depth: does the answer reason (explain relations, mechanisms, hierarchy) rather than only assert?\n"
    "- coherence: is it clear, well organised and free of repetition?\n"
    'Reply with one JSON object only, for example {{"accuracy": 6, "depth": 4, "coherence": 7}}.')
PAIRWISE_PROMPT = (
    "Two answers to the same question follow. A reference answer, written from a curated source, is given to help you "
    "check facts.\n\nQuestion: {question}\n\nReference answer:\n{reference}\n\n"
    "Answer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "Which answer is better? Judge accuracy first, then depth of reasoning, then coherence; ignore length as such. "
    'Reply with one JSON object only: {{"winner": "A"}}, {{"winner": "B"}} or {{"winner": "tie"}}.')
RUBRIC_KEYS = ("accuracy", "depth", "coherence")
_KEY_ALIASES = {"accuracy": ("accuracy", "correctness"), "depth": ("depth", "depth of reasoning", "reasoning"),
                "coherence": ("coherence", "clarity")}


def _json_objects(text: str) -> list[dict]:
    out = []
    for m in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append({str(k).strip().lower(): v for k, v in obj.items()})
    return out


def parse_scores(text: str) -> dict[str, float | None]:
    """Rubric scores from a judge reply, robustly: a JSON object if there is one, else "accuracy: 7", "Depth - 6/10"
    style lines. Values are clamped to [1, 10]; a score that cannot be found is None."""
    found: dict[str, float | None] = {k: None for k in RUBRIC_KEYS}
    for obj in _json_objects(text):
        for k in RUBRIC_KEYS:
            for alias in _KEY_ALIASES[k]:
                v = obj.get(alias)
                m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", str(v)) if isinstance(v, (int, float, str)) \
                    and not isinstance(v, bool) else None
                if found[k] is None and m:
                    found[k] = float(m.group(1))
    low = text.lower()
    for k in RUBRIC_KEYS:
        if found[k] is None:
            for alias in _KEY_ALIASES[k]:
                m = re.search(rf"\b{re.escape(alias)}\b[\"'*]*\s*[:=\-–]?\s*\**\s*(\d+(?:\.\d+)?)", low)
                if m:
                    found[k] = float(m.group(1))
                    break
    return {k: (None if v is None else min(10.0, max(1.0, v))) for k, v in found.items()}


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge reply (JSON {"winner": ...}, a bare letter, or "Answer A is better"); None
    when the reply names no winner."""
    for obj in _json_objects(text):
        v = str(obj.get("winner", obj.get("better", ""))).strip().strip(".").lower()
        if v in ("a", "answer a"):
            return "A"
        if v in ("b", "answer b"):
            return "B"
        if v in ("tie", "equal", "draw", "none"):
            return "tie"
    t = text.strip().strip(".*\"' ").lower()
    if t in ("a", "b"):
        return t.upper()
    if t in ("tie", "equal", "draw"):
        return "tie"
    m = re.search(r"\b(?:winner|better answer|verdict)\b\W*(?:is\s*)?(?:answer\s*)?([ab]|tie)\b", t)
    if m:
        return "tie" if m.group(1) == "tie" else m.group(1).upper()
    m = re.search(r"\banswer\s*([ab])\b\s*is\s*(?:clearly\s*)?(?:better|superior|stronger)", t)
    if m:
        return m.group(1).upper()
    if re.search(r"\b(tie|equally good|both (?:answers )?are equal)\b", t):
        return "tie"
    return None


class Judge:
    """An LLM judge behind any OpenAI-compatible `/v1/chat/completions` endpoint, through the teacher's HTTP client
    (retries, backoff, bounded concurrency). Temperature 0."""

    def __init__(self, url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 3, max_concurrency: int = 4, max_tokens: int = 256):
        from preflexor.teacher import HTTPTeacher

        self.client = HTTPTeacher(url, model, api_key_env, timeout, max_retries, 0.5, max_concurrency, max_tokens)
        self.url, self.model, self.max_tokens = self.client.url, model, max_tokens

    def _ask(self, prompt: str) -> str:
        return self.client.complete([{"role": "system", "content": SYSTEM_JUDGE}, {"role": "user", "content": prompt}],
                                    0.0, self.max_tokens)

    def score(self, question: str, reference: str, answer: str) -> dict:
        reply = self._ask(RUBRIC_PROMPT.format(question=question, reference=reference, answer=answer or "(empty)"))
        return {**parse_scores(reply), "reply": reply}

    def compare(self, question: str, reference: str, ours: str, theirs: str) -> dict:
        """Both orders; each order scores 1 (ours better), 0 (theirs) or 0.5 (tie); an unparseable reply is left
        out. `score` is the mean over the parsed orders (None when neither parsed)."""
        first = parse_verdict(self._ask(PAIRWISE_PROMPT.format(question=question, reference=reference,
                                                               a=ours or "(empty)", b=theirs or "(empty)")))
        second = parse_verdict(self._ask(PAIRWISE_PROMPT.format(question=question, reference=reference,
                                                                a=theirs or "(empty)", b=ours or "(empty)")))
        as_ours = [{"A": 1.0, "B": 0.0, "tie": 0.5}.get(first), {"B": 1.0, "A": 0.0, "tie": 0.5}.get(second)]
        parsed = [s for s in as_ours if s is not None]
        return {"ours_first": first, "ours_second": second, "score": sum(parsed) / len(parsed) if parsed else None,
                "consistent": None if len(parsed) < 2 else as_ours[0] == as_ours[1]}


def judge_answers(judge: Judge, rows: list[dict], baseline: list[str] | None = None) -> dict:
    """Rubric scores of every response (thinking included: depth of reasoning is graded) and, with `baseline`
    responses, the pairwise win rate (ties count one half) and how often both orders agreed."""
    with ThreadPoolExecutor(max_workers=judge.client.max_concurrency) as pool:
        scores = list(pool.map(lambda r: judge.score(r["question"], r["reference"], r["response"]), rows))
        pairs = list(pool.map(lambda rb: judge.compare(rb[0]["question"], rb[0]["reference"], rb[0]["response"], rb[1]),
                              zip(rows, baseline))) if baseline is not None else []
    for r, s in zip(rows, scores):
        r["judge"] = {k: s[k] for k in RUBRIC_KEYS}
    for r, p in zip(rows, pairs):
        r["judge"]["pairwise"] = p
    out = {"url": judge.url, "model": judge.model,
           **{k: _mean([s[k] for s in scores]) for k in RUBRIC_KEYS},
           "unparsed_scores": sum(any(s[k] is None for k in RUBRIC_KEYS) for s in scores)}
    if baseline is not None:
        out.update(win_rate=_mean([p["score"] for p in pairs]),
                   position_consistency=_mean([float(p["consistent"]) for p in pairs if p["consistent"] is not None]),
                   unparsed_pairs=sum(p["score"] is None for p in pairs))
    return out


# -----------------------------------------------------------------------------
# Runs

def _section(cls, data: dict | None):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (data or {}).items() if k in names})


def read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.json); pass a run dir of train_orpo.py / "
                        f"train_dpo.py, or 'base'")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def heldout_records(run_dir: Path, cfg: dict) -> list[dict]:
    """The held-out pairs a run evaluated on: data/heldout.jsonl of the active loop, or the last
    `data.heldout_pairs` records of its preference JSONL (as `train.PairSource` splits them)."""
    from preflexor.data import load_pairs

    path = run_dir / "data" / "heldout.jsonl"
    if path.is_file():
        return load_pairs(path)
    data = cfg.get("data") or {}
    if data.get("pairs"):
        records = load_pairs(data["pairs"])
        n_held = min(int(data.get("heldout_pairs", 16)), max(len(records) - 1, 0))
        if n_held:
            return records[len(records) - n_held:]
    raise UserError(f"{run_dir}: no held-out pairs (no data/heldout.jsonl and no data.pairs file); pass --heldout")


def _load(source: str | Path, device, what: str):
    from preflexor.checkpoint import DEFAULT_MODEL, load_model_and_tokenizer

    if str(source) != DEFAULT_MODEL and not Path(source).exists():
        raise UserError(f"{source}: {what} not found")
    model, tok = load_model_and_tokenizer(source, dtype=torch.float32 if device.type == "cpu" else None,
                                          device=device, add_reasoning_tokens=True)
    return model.eval(), tok


def run_model_source(run: str | Path, base_model: str) -> str:
    """What `run` ("base" or a run dir) evaluates: the base model name, or the run's merged final model."""
    if str(run) == "base":
        return base_model
    final = Path(run) / "final" / "model"
    if not (final / "config.json").is_file():
        raise UserError(f"{run}: no final/model (training has not finished; rerun the training command to resume)")
    return str(final)


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


_GRAPHS: dict[str, object] = {}


def corpus_graph(corpus: str = "ontology"):
    """The knowledge graph of a corpus (cached per process): the ground truth of the key concepts."""
    if corpus not in _GRAPHS:
        from preflexor.corpus import load_corpus
        from preflexor.graph import KnowledgeGraph

        docs, chunks = load_corpus(corpus)
        _GRAPHS[corpus] = KnowledgeGraph.from_corpus(docs, chunks)
    return _GRAPHS[corpus]


def evaluate_run(run_dir: str | Path, n_questions: int = 16, max_new_tokens: int = 192, judge_url: str | None = None,
                 baseline_run: str | Path | None = None, out_dir: str | Path | None = None,
                 heldout: str | Path | None = None, questions: str | Path | None = None, judge_model: str = "default",
                 base_model: str | None = None, device: str = "auto", batch_size: int = 8,
                 command: str | None = None) -> dict:
    """Evaluate a run directory (or "base": the base model) and write eval.json, eval.md and eval.png.

    Args:
        run_dir: a run of train_orpo.py / train_dpo.py (its final/model is evaluated), or "base".
        n_questions: held-out questions answered greedily (the first n of the questions file).
        max_new_tokens: generation limit per answer.
        judge_url / judge_model: an OpenAI-compatible endpoint for the rubric (and pairwise) judge; None = no judge.
        baseline_run: a run dir or "base" whose answers the pairwise judge compares against (needs judge_url).
        out_dir: where to write (default: the run dir; required for "base").
        heldout: preference pairs for the reward metrics (default: the run's own held-out pairs; required for base).
        questions: pairs whose questions are answered (default: the held-out pairs); a shared file makes runs
            comparable.
        base_model: the base model for "base" (default: smollm2-135m-instruct).
    """
    from preflexor.checkpoint import DEFAULT_MODEL
    from preflexor.config import DataConfig, LossConfig
    from preflexor.data import load_pairs
    from preflexor.losses import get_loss
    from preflexor.train import setup_runtime
    from preflexor.utils import atomic_write_json, atomic_write_text, git_hash

    t_start = time.perf_counter()
    base_model = base_model or DEFAULT_MODEL
    is_base = str(run_dir) == "base"
    if is_base:
        if heldout is None and questions is None:
            raise UserError("evaluating 'base' needs --heldout FILE (held-out pairs, e.g. "
                            "runs/stage1/data/heldout.jsonl)")
        if out_dir is None:
            raise UserError("evaluating 'base' needs --out DIR")
        cfg = {"model": {"source": base_model}, "stage": 0}
        loss_cfg, data_cfg = LossConfig(name="orpo"), DataConfig()
    else:
        cfg = read_run_config(Path(run_dir))
        loss_cfg, data_cfg = _section(LossConfig, cfg.get("loss")), _section(DataConfig, cfg.get("data"))
    if n_questions < 1 or max_new_tokens < 1:
        raise UserError(f"--n and --max-new-tokens must be >= 1 (got {n_questions}, {max_new_tokens})")
    if baseline_run is not None and judge_url is None:
        raise UserError("--baseline needs --judge-url (the pairwise comparison is made by the judge)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    if heldout is not None or is_base:
        held_desc = str(heldout if heldout is not None else questions)
        pairs = load_pairs(held_desc)
    else:
        pairs = heldout_records(Path(run_dir), cfg)
        held_desc = f"the run's held-out pairs ({cfg.get('data', {}).get('pairs') or 'data/heldout.jsonl'})"
    qrecords = (load_pairs(questions) if questions is not None else pairs)[:n_questions]
    rt = setup_runtime(device, "auto", verbose=False)

    # --- reference log-probs first (stage 2: the model the run started from), then the policy -----------------
    ref_model = None
    needs_ref = get_loss(loss_cfg.name, key="loss.name").needs_ref
    ref_source = cfg["model"]["source"] if needs_ref else None
    if needs_ref:
        ref_model, _ = _load(ref_source, rt.device, "reference model (the run's model.source)")
    source = run_model_source(run_dir, base_model)
    model, tok = _load(source, rt.device, "model")
    t0 = time.perf_counter()
    pm = pair_metrics(model, tok, pairs, loss_cfg, data_cfg, rt.device, ref_model)
    t_pairs = time.perf_counter() - t0
    del ref_model

    # --- greedy generations on the held-out questions, scored against the grounded ground truth ---------------
    prompts = [r["prompt"] for r in qrecords]
    gens = generate_responses(model, tok, prompts, max_new_tokens, data_cfg.system_prompt, batch_size)
    graph = corpus_graph(data_cfg.corpus) if data_cfg.corpus == "ontology" or Path(data_cfg.corpus).exists() else None
    rows = score_answers([g["response"] for g in gens["rows"]], qrecords, graph)
    for r, g in zip(rows, gens["rows"]):
        r["response_tokens"] = g["n_tokens"]
    gm = summarize_answers(rows)
    gm.update(tokens_per_s=gens["tokens_per_s"], response_tokens=_mean([g["n_tokens"] for g in gens["rows"]]),
              truncated_rate=_mean([float(g["n_tokens"] >= max_new_tokens) for g in gens["rows"]]))

    # --- optional LLM judge ------------------------------------------------------------------------------------
    jm = None
    if judge_url is not None:
        judge = Judge(judge_url, judge_model)
        baseline = None
        if baseline_run is not None:
            del model
            bmodel, btok = _load(run_model_source(baseline_run, base_model), rt.device, "baseline model")
            bgen = generate_responses(bmodel, btok, prompts, max_new_tokens, data_cfg.system_prompt, batch_size)
            baseline = [g["response"] for g in bgen["rows"]]
            for r, b in zip(rows, baseline):
                r["baseline_response"] = b
            del bmodel
        jm = judge_answers(judge, rows, baseline)
        jm["baseline"] = None if baseline_run is None else str(baseline_run)

    metrics = {**{k: v for k, v in pm.items() if k not in ("margins", "n_pairs", "dropped")}, **gm}
    if jm is not None:
        metrics.update({f"judge_{k}": jm[k] for k in (*RUBRIC_KEYS, "win_rate") if k in jm})
    result = {
        "run": str(run_dir), "model": source, "stage": cfg.get("stage"), "loss": loss_cfg.name,
        "reference": ref_source, "heldout": held_desc, "questions": str(questions) if questions else held_desc,
        "n_questions": len(rows),
        "max_new_tokens": max_new_tokens, "metrics": metrics,
        "pairs": {"n": pm["n_pairs"], "dropped": pm["dropped"], "margins": pm["margins"]},
        "judge": jm, "samples": rows,
        "timing": {"pairs_s": round(t_pairs, 2), "generation_s": round(gens["seconds"], 2),
                   "total_s": round(time.perf_counter() - t_start, 2)},
        "git": git_hash(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
        "command": command or "python -m preflexor.evaluate " + " ".join(sys.argv[1:]),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_eval(result, out / "eval.png")
    atomic_write_text(out / "eval.md", eval_markdown(result))
    atomic_write_json(out / "eval.json", result)  # last: its presence means the evaluation is complete
    return result


# -----------------------------------------------------------------------------
# Report: markdown and plots

METRIC_DOC = {
    "loss": "held-out loss with the run's own objective",
    "reward_accuracy": "fraction of held-out pairs with reward(chosen) > reward(rejected)",
    "reward_margin": "mean reward(chosen) - reward(rejected)",
    "nll_chosen": "token-mean NLL of the chosen responses (thinking + answer)",
    "logp_accuracy": "fraction of pairs with mean log-prob(chosen) > mean log-prob(rejected) (no reference, no loss)",
    "format_rate": "well-formed `<|thinking|>…<|/thinking|>` + non-empty answer (greedy)",
    "opens_thinking_rate": "responses that open with `<|thinking|>`",
    "token_f1": "token F1 of the answer vs the grounded reference answer",
    "rouge_l": "ROUGE-L F1 of the answer vs the reference answer",
    "concept_recall": "key concepts (focus, its is_a parents, question concepts) named in the answer",
    "answer_words": "words in the answer (after `<|/thinking|>`)",
    "response_tokens": "generated tokens per response",
    "truncated_rate": "responses that hit max_new_tokens",
    "tokens_per_s": "generated tokens per second (batched greedy)",
}


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _clip(text: str, n: int = 300) -> str:
    text = " ".join((text or "").split()).replace("|", "\\|")
    return text if len(text) <= n else text[:n] + " …"


def eval_markdown(result: dict) -> str:
    m = result["metrics"]
    lines = [f"# Evaluation of `{result['run']}`", "",
             f"- model: `{result['model']}` (stage {result['stage']}, loss `{result['loss']}`"
             + (f", reference `{result['reference']}`)" if result["reference"] else ")"),
             f"- held-out pairs: {result['heldout']} ({result['pairs']['n']} pairs); questions: {result['questions']} "
             f"({result['n_questions']} answered greedily, max {result['max_new_tokens']} new tokens)",
             f"- command: `{result['command']}`", f"- commit {result['git']}, {result['date']}, "
             f"{result['machine']['cpu']} ({result['machine']['cores']} cores), torch {result['machine']['torch']}; "
             f"took {result['timing']['total_s']:.0f} s", "", "![plots](eval.png)", "",
             "| metric | value | meaning |", "|---|---|---|"]
    for k, v in m.items():
        lines.append(f"| {k} | {_fmt(v)} | {METRIC_DOC.get(k, 'LLM judge' if k.startswith('judge_') else '')} |")
    j = result.get("judge")
    if j:
        lines += ["", f"Judge: `{j['model']}` at {j['url']}; rubric 1-10 means: accuracy {_fmt(j['accuracy'])}, "
                  f"depth {_fmt(j['depth'])}, coherence {_fmt(j['coherence'])} ({j['unparsed_scores']} replies with a "
                  f"missing score)."]
        if j.get("baseline"):
            lines.append(f"Pairwise vs `{j['baseline']}` (both orders, ties = 1/2): win rate {_fmt(j['win_rate'])}, "
                         f"orders agreeing {_fmt(j['position_consistency'])}, unparsed {j['unparsed_pairs']}.")
    lines += ["", "## Answers", ""]
    for i, r in enumerate(result["samples"], 1):
        lines += [f"**{i}. {_clip(r['question'], 200)}**", "",
                  f"- scores: F1 {r['token_f1']:.3f}, ROUGE-L {r['rouge_l']:.3f}, concept recall "
                  f"{_fmt(r['concept_recall'])} of {r['key_concepts']}, well formed: {r['well_formed']}"
                  + (f" ({r['issue']})" if r["issue"] else ""),
                  f"- reference: {_clip(r['reference'])}", f"- answer: {_clip(r['answer'])}",
                  f"- response: {_clip(r['response'], 400)}", ""]
    return "\n".join(lines) + "\n"


def plot_eval(result: dict, path: Path) -> None:
    """Rates in [0, 1], held-out reward margins, and per-question answer quality against answer length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, rows = result["metrics"], result["samples"]
    rates = [k for k in ("format_rate", "opens_thinking_rate", "token_f1", "rouge_l", "concept_recall",
                         "reward_accuracy", "logp_accuracy") if m.get(k) is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].barh(rates, [m[k] for k in rates], color="tab:blue")
    axes[0].set_xlim(0, 1)
    axes[0].set_title("rates (0-1)", fontsize=9)
    axes[0].tick_params(labelsize=8)
    margins = result["pairs"]["margins"]
    axes[1].hist(margins, bins=min(20, max(5, len(margins))), color="tab:green")
    axes[1].axvline(0, color="k", lw=0.8)
    axes[1].set_title(f"held-out reward margins ({result['loss']})", fontsize=9)
    axes[2].scatter([r["answer_words"] for r in rows], [r["token_f1"] for r in rows], label="token F1", s=14)
    axes[2].scatter([r["answer_words"] for r in rows], [r["rouge_l"] for r in rows], label="ROUGE-L", s=14, marker="x")
    axes[2].set_xlabel("answer words", fontsize=8)
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=7)
    axes[2].set_title("per-question answer quality", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['run']}", fontsize=9)
    fig.tight_layout()
    from preflexor.utils import save_png

    save_png(fig, path)
    plt.close(fig)


# -----------------------------------------------------------------------------
# CLI

@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Evaluate a PRefLexOR run (or the base model) on held-out data.")
    ap.add_argument("run", help="a run directory (runs/stage1, runs/stage2, ...) or 'base'")
    ap.add_argument("--n", type=int, default=16, help="held-out questions answered greedily (default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--questions", help="JSONL of pairs whose questions are answered (default: the held-out pairs)")
    ap.add_argument("--heldout", help="JSONL of held-out pairs for the reward metrics (default: the run's own)")
    ap.add_argument("--judge-url", help="OpenAI-compatible endpoint of an LLM judge (e.g. http://127.0.0.1:8000/v1)")
    ap.add_argument("--judge-model", default="default")
    ap.add_argument("--baseline", help="run dir or 'base': pairwise win rate against its answers (needs --judge-url)")
    ap.add_argument("--base-model", default=None, help="the base model of 'base' (default smollm2-135m-instruct)")
    ap.add_argument("--out", help="output directory (default: the run directory)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    cmd = "python -m preflexor.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    res = evaluate_run(args.run, args.n, args.max_new_tokens, args.judge_url, args.baseline, args.out, args.heldout,
                       args.questions, args.judge_model, args.base_model, args.device, args.batch_size, cmd)
    out = Path(args.out or args.run)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res["metrics"].items()}))
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'}, {out / 'eval.png'}")
    return res


if __name__ == "__main__":
    main()
