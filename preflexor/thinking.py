"""The thinking-block grammar of PRefLexOR (Buehler 2024, Sec. 2) in one place, so training data, evaluation and
recursive reasoning agree on what a response is: `<|thinking|>…<|/thinking|>` (the reflection model adds
`<|reflect|>…<|/reflect|>`), then the answer.

Two readers keep two rules because they answer different questions (the tests pin both). `split_thinking` is the
strict format check that training aims at and the format rate counts: one block at the very start, no further
thinking tags, a non-empty answer (`FormatWatch` applies it while tokens stream). `split_response` is the lenient
extraction recursive reasoning runs on: it never raises, and a missing, unclosed, repeated or empty block gets a
documented fallback and an issue (the reference indexes `[0]` into regex matches and crashes, §5.3). "The answer"
has one rule, `answer_of`: the text after the last closing tag, cut at a later opening tag; without a closing tag,
the whole text when no block was opened, else nothing. `final_answer` is that text as the metrics score it.
"""
from __future__ import annotations

import re
from typing import Sequence

THINK_START, THINK_END = "<|thinking|>", "<|/thinking|>"
REFLECT_START, REFLECT_END = "<|reflect|>", "<|/reflect|>"
OPENERS, CLOSERS = (THINK_START, REFLECT_START), (THINK_END, REFLECT_END)
TAGS = (THINK_START, THINK_END, REFLECT_START, REFLECT_END,  # the reasoning tokens (tokenizer.REASONING_TOKENS)
        "<|scratchpad|>", "<|/scratchpad|>", "<|response|>", "<|/response|>")
TRIGGER = " Use <|thinking|>."  # appended to every question (preflexor.md §1.3)
_TAG = re.compile("|".join(map(re.escape, TAGS)))


def assemble_thinking(sections: dict[str, str]) -> str:
    """`<|thinking|>\\n` + `**{Section}**:\\n\\n{content}\\n\\n` per section + `<|/thinking|>`: the chosen response's
    block (preflexor.md §2.2 step 5)."""
    return THINK_START + "\n" + "".join(f"**{name}**:\n\n{content.strip()}\n\n" for name, content in
                                        sections.items()) + THINK_END


def thinking_prefix(thinking: str) -> str:
    """The assistant-turn prefix that injects a complete thinking block (the reference's `prepend_response`), laid
    out as `assemble_thinking` lays out the trained blocks: a newline after the opening tag, a blank line before the
    closing one. (With one newline there, stage 1's model re-answering its own thinking got 18 of its 21 correct
    answers back instead of 21: the layout is part of what it learned.)"""
    return f"{THINK_START}\n{thinking.strip()}\n\n{THINK_END}"


# -- The strict format check -------------------------------------------------------------------------------------------

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


class FormatWatch:
    """`on_token` for `sampler.generate_ex`: ends a row once its text can no longer pass `split_thinking` (its first
    non-blank text is not `<|thinking|>`, or it opens a second one), so a malformed answer costs one step, not the
    budget. `stopped[row]` says whether the row was cut."""

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


class AnswerWatch:
    """`on_token` for `sampler.generate_ex`: ends a row once the first line of its answer is complete, the only line
    the exact-answer check reads (`tasks.check`). The answer starts after the first `<|/thinking|>` when the response
    opens with `<|thinking|>`, else at the first non-blank text; the line is complete at the first newline after
    non-blank answer text. A well-formed response's score is then what the whole response would score; a response
    that writes text before opening a block is read as a plain answer. `stopped[row]` says whether the row ended so."""

    def __init__(self, tok, n_rows: int):
        self.tok = tok
        self.text = [""] * n_rows
        self.stopped = [False] * n_rows

    def __call__(self, row: int, token: int) -> bool:
        self.text[row] += self.tok.decode([token])
        t = self.text[row].lstrip()
        if t.startswith(THINK_START) or (t and THINK_START.startswith(t)):
            j = t.find(THINK_END)
            if j < 0:
                return False
            t = t[j + len(THINK_END):]
        done = "\n" in t.lstrip()
        self.stopped[row] = self.stopped[row] or done
        return done


# -- The lenient extraction (never raises; every fallback is reported) -------------------------------------------------

def extract_block(text: str, start: str, end: str) -> tuple[str | None, str | None]:
    """Content of the first `start…end` block of `text` (stripped) and an issue string or None. Fallbacks, each
    reported: `start` without `end` → everything after `start` ("unclosed"); `end` without `start` → everything
    before `end`; neither → None; several blocks → the first; an empty block → ""."""
    i = text.find(start)
    if i < 0:
        j = text.find(end)
        if j < 0:
            return None, f"no {start} block"
        return text[:j].strip(), f"{end} without {start}; took the text before it"
    body_at = i + len(start)
    j = text.find(end, body_at)
    if j < 0:
        return text[body_at:].strip(), f"unclosed {start}"
    content = text[body_at:j].strip()
    if start in content:  # "<t> a <t> b </t>": the first block never closed before the second opened
        return content, f"{start} opened twice before {end}"
    if text.count(start) > 1:
        return content, f"{text.count(start)} {start} blocks; used the first"
    return content, None if content else f"empty {start} block"


def answer_after(text: str, last_tag: str | Sequence[str]) -> tuple[str | None, str | None]:
    """Text after the last occurrence of `last_tag` (or of whichever of several tags comes last), stripped, cut
    at a later opening tag (the rest belongs to an unclosed block); None with an issue when no tag occurs."""
    tags = [last_tag] if isinstance(last_tag, str) else list(last_tag)
    pos, tag = max(((text.rfind(t), t) for t in tags), key=lambda p: p[0])
    if pos < 0:
        return None, f"no {' or '.join(tags)}"
    rest = text[pos + len(tag):]
    cut = min((k for k in (rest.find(o) for o in OPENERS) if k >= 0), default=-1)
    if cut >= 0:
        return rest[:cut].strip(), f"{rest[cut:cut + 12].strip()}… after the answer is not closed; dropped it"
    return rest.strip(), None


def answer_of(text: str) -> tuple[str, list[str]]:
    """The answer of a response and its issues: the text after the last closing tag. Without any closing tag it is
    the whole text when no block was opened, else "" (the response ended inside a block)."""
    answer, issue = answer_after(text, CLOSERS)
    if answer is None:
        if any(o in text for o in OPENERS):
            return "", ["response ended inside a block; no answer"]
        answer, issue = strip_tags(text), None
    issues = [issue] if issue else []
    return answer, issues + ([] if answer else ["empty answer"])


def split_response(text: str, reflect: bool = False) -> dict:
    """`{"thinking", "reflection", "answer", "issues"}` of one model response (thinking then, for the reflection
    model, reflection, then the answer)."""
    issues: list[str] = []
    thinking, issue = extract_block(text, THINK_START, THINK_END)
    issues += [issue] if issue else []
    reflection = None
    if reflect:
        reflection, issue = extract_block(text, REFLECT_START, REFLECT_END)
        issues += [issue] if issue else []
    answer, more = answer_of(text)
    return {"thinking": thinking, "reflection": reflection, "answer": answer, "issues": issues + more}


def strip_tags(text: str) -> str:
    """`text` without any reasoning tag, stripped; a tag counts as a space (it separates words)."""
    return _TAG.sub(" ", text).strip()


def final_answer(response: str, keep_lines: bool = False) -> str:
    """The answer of a response (`answer_of`) as the answer metrics score it: tags removed, whitespace collapsed
    (`keep_lines`: only stripped, so the exact check can read its first line)."""
    answer = strip_tags(answer_of(response)[0])
    return answer.strip() if keep_lines else " ".join(answer.split())
