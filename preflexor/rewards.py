"""Stage-3 rewards: small functions of G sampled responses to one question, each returning [G] floats.

Every reward but the judge is computed exactly, offline, from the task and the knowledge graph (no judge's opinion):
- `correctness`: 1 when the answer's first line is the gold answer (`tasks.check`, the evaluation's own check);
- `thinking_format`: 1 when the response is one closed thinking block and a non-empty answer (`split_thinking`);
- `factuality`: the share of the thinking's stated is-a relations that are true in the graph
  (`tasks.RelationChecker`; 0 when it states none);
- `overlong`: DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476), 0 up to
  `budget - buffer` tokens, falling linearly to -1 at the budget, -1 for a response cut by the budget;
- `judge`: an OpenAI-compatible judge's 1-10 accuracy score mapped to [0, 1] (`metrics.Judge`), for real runs.

`score` weighs them (the `rl.reward_<name>` config keys; a weight of 0 skips the reward) and returns the total and
each one, so train_rl.py logs them separately.
"""
from __future__ import annotations

from typing import Sequence

from preflexor.tasks import check
from preflexor.thinking import final_answer, split_thinking

NAMES = ("correct", "format", "factuality", "overlong", "judge")


def correctness(texts: Sequence[str], gold: str) -> list[float]:
    return [float(check(final_answer(t, keep_lines=True), gold)) for t in texts]


def thinking_format(texts: Sequence[str]) -> list[float]:
    return [float(split_thinking(t)["well_formed"]) for t in texts]


def factuality(texts: Sequence[str], checker) -> list[float]:
    out = []
    for t in texts:
        true, stated = checker.factuality(split_thinking(t)["thinking"] or "")
        out.append(true / stated if stated else 0.0)
    return out


def overlong(lengths: Sequence[int], truncated: Sequence[bool], budget: int, buffer: int) -> list[float]:
    """0 for |y| <= budget - buffer, (budget - buffer - |y|) / buffer above it, -1 for a response the budget cut."""
    if not 0 < buffer < budget:
        raise ValueError(f"overlong: buffer must be in (0, budget={budget}), got {buffer}")
    start = budget - buffer
    return [-1.0 if cut else min(0.0, (start - n) / buffer) for n, cut in zip(lengths, truncated)]


def judged(texts: Sequence[str], question: str, gold: str, judge) -> list[float]:
    """The judge's accuracy score (1-10) of each answer against the gold answer, mapped to [0, 1]; 0 when it gives
    none (an unparsable reply)."""
    out = []
    for t in texts:
        s = judge.score(question, gold, final_answer(t)).get("accuracy")
        out.append(0.0 if s is None else (min(max(float(s), 1.0), 10.0) - 1.0) / 9.0)
    return out


def score(texts: Sequence[str], record: dict, weights: dict[str, float], *, lengths: Sequence[int],
          truncated: Sequence[bool], budget: int, overlong_buffer: int, checker=None,
          judge=None) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total [G] and each reward with a non-zero weight [G] for one question's responses.
    `record` is a `tasks` example (meta.answer, meta.question); `checker` a RelationChecker (factuality); `judge` a
    `metrics.Judge` (the judge reward)."""
    unknown = set(weights) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown rewards {sorted(unknown)}; choose from {NAMES}")
    gold = record["meta"]["answer"]
    parts: dict[str, list[float]] = {}
    for name, w in weights.items():
        if w == 0.0:
            continue
        if name == "correct":
            parts[name] = correctness(texts, gold)
        elif name == "format":
            parts[name] = thinking_format(texts)
        elif name == "factuality":
            if checker is None:
                raise ValueError("the factuality reward needs a RelationChecker")
            parts[name] = factuality(texts, checker)
        elif name == "overlong":
            parts[name] = overlong(lengths, truncated, budget, overlong_buffer)
        else:
            if judge is None:
                raise ValueError("the judge reward needs a judge (rl.judge_url)")
            parts[name] = judged(texts, record["meta"]["question"], gold, judge)
    total = [sum(weights[k] * v[i] for k, v in parts.items()) for i in range(len(texts))]
    return total, parts
