"""Metrics: the training log (metrics.jsonl + curves), the thinking-format rate of greedy answers, answer quality
against the grounded reference (token F1, ROUGE-L, key-concept recall), and an LLM judge's rubric and pairwise
verdicts (any OpenAI-compatible endpoint), parsed robustly. A response is well formed (thinking.py) when it opens with
one `<|thinking|>…<|/thinking|>` block (leading whitespace allowed), has no further thinking delimiters, and is
followed by a non-empty answer.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from preflexor.client import ChatClient
from preflexor.corpus import load_corpus
from preflexor.errors import UserError
from preflexor.graph import IS_A, KnowledgeGraph
from preflexor.runtime import shard_map
from preflexor.sampler import generate_ex
from preflexor.thinking import (THINK_START, TRIGGER, AnswerWatch, FormatWatch, final_answer, split_thinking,
                                strip_tags, thinking_prefix)
from preflexor.utils import append_jsonl, atomic_write, atomic_write_text, save_png

_WORD = re.compile(r"[^\W_]+")  # letters and digits; punctuation and underscores separate words


METRIC_DOC = {
    "loss": "held-out loss with the run's own objective",
    "rewards/accuracies": "fraction of held-out pairs with reward(chosen) > reward(rejected)",
    "rewards/margins": "mean reward(chosen) - reward(rejected)",
    "rewards/chosen": "mean reward of the chosen responses", "rewards/rejected": "mean reward of the rejected ones",
    "logps/chosen": "mean log-prob of the chosen responses as the loss sees them (its mask, sum or mean)",
    "logps/rejected": "the same for the rejected responses",
    "nll": "token-mean NLL of the chosen responses (thinking + answer)",
    "logps/accuracies":
        "fraction of pairs with mean log-prob(chosen) > mean log-prob(rejected) (no reference, no loss)",
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


# -- The training log --------------------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl` (floats rounded to 6 digits)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            append_jsonl(self.path, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> int:
        """Keep the lines up to optimizer step `step` and rewrite the file atomically: a resumed run logs the steps
        after its checkpoint again (a kill after a step's line but before its checkpoint would log it twice), and a
        line torn by a kill goes too. Returns how many lines were dropped (the file is untouched when none)."""
        if not self.enabled or not self.path.exists():
            return 0
        keep, dropped = [], 0
        for raw in self.path.read_bytes().splitlines(keepends=True):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:  # torn by a kill during the append (or not UTF-8)
                rec = None
            if isinstance(rec, dict) and not (isinstance(rec.get("step"), int) and rec["step"] > step):
                keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                dropped += 1
        if dropped:
            atomic_write(self.path, lambda f: f.writelines(keep), binary=True)
        return dropped


def plot_metrics(records: list[dict], out_png: Path, keys: tuple[str, ...] = (
        "loss", "nll", "rewards/margins", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins")):
    """One panel per metric against the optimizer step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in r for r in records)]
    if not present:
        return
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, k in zip(axes[0], present):
        pts = [(r["step"], r[k]) for r in records if k in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, out_png, dpi=110)
    plt.close(fig)


# -- Thinking format of greedy answers ---------------------------------------------------------------------------------

def question_prompt_ids(tok, question: str, system: str | None = None) -> list[int]:
    """Chat-formatted prompt ids for a question (the thinking trigger is part of the stored prompt)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tok.encode_chat(messages, add_generation_prompt=True, allow_special=True)


@torch.no_grad()
def format_rate(model, tok, prompts: list[str], max_new_tokens: int = 128, system: str | None = None,
                batch_size: int = 8, rt=None) -> dict:
    """Greedy answers to `prompts` (already carrying the trigger); the fraction that is well formed, with samples.

    A row stops as soon as it cannot be well formed any more (its first non-blank text is not `<|thinking|>`, or it
    opens a second thinking block), so an untrained model's long answers cost one step instead of a full budget.
    Those samples are cut there ("stopped early"). Under torchrun (`rt`) each rank answers its share of the prompts
    and every rank gets all the rows (a collective: every rank calls it)."""
    def answer(ps: list[str]) -> list:
        g = generate_responses(model, tok, ps, max_new_tokens, system, batch_size, stop_when_malformed=True)
        return [{**row, "seconds": g["seconds"]} for row in g["rows"]]

    rows = shard_map(answer, list(prompts), rt) if rt is not None else answer(list(prompts))
    seconds = max((r["seconds"] for r in rows), default=0.0)
    gens = {"rows": rows, "tokens_per_s": sum(r["n_tokens"] for r in rows) / seconds if seconds > 0 else 0.0}
    texts = [g["response"] for g in gens["rows"]]
    parsed = [split_thinking(t) for t in texts]
    ok = sum(p["well_formed"] for p in parsed)
    opened = sum(t.lstrip().startswith(THINK_START) for t in texts)
    return {"format_rate": ok / max(len(texts), 1), "opens_thinking_rate": opened / max(len(texts), 1),
            "n": len(texts), "tokens_per_s": gens["tokens_per_s"],
            "samples": [{"prompt": p, "response": t, "issue": q["issue"], "stopped_early": g["stopped_early"]}
                        for p, t, q, g in zip(prompts, texts, parsed, gens["rows"])]}


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of `values` (resampled `n` times, a fixed seed)."""
    if not values:
        return [float("nan"), float("nan")]
    t = torch.tensor([float(v) for v in values])
    idx = torch.randint(0, len(t), (n, len(t)), generator=torch.Generator().manual_seed(seed))
    means = t[idx].mean(dim=1).sort().values
    lo, hi = int((1 - level) / 2 * n), int((1 + level) / 2 * n) - 1
    return [round(float(means[lo]), 4), round(float(means[hi]), 4)]


def paired_delta(before: dict, after: dict) -> dict:
    """Accuracy difference of two `answer_accuracy` results on the same questions (after - before), with a paired
    bootstrap 95% interval (questions resampled together): the test of whether a stage changed accuracy."""
    d = [float(b["correct"]) - float(a["correct"]) for a, b in zip(before["samples"], after["samples"])]
    if len(d) != before["n"] or len(d) != after["n"]:
        raise ValueError("paired_delta needs two evaluations of the same questions")
    return {"delta": round(_mean(d), 4), "ci95": bootstrap_ci(d)}


def answer_change(before: dict, after: dict, delta: dict) -> str:
    """One line for a training run's log: held-out exact accuracy before -> after with intervals, the paired
    difference, and the format and truncated rates."""
    return (f"held-out exact accuracy: before {before['exact_accuracy']:.3f} {before['ci95']} -> after "
            f"{after['exact_accuracy']:.3f} {after['ci95']} (n {after['n']}; paired difference {delta['delta']:+.3f} "
            f"{delta['ci95']}); format {before['format_rate']:.2f} -> {after['format_rate']:.2f}, truncated "
            f"{before['truncated_rate']:.2f} -> {after['truncated_rate']:.2f}")


def answer_accuracy(model, tok, prompts: list[str], golds: list[str], max_new_tokens: int,
                    system: str | None = None, batch_size: int = 16, rt=None, checker=None) -> dict:
    """Exact-answer accuracy of greedy responses (the first line of the text after the thinking, `tasks.check`
    against the gold answer) with a bootstrap 95% interval, plus the format, opens-thinking and truncated rates of the
    same responses and, with a `tasks.RelationChecker`, the thinking's factuality (true / stated is-a relations over
    all answers). A response is generated until its answer's first line is complete (`thinking.AnswerWatch`), the
    end of its turn, or `max_new_tokens` (truncated: no complete answer line within the budget); a model that answers
    without thinking is scored on its answer. Under torchrun each rank answers its share."""
    from preflexor.tasks import check

    def answer(ps: list[str]) -> list:
        return generate_responses(model, tok, ps, max_new_tokens, system, batch_size, desc="answers",
                                  stop_when_answered=True)["rows"]

    rows = shard_map(answer, list(prompts), rt) if rt is not None else answer(list(prompts))
    texts = [r["response"] for r in rows]
    ok = [float(check(final_answer(t, keep_lines=True), g)) for t, g in zip(texts, golds)]
    return {"exact_accuracy": sum(ok) / max(len(ok), 1), "ci95": bootstrap_ci(ok), "n": len(ok),
            "format_rate": _mean([float(split_thinking(t)["well_formed"]) for t in texts]),
            "opens_thinking_rate": _mean([float(t.lstrip().startswith(THINK_START)) for t in texts]),
            "truncated_rate": _mean([float(r["n_tokens"] >= max_new_tokens and not r["stopped_early"]) for r in rows]),
            "factuality": _factuality(checker, texts),
            "samples": [{"prompt": p, "response": t, "gold": g, "correct": bool(c)}
                        for p, t, g, c in zip(prompts, texts, golds, ok)]}


ANSWER_EVAL_FILE = "answers_eval.json"


def answer_eval_key(prompts: list[str], golds: list[str], max_new_tokens: int, system: str | None) -> str:
    """What an answer evaluation depends on besides the weights: the questions, gold answers, budget, system."""
    import hashlib

    return hashlib.sha256(json.dumps([prompts, golds, max_new_tokens, system]).encode()).hexdigest()[:16]


def _weights_stamp(model_dir: Path) -> list | None:
    files = sorted(model_dir.glob("model*.safetensors"))
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files] or None


def save_answer_eval(model_dir: str | Path, key: str, result: dict) -> None:
    """Keep a saved model's answer evaluation beside its weights, so the next stage's "before" is read, not redone
    (`load_answer_eval`)."""
    model_dir = Path(model_dir)
    atomic_write_text(model_dir / ANSWER_EVAL_FILE, json.dumps(
        {"key": key, "weights": _weights_stamp(model_dir), "result": result}, ensure_ascii=False))


def load_answer_eval(model_dir: str | Path, key: str) -> dict | None:
    """The evaluation `save_answer_eval` kept for these weights and this key, else None (another set, budget or
    system prompt; weights rewritten since; not a model directory we wrote)."""
    p = Path(model_dir) / ANSWER_EVAL_FILE
    try:
        saved = json.loads(p.read_text(encoding="utf-8"))
        ok = saved["key"] == key and saved["weights"] == _weights_stamp(Path(model_dir))
        return saved["result"] if ok and saved["weights"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def graded_accuracy(model, tok, examples: list[dict], max_new_tokens: int, system: str | None = None, rt=None,
                    checker=None, reuse_from: str | None = None, batch_size: int = 64) -> dict | None:
    """`answer_accuracy` on `tasks` records (prompt, meta.answer), None for none; the result carries its `key`
    (`answer_eval_key`) so it can be kept (`save_answer_eval`). `reuse_from`: a model directory whose kept evaluation
    of the same key is returned instead, e.g. the "after" of the run that saved the model; for the embedded base
    model (its name) the evaluation is computed once and kept in its cache directory."""
    if not examples:
        return None
    from preflexor.checkpoint import DEFAULT_MODEL, default_model_dir

    keep = reuse_from == DEFAULT_MODEL  # the embedded base model lives in our cache: its evaluation is kept there
    if keep:
        reuse_from = str(default_model_dir())
    prompts, golds = [r["prompt"] for r in examples], [r["meta"]["answer"] for r in examples]
    key = answer_eval_key(prompts, golds, max_new_tokens, system)
    if reuse_from and (kept := load_answer_eval(reuse_from, key)):
        print(f"answer evaluation of {reuse_from}: kept from the run that saved it")
        return {**kept, "key": key}
    result = {**answer_accuracy(model, tok, prompts, golds, max_new_tokens, system, batch_size, rt, checker),
              "key": key}
    if keep and (rt is None or rt.main):
        save_answer_eval(reuse_from, key, result)
    return result


def _factuality(checker, texts: list[str]) -> float | None:
    if checker is None:
        return None
    counts = [checker.factuality(split_thinking(t)["thinking"] or "") for t in texts]
    stated = sum(n for _, n in counts)
    return round(sum(k for k, _ in counts) / stated, 4) if stated else None


def thinking_probe(model, tok, examples: list[dict], max_new_tokens: int = 48, system: str | None = None,
                   batch_size: int = 16) -> dict:
    """Does the answer follow the thinking? For each example (a `tasks` record) the answer is generated twice with a
    complete thinking block pre-filled: the correct one (chosen) and a decoy that follows a wrong path to the wrong
    answer (rejected). `follows_correct` = exact accuracy under the correct thinking, `follows_decoy` = share that
    gives the decoy's answer under the decoy, `gold_under_decoy` = share that still gives the gold answer; each with
    a bootstrap 95% interval."""
    from preflexor.tasks import check

    prompts = [r["prompt"] for r in examples]
    out = {"n": len(examples)}
    for side in ("chosen", "rejected"):
        pre = [thinking_prefix(split_thinking(r[side])["thinking"] or "") for r in examples]
        rows = generate_responses(model, tok, prompts, max_new_tokens, system, batch_size, prefixes=pre,
                                  desc=f"probe ({side} thinking)", stop_when_answered=True)["rows"]
        ans = [r["response"].strip() for r in rows]
        gold = [float(check(a, r["meta"]["answer"])) for a, r in zip(ans, examples)]
        if side == "chosen":
            out["follows_correct"], out["follows_correct_ci95"] = _mean(gold), bootstrap_ci(gold)
        else:
            decoy = [float(check(a, r["meta"]["rejected_answer"])) for a, r in zip(ans, examples)]
            out["follows_decoy"], out["follows_decoy_ci95"] = _mean(decoy), bootstrap_ci(decoy)
            out["gold_under_decoy"], out["gold_under_decoy_ci95"] = _mean(gold), bootstrap_ci(gold)
        out[f"samples_{side}"] = ans[:8]
    return out


def recursion_accuracy(model, tok, examples: list[dict], critic, rounds: int = 3, max_new_tokens: int = 384,
                       answer_tokens: int = 48, system: str | None = None, batch_size: int = 16,
                       first: list[str] | None = None) -> dict:
    """Exact accuracy of recursive reasoning against the number of answers N = 1..rounds, with and without the
    critic's integration, batched: the steps of `reasoning.recursive_thinking` (round 0 answers, then per round the
    critic's critique and rewrite of the thinking and a greedy re-answer with the rewrite pre-filled; integration of
    answers 1..N) run for all examples at once. `critic` has `critique`, `improve` and `integrate` methods
    (`reasoning.GraphCritic`); `first` = round-0 responses already generated (greedy). Also the thinking's
    factuality per round when the critic has a relation checker."""
    from preflexor.tasks import check

    prompts, golds = [r["prompt"] for r in examples], [r["meta"]["answer"] for r in examples]
    if first is None:
        first = [x["response"] for x in generate_responses(model, tok, prompts, max_new_tokens, system, batch_size,
                                                            desc="answers", stop_when_answered=True)["rows"]]
    parts = [split_thinking(t) for t in first]
    thinking = [p["thinking"] if p["thinking"] is not None else strip_tags(t) for p, t in zip(parts, first)]
    answers = [[final_answer(t, keep_lines=True)] for t in first]
    fact = []
    for n in range(1, rounds + 1):
        fact.append(_factuality(getattr(critic, "rc", None), [thinking_prefix(t) for t in thinking]))
        if n == rounds:
            break
        thinking = [critic.improve(t, critic.critique(r["meta"]["question"], t)) for t, r in zip(thinking, examples)]
        rows = generate_responses(model, tok, prompts, answer_tokens, system, batch_size,
                                  prefixes=[thinking_prefix(t) for t in thinking], desc=f"round {n + 1}",
                                  stop_when_answered=True)["rows"]
        for a, row in zip(answers, rows):
            a.append(strip_tags(row["response"]).strip())
    table, first_right = [], None
    for n in range(1, rounds + 1):
        last = [float(check(a[n - 1], g)) for a, g in zip(answers, golds)]
        merged = [float(check(critic.integrate(r["meta"]["question"], a[:n]), g))
                  for a, g, r in zip(answers, golds, examples)]
        first_right = last if first_right is None else first_right
        gain = [x - y for x, y in zip(last, first_right)]  # against N = 1 on the same questions (paired)
        table.append({"N": n, "accuracy": _mean(last), "ci95": bootstrap_ci(last), "integrated": _mean(merged),
                      "integrated_ci95": bootstrap_ci(merged), "factuality": fact[n - 1],
                      "vs_first": _mean(gain), "vs_first_ci95": bootstrap_ci(gain)})
    return {"n": len(examples), "rounds": table}


@torch.no_grad()
def generate_responses(model, tok, prompts: Sequence[str], max_new_tokens: int, system: str | None = None,
                       batch_size: int = 8, stop_when_malformed: bool = False,
                       prefixes: Sequence[str] | None = None, desc: str | None = None,
                       stop_when_answered: bool = False) -> dict:
    """Greedy responses, batched through the sampler: `{"rows": [{"response", "n_tokens", "stopped_early"}],
    "tokens_per_s", "seconds"}`. Tokens per second = generated tokens / wall time of the batched generation.
    `stop_when_malformed` ends rows that can no longer be well formed (see `format_rate`); `stop_when_answered` ends
    rows once their answer's first line is complete (`thinking.AnswerWatch`). `prefixes`: text that
    starts each assistant turn (e.g. an injected thinking block); the response is the continuation only. `desc`: a
    progress bar over the prompts under that name."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    rows, n_tokens, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", dynamic_ncols=True, disable=desc is None)
    for i in range(0, len(prompts), batch_size):
        ids = [question_prompt_ids(tok, p, system) for p in prompts[i:i + batch_size]]
        if prefixes is not None:
            ids = [x + tok.encode(f, allow_special=True) for x, f in zip(ids, prefixes[i:i + batch_size])]
        room = model.config.max_position_embeddings - max(len(x) for x in ids)
        if room < 1:
            raise UserError(f"a prompt of {max(len(x) for x in ids)} tokens does not fit the model's context")
        watch = FormatWatch(tok, len(ids)) if stop_when_malformed else \
            AnswerWatch(tok, len(ids)) if stop_when_answered else None
        res = generate_ex(model, ids, min(max_new_tokens, room), temperature=0.0, stop_ids=tok.stop_ids,
                          pad_id=tok.pad_id, on_token=watch)
        for r, o in enumerate(res.tokens):
            n_tokens += len(o[0])
            rows.append({"response": tok.decode(o[0], skip_special=True), "n_tokens": len(o[0]),
                         "stopped_early": bool(watch and watch.stopped[r])})
        bar.update(len(ids))
    bar.close()
    model.train(was_training)
    dt = time.perf_counter() - t0
    return {"rows": rows, "tokens_per_s": n_tokens / dt if dt > 0 else 0.0, "seconds": dt}


# -- Answer quality: token F1, ROUGE-L, concept recall (pure functions) ------------------------------------------------

def words(text: str) -> list[str]:
    """Lowercased word tokens (letters and digits), reasoning tags removed: the unit of F1 and ROUGE-L."""
    return _WORD.findall(strip_tags(text).lower())


def _overlap_f1(prediction: str, reference: str, overlap) -> float:
    # F = 2PR/(P+R), P = overlap / |prediction|, R = overlap / |reference|, on `words`
    p, r = words(prediction), words(reference)
    if not p or not r:
        return float(p == r)
    n = overlap(p, r)
    if n == 0:
        return 0.0
    precision, recall = n / len(p), n / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1: harmonic mean of precision and recall of the bag of words (multiset overlap).
    Two empty texts score 1, one empty text 0."""
    return _overlap_f1(prediction, reference, lambda p, r: sum((Counter(p) & Counter(r)).values()))


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
    return _overlap_f1(prediction, reference, lcs_length)


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
    hits = sum(any(f" {p} " in hay or f" {p}s " in hay for p in map(_phrase, names) if len(p) >= 3)
               for names in concepts)
    return hits / len(concepts)


def key_concepts(graph, record: dict, max_parents: int = 3) -> list[list[str]]:
    """The concepts an answer to `record`'s question should name, by the knowledge graph: the question's focus
    concept (meta.focus, written by the grounded teacher; else the first concept the question mentions), its direct
    `is_a` parents (at most `max_parents`, in graph order, as the grounded answers list them), and the other
    concepts named in the question (meta.concepts, else found in the question text). Each as [label, *synonyms]."""
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


_GRAPHS: dict[str, object] = {}


def corpus_graph(corpus: str = "ontology"):
    """The knowledge graph of a corpus (cached per process): the ground truth of the key concepts."""
    if corpus not in _GRAPHS:
        docs, chunks = load_corpus(corpus)
        _GRAPHS[corpus] = KnowledgeGraph.from_corpus(docs, chunks)
    return _GRAPHS[corpus]


# -- LLM judge (any OpenAI-compatible endpoint) ------------------------------------------------------------------------

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
    """An LLM judge behind any OpenAI-compatible `/v1/chat/completions` endpoint (client.py: retries, backoff,
    bounded concurrency). Temperature 0."""

    def __init__(self, url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 3, max_concurrency: int = 4, max_tokens: int = 256):
        self.client = ChatClient(url, model, api_key_env, timeout, max_retries, 0.5, max_concurrency)
        self.url, self.model, self.max_tokens = self.client.url, model, max_tokens

    def _ask(self, prompt: str) -> str:
        return self.client.complete([{"role": "system", "content": SYSTEM_JUDGE}, {"role": "user", "content": prompt}],
                                    0.0, self.max_tokens).text

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
