"""Recursive reasoning at inference time: a critic improves the model's thinking, the model re-answers, the critic
integrates the answers (PRefLexOR, Buehler 2024; preflexor.md §5).

Two variants, plain functions over two *generators* (anything with `chat(messages, temperature, max_tokens,
assistant_prefix) -> GenerationOut`: our model through the sampler, or any OpenAI-compatible endpoint):

- `recursive_thinking` (§5.1, the thinking model). Round 0: the reasoner answers the question (with the trigger
  " Use <|thinking|>.") and its `<|thinking|>…<|/thinking|>` block is extracted. Each of N-1 further rounds: the
  critic critiques the thinking, rewrites it to address the critique, and the reasoner answers again with the
  rewritten block pre-filled, so only the answer is generated. The critic integrates all N answers.
  Model calls: 1 + 3(N-1) + 1.
- `recursive_reflection` (§5.2, the thinking+reflection model). The model's own `<|reflect|>…<|/reflect|>` is the
  feedback, so there is no critique call: N iterations of (critic rewrites the thinking using the reflection,
  reasoner re-answers with it pre-filled and reflects again). As in the reference, the N re-answers (not the
  initial one) are integrated. Model calls: 1 + 2N + 1.

`integrate=False` drops the final call (the "without integration" ablation, §6 item 6) and the final answer is the
last non-empty one. Empty answers are left out of the integration, which is skipped (reported) when none is left.
Extraction (thinking.py's lenient readers) never raises: every missing, unclosed, repeated or empty block is
recorded in `ReasoningResult.issues` and the run carries on with a documented fallback.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

from preflexor.client import ChatClient
from preflexor.errors import UserError
from preflexor.sampler import generate_ex
from preflexor.thinking import (REFLECT_END, REFLECT_START, THINK_END, THINK_START, TRIGGER, answer_of, extract_block,
                                split_response, strip_tags, thinking_prefix)

# -- Prompts -----------------------------------------------------------------------------------------------------------
# Our own wording with the reference's structure (§5.1-5.2): critique of a thought process, a rewrite that implements
# the feedback but keeps the structure, an integration of all answers, each ending in a completion cue.

SYSTEM_CRITIC = "You review and improve reasoning with care and precision, and you follow instructions exactly."
SYSTEM_INTEGRATOR = ("You combine several candidate answers to a question into one coherent, detailed answer, "
                     "reasoning step by step.")

CRITIQUE_PROMPT = (
    "Below are a question and the reasoning someone wrote before answering it. Review the reasoning: point out "
    "errors, gaps, unsupported steps and missing considerations, and suggest concrete changes that would make it a "
    "more logical and better-founded basis for answering the question.\n\n"
    "Question: {question}\n\nReasoning:\n{thinking}\n\n"
    "Reply with your critique and suggestions only.\nCritique:")
IMPROVE_PROMPT = (
    "Below are a piece of reasoning and feedback on it. Rewrite the reasoning so that it takes every point of the "
    "feedback into account, keeping its overall structure (its sections and their order).\n\n"
    "Reasoning:\n{thinking}\n\nFeedback:\n{feedback}\n\n"
    "Reply with the rewritten reasoning only, with nothing before or after it.\nRewritten reasoning:")
INTEGRATE_PROMPT = (
    "Below are a question and {n} candidate answers to it.\n\nQuestion: {question}\n\n{answers}\n\n"
    "Write one final answer that brings together all the ideas in the candidates, in full detail. Do not repeat the "
    "question; start directly with the answer.\nFinal answer:")
# Used when the reasoning model wrote no reflection: the rewrite still happens (so the call count stays fixed).
NO_REFLECTION_FEEDBACK = ("(No reflection was given.) Check every step for correctness, fill in missing steps and "
                          "make the reasoning more specific to the question.")
# HTTPGenerator, prefix_mode="fold": the pre-filled thinking goes into the user turn instead of the assistant turn.
FOLD_PROMPT = ("\n\nBase your answer on the reasoning below. Do not repeat it; reply with the answer only.\n\n"
               "{prefix}")


# -- The critic's rewrite, made injectable -----------------------------------------------------------------------------
def clean_critic_thinking(text: str) -> tuple[str, str | None]:
    """The critic's rewritten thinking as plain text for re-injection: if it wrapped it in a thinking block, take
    the block; drop any stray tags (an injected block must open and close exactly once)."""
    issue = None
    if THINK_START in text or THINK_END in text:
        inner, _ = extract_block(text, THINK_START, THINK_END)
        text, issue = (inner or ""), "critic wrote thinking tags; used their content"
    cleaned = strip_tags(text)
    if issue is None and cleaned != text.strip():
        issue = "critic wrote reasoning tags; removed them"
    return cleaned, issue


# -- Generators --------------------------------------------------------------------------------------------------------
@dataclass
class GenerationOut:
    """One chat completion: the new text (continuation only, without any assistant prefix), token counts (None
    when an HTTP endpoint does not report them), wall time, and why it stopped ("stop" | "length" | None)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float
    finish_reason: str | None = None


class Generator(Protocol):
    name: str

    def chat(self, messages: list[dict], temperature: float = 0.1, max_tokens: int = 512,
             assistant_prefix: str = "") -> GenerationOut: ...


class ModelGenerator:
    """Our model through the batched sampler, chat-formatted with its tokenizer. Messages and `assistant_prefix`
    (appended after the generation prompt) are encoded with `allow_special=True`, so the trigger's `<|thinking|>` is
    the single id the model was trained on (a tokenizer without reasoning tokens keeps it as text); the returned
    text is the continuation only. Top-k/top-p as in the reference (50, 0.9); the seed advances per call, so calls
    are not copies and a run is reproducible. A prompt that fills the context raises `UserError`, else `max_tokens`
    is clipped to the room left. Generations on one model take turns under `sampler.model_lock` (in `generate_ex`).
    """

    def __init__(self, model, tok, top_k: int | None = 50, top_p: float | None = 0.9, seed: int = 0,
                 name: str = "model"):
        self.model, self.tok = model, tok
        self.top_k, self.top_p, self.seed, self.name = top_k, top_p, seed, name
        self._calls = 0
        self._seed_lock = threading.Lock()  # guards only the call counter; the model's own lock is in generate_ex

    def prompt_ids(self, messages: list[dict], assistant_prefix: str = "") -> list[int]:
        ids = self.tok.encode_chat(messages, add_generation_prompt=True, allow_special=True)
        return ids + (self.tok.encode(assistant_prefix, allow_special=True) if assistant_prefix else [])

    def chat(self, messages: list[dict], temperature: float = 0.1, max_tokens: int = 512,
             assistant_prefix: str = "") -> GenerationOut:
        t0 = time.perf_counter()
        ids = self.prompt_ids(messages, assistant_prefix)
        ctx = self.model.config.max_position_embeddings
        room = ctx - len(ids)
        if room < 1:
            raise UserError(f"prompt of {len(ids)} tokens does not fit the model's context of {ctx} tokens")
        with self._seed_lock:
            seed = self.seed + self._calls
            self._calls += 1
        res = generate_ex(self.model, [ids], min(max_tokens, room), temperature=temperature, top_k=self.top_k,
                          top_p=self.top_p, stop_ids=self.tok.stop_ids, seed=seed, pad_id=self.tok.pad_id)
        out = res.tokens[0][0]
        text = self.tok.decode(out, skip_special=True)
        return GenerationOut(text, len(ids), len(out), time.perf_counter() - t0, res.finish_reasons[0][0])


class HTTPGenerator:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint, through `client.ChatClient` (retries, backoff). With
    `prefix_mode="continue"` an assistant prefix is sent as a final assistant message with
    `"continue_final_message": true, "add_generation_prompt": false` (vLLM's and our server's way to continue a
    turn); endpoints that cannot (e.g. OpenAI) take `prefix_mode="fold"`: the prefix goes into the last user message
    with `FOLD_PROMPT`. Token counts come from the response's `usage` when present.
    """

    def __init__(self, base_url: str, model: str = "default", prefix_mode: str = "continue",
                 timeout: float = 300.0, max_retries: int = 3, api_key_env: str = "OPENAI_API_KEY",
                 name: str | None = None):
        if prefix_mode not in ("continue", "fold"):
            raise UserError(f"prefix_mode must be 'continue' or 'fold', got {prefix_mode!r}")
        self.prefix_mode = prefix_mode
        self.name = name or base_url
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries)
        self.url = self.client.url

    def chat(self, messages: list[dict], temperature: float = 0.1, max_tokens: int = 512,
             assistant_prefix: str = "") -> GenerationOut:
        t0 = time.perf_counter()
        extra: dict = {}
        messages = [dict(m) for m in messages]
        if assistant_prefix and self.prefix_mode == "continue":
            messages.append({"role": "assistant", "content": assistant_prefix})
            extra = {"continue_final_message": True, "add_generation_prompt": False}
        elif assistant_prefix:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
            messages[last_user]["content"] += FOLD_PROMPT.format(prefix=assistant_prefix)
        out = self.client.complete(messages, temperature, max_tokens, extra)
        return GenerationOut(out.text, out.usage.get("prompt_tokens"), out.usage.get("completion_tokens"),
                             time.perf_counter() - t0, out.finish_reason)


# -- Results -----------------------------------------------------------------------------------------------------------
@dataclass
class Call:
    """One model call of a run: who made it, for which step and round, and its cost."""

    role: str  # "reasoner" | "critic"
    step: str  # "answer" | "critique" | "improve" | "reanswer" | "integrate"
    round: int
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float
    finish_reason: str | None = None


@dataclass
class Round:
    """One answer of the reasoner. `thinking` is the block it answered with (generated in round 0, injected after);
    `feedback` is what the critic used to write that thinking (its critique, or the model's previous reflection)."""

    index: int
    thinking: str | None
    answer: str
    response: str  # the reasoner's full turn: injected prefix + generated continuation
    feedback: str | None = None
    reflection: str | None = None  # the reasoner's own reflection in this turn (reflection variant)
    integrated: bool = True  # whether this answer goes into the integration


@dataclass
class ReasoningResult:
    question: str
    variant: str  # "thinking" | "reflection"
    n_rounds: int
    rounds: list[Round] = field(default_factory=list)
    integrated_answer: str | None = None
    final_answer: str = ""
    issues: list[dict] = field(default_factory=list)  # {"round", "step", "issue"}
    calls: list[Call] = field(default_factory=list)

    @property
    def n_calls(self) -> int:
        return len(self.calls)

    @property
    def answers(self) -> list[str]:
        return [r.answer for r in self.rounds]

    @property
    def thinking_versions(self) -> list[str | None]:
        return [r.thinking for r in self.rounds]

    def to_dict(self) -> dict:
        d = asdict(self)
        tok = lambda k: sum(getattr(c, k) or 0 for c in self.calls)  # noqa: E731
        d.update(n_calls=self.n_calls, answers=self.answers, thinking_versions=self.thinking_versions,
                 prompt_tokens=tok("prompt_tokens"), completion_tokens=tok("completion_tokens"),
                 seconds=round(sum(c.seconds for c in self.calls), 4))
        return d


OnStep = Callable[[str, int, str], None]  # (what, round, text): "thinking", "critique", "answer", ...


class _Run:
    """Bookkeeping shared by both variants: calls, issues, and the optional progress callback."""

    def __init__(self, result: ReasoningResult, on_step: OnStep | None):
        self.result, self.on_step = result, on_step

    def call(self, gen: Generator, role: str, step: str, rnd: int, messages: list[dict], temperature: float,
             max_tokens: int, prefix: str = "") -> GenerationOut:
        out = gen.chat(messages, temperature=temperature, max_tokens=max_tokens, assistant_prefix=prefix)
        self.result.calls.append(Call(role, step, rnd, out.prompt_tokens, out.completion_tokens,
                                      round(out.seconds, 4), out.finish_reason))
        if out.finish_reason == "length":
            self.issue(rnd, step, f"hit max_tokens={max_tokens}; the text is cut off")
        return out

    def issue(self, rnd: int, step: str, text: str | None) -> None:
        if text:
            self.result.issues.append({"round": rnd, "step": step, "issue": text})

    def show(self, what: str, rnd: int, text: str | None) -> None:
        if self.on_step is not None and text is not None:
            self.on_step(what, rnd, text)


class GraphCritic:
    """An offline critic grounded in the knowledge graph (`--critic graph`): the critique lists every is-a statement
    of the thinking that the graph does not support, with the concept's true parents; the rewrite replaces those
    lines (a false relation gets a true parent, preferring one the thinking mentions; a false conclusion is negated;
    an unknown concept's line is dropped) and keeps every other line; the integration is the most frequent first
    answer line (the latest at a tie). It answers the critic prompts of this module through `chat`, so it drops into
    `recursive_thinking` / `recursive_reflection` unchanged; the same steps are plain methods for batched use."""

    name = "graph"

    def __init__(self, graph):
        from preflexor.tasks import RelationChecker

        self.rc = graph if isinstance(graph, RelationChecker) else RelationChecker(graph)

    def _wrong(self, thinking: str) -> list[dict]:
        from preflexor.tasks import stated_relations

        return [r for r in stated_relations(thinking) if not self.rc.true(r)]

    def critique(self, question: str, thinking: str) -> str:
        wrong = self._wrong(thinking)
        if not wrong:
            return "Every stated is-a relation is true in the knowledge graph."
        out = []
        for r in wrong:
            stated = f"{r['child']} is {'not ' * r['negated']}a kind of {r['parent']}"
            if self.rc.holds(r["child"], r["parent"]) is None:
                why = "a concept of it is not in the knowledge graph"
            elif r["negated"]:
                why = f"{r['child']} is a kind of {r['parent']}"
            else:
                why = f"{r['child']} is a kind of {', '.join(self.rc.parents(r['child'])) or 'nothing recorded'}"
            out.append(f"- line {r['line'] + 1}: \"{stated}\" is false in the knowledge graph: {why}.")
        return "False steps:\n" + "\n".join(out)

    def improve(self, thinking: str, feedback: str = "") -> str:
        """The thinking with every unsupported is-a line rewritten (the check is redone here, not read from the
        feedback, so any critique text works)."""
        lines = thinking.splitlines()
        for r in reversed(self._wrong(thinking)):
            line, i = lines[r["line"]], r["line"]
            known = self.rc.holds(r["child"], r["parent"]) is not None
            parents = self.rc.parents(r["child"])
            if r["negated"] and known:  # "X is not a kind of Y" where it is
                lines[i] = re.sub(r"\bis not a kind of\b", "is a kind of", line, count=1)
            elif known and re.match(r"^\s*(\d+\.\s*)?So\b", line):  # a false conclusion: negate it
                lines[i] = re.sub(r"\bis a kind of\b", "is not a kind of", line, count=1)
            elif known and parents:  # a false relation: a true parent instead, one the thinking mentions if any
                p = next((x for x in parents if x.lower() in thinking.lower()), parents[0])
                lines[i] = (f"[{r['child']}] -[is_a]-> [{p}]" if line.lstrip().startswith("[")
                            else re.sub(r"is a kind of .*$", f"is a kind of {p}.", line, count=1))
            else:
                lines[i] = None
        return "\n".join(x for x in lines if x is not None)

    @staticmethod
    def integrate(question: str, answers: list[str]) -> str:
        firsts = [a.strip().splitlines()[0].strip() for a in answers if a.strip()]
        if not firsts:
            return ""
        counts = {}
        for k, a in enumerate(firsts):
            key = " ".join(re.sub(r"[^\w]+", " ", a).lower().split())
            counts[key] = (counts.get(key, (0, 0, a))[0] + 1, k, a)
        return max(counts.values())[2]

    def chat(self, messages: list[dict], temperature: float = 0.1, max_tokens: int = 512,
             assistant_prefix: str = "") -> GenerationOut:
        t0, user = time.perf_counter(), messages[-1]["content"]
        if m := _CRITIQUE_RE.search(user):
            text = self.critique(m["question"], m["thinking"])
        elif m := _IMPROVE_RE.search(user):
            text = self.improve(m["thinking"], m["feedback"])
        elif m := _INTEGRATE_RE.search(user):
            text = self.integrate(m["question"], _CANDIDATE_RE.findall(m["answers"]))
        else:
            raise UserError("the graph critic answers only the critique, rewrite and integration prompts")
        return GenerationOut(text, 0, 0, time.perf_counter() - t0, "stop")


def _template_re(template: str, **groups: str) -> re.Pattern:
    """A regex matching `template` with its {fields} captured (named groups); the rest is literal."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{groups.get(p, '.*?')})"
                              for k, p in enumerate(parts)) + "$", re.DOTALL)


_CRITIQUE_RE = _template_re(CRITIQUE_PROMPT)
_IMPROVE_RE = _template_re(IMPROVE_PROMPT)
_INTEGRATE_RE = _template_re(INTEGRATE_PROMPT, n=r"\d+")
_CANDIDATE_RE = re.compile(r"Candidate answer \d+:\n(.*?)(?=\n\nCandidate answer \d+:\n|\Z)", re.DOTALL)


def _question_messages(question: str, system: str | None) -> list[dict]:
    q = question if question.rstrip().endswith(TRIGGER.strip()) else question.rstrip() + TRIGGER
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]


def _critic_messages(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _integrate(run: _Run, question: str, critic: Generator, temperature: float, max_tokens: int) -> None:
    res = run.result
    at = len(res.rounds)
    answers = [r.answer for r in res.rounds if r.integrated and r.answer.strip()]
    skipped = sum(r.integrated for r in res.rounds) - len(answers)
    if skipped:
        run.issue(at, "integrate", f"{skipped} empty answer(s) left out of the integration")
    if not answers:
        run.issue(at, "integrate", "no non-empty answer to integrate; skipped the integration call")
        return
    block = "\n\n".join(f"Candidate answer {i}:\n{a}" for i, a in enumerate(answers, 1))
    prompt = INTEGRATE_PROMPT.format(n=len(answers), question=question, answers=block)
    out = run.call(critic, "critic", "integrate", at, _critic_messages(SYSTEM_INTEGRATOR, prompt),
                   temperature, max_tokens)
    res.integrated_answer = strip_tags(out.text)
    if not res.integrated_answer:
        run.issue(at, "integrate", "critic returned an empty integration; final answer = last non-empty answer")
    run.show("integrated answer", at, res.integrated_answer)


def _finish(res: ReasoningResult) -> ReasoningResult:
    """Final answer: the integration, else the last non-empty answer."""
    res.final_answer = res.integrated_answer or next((r.answer for r in reversed(res.rounds) if r.answer), "")
    return res


def _rewrite_thinking(run: _Run, critic: Generator, rnd: int, thinking: str, feedback: str, temperature: float,
                      max_tokens: int) -> str:
    """The critic's improve step; an empty rewrite keeps the previous thinking (reported)."""
    out = run.call(critic, "critic", "improve", rnd,
                   _critic_messages(SYSTEM_CRITIC, IMPROVE_PROMPT.format(thinking=thinking, feedback=feedback)),
                   temperature, max_tokens)
    improved, issue = clean_critic_thinking(out.text)
    run.issue(rnd, "improve", issue)
    if not improved:
        run.issue(rnd, "improve", "critic returned an empty rewrite; kept the previous thinking")
        improved = thinking
    run.show("improved thinking", rnd, improved)
    return improved


def _first_answer(run: _Run, reasoner: Generator, messages: list[dict], reflect: bool, temperature: float,
                  max_tokens: int, open_thinking: bool, for_critic: bool) -> Round:
    prefix = THINK_START if open_thinking else ""
    out = run.call(reasoner, "reasoner", "answer", 0, messages, temperature, max_tokens, prefix)
    text = prefix + out.text
    parts = split_response(text, reflect=reflect)
    thinking = parts["thinking"]
    for i in parts["issues"]:
        if for_critic and thinking is None and i == f"no {THINK_START} block":  # the critic needs something
            i = f"{i}; the critic works on the whole response"
        run.issue(0, "answer", i)
    if thinking is None and for_critic:
        thinking = strip_tags(text)
    rnd = Round(0, thinking, parts["answer"], text, reflection=parts["reflection"])
    run.show("thinking", 0, "(no thinking block)" if rnd.thinking is None else rnd.thinking)
    if reflect:
        run.show("reflection", 0, rnd.reflection)
    run.show("answer", 0, rnd.answer)
    return rnd


def _reanswer(run: _Run, reasoner: Generator, messages: list[dict], rnd_index: int, thinking: str, feedback: str,
              reflect: bool, temperature: float, max_tokens: int) -> Round:
    """Answer again with `thinking` injected as a complete block at the start of the assistant turn."""
    prefix = thinking_prefix(thinking)
    out = run.call(reasoner, "reasoner", "reanswer", rnd_index, messages, temperature, max_tokens, prefix)
    cont = out.text
    if THINK_START in cont or THINK_END in cont:
        run.issue(rnd_index, "reanswer", "the model wrote thinking tags after the injected block")
    reflection = None
    if reflect:
        reflection, issue = extract_block(cont, REFLECT_START, REFLECT_END)
        run.issue(rnd_index, "reanswer", issue)
    answer, issues = answer_of(cont)
    for i in issues:
        run.issue(rnd_index, "reanswer", i)
    rnd = Round(rnd_index, thinking, answer, prefix + cont, feedback=feedback, reflection=reflection)
    if reflect:
        run.show("reflection", rnd_index, reflection)
    run.show("answer", rnd_index, answer)
    return rnd


# -- The two variants --------------------------------------------------------------------------------------------------
def recursive_thinking(question: str, reasoner: Generator, critic: Generator | None, n_rounds: int = 3,
                       integrate: bool = True, temperature: float = 0.1, critic_temperature: float = 0.1,
                       max_new_tokens: int = 512, critic_max_new_tokens: int | None = None,
                       system: str | None = None, open_thinking: bool = False,
                       on_step: OnStep | None = None) -> ReasoningResult:
    """PRefLexOR's recursive reasoning with a critic (preflexor.md §5.1): 1 + 3(N-1) (+1 integration) calls.

    Args:
        question: the user's question; the thinking trigger is appended unless it is already there.
        reasoner: the trained model; critic: the critic/integrator (may be None when N=1 and not integrating).
        n_rounds: N answers in all (N=1 is a single answer).
        integrate: finish with the critic's integration of all answers (False: the final answer is the last one).
        temperature / critic_temperature: sampling temperatures (reference: 0.1 both).
        max_new_tokens / critic_max_new_tokens: per-call limits (critic defaults to the reasoner's).
        system: the reasoner's system prompt (None = the chat format's default, as in training).
        open_thinking: pre-fill "<|thinking|>" in the first answer (the reference notebooks' `prepend_response`).
        on_step: called as on_step(what, round, text) after each step, for live display.
    """
    if n_rounds < 1:
        raise UserError(f"n_rounds must be >= 1, got {n_rounds}")
    if critic is None and (n_rounds > 1 or integrate):
        raise UserError("recursive reasoning needs a critic")
    cmax = critic_max_new_tokens or max_new_tokens
    res = ReasoningResult(question, "thinking", n_rounds)
    run = _Run(res, on_step)
    messages = _question_messages(question, system)
    rnd = _first_answer(run, reasoner, messages, False, temperature, max_new_tokens, open_thinking, n_rounds > 1)
    res.rounds.append(rnd)
    thinking = rnd.thinking
    for i in range(1, n_rounds):
        out = run.call(critic, "critic", "critique", i,
                       _critic_messages(SYSTEM_CRITIC, CRITIQUE_PROMPT.format(question=question, thinking=thinking)),
                       critic_temperature, cmax)
        critique = strip_tags(out.text)
        if not critique:
            run.issue(i, "critique", "critic returned an empty critique")
        run.show("critique", i, critique)
        thinking = _rewrite_thinking(run, critic, i, thinking, critique or "(none)", critic_temperature, cmax)
        res.rounds.append(_reanswer(run, reasoner, messages, i, thinking, critique, False, temperature,
                                    max_new_tokens))
    if integrate:
        _integrate(run, question, critic, critic_temperature, cmax)
    return _finish(res)


def recursive_reflection(question: str, reasoner: Generator, critic: Generator, n_rounds: int = 2,
                         integrate: bool = True, temperature: float = 0.1, critic_temperature: float = 0.1,
                         max_new_tokens: int = 512, critic_max_new_tokens: int | None = None,
                         system: str | None = None, open_thinking: bool = False,
                         on_step: OnStep | None = None) -> ReasoningResult:
    """Recursive reasoning driven by the model's own reflection (preflexor.md §5.2): 1 + 2N (+1) calls. The N
    re-answers are integrated; the first answer is kept in `rounds` with `integrated=False`. Arguments as in
    `recursive_thinking`."""
    if n_rounds < 1:
        raise UserError(f"n_rounds must be >= 1, got {n_rounds}")
    cmax = critic_max_new_tokens or max_new_tokens
    res = ReasoningResult(question, "reflection", n_rounds)
    run = _Run(res, on_step)
    messages = _question_messages(question, system)
    first = _first_answer(run, reasoner, messages, True, temperature, max_new_tokens, open_thinking, True)
    first.integrated = False
    res.rounds.append(first)
    thinking, reflection = first.thinking, first.reflection
    for i in range(1, n_rounds + 1):
        if not reflection:
            run.issue(i, "improve", "no reflection to use as feedback; used a generic instruction")
        feedback = reflection or NO_REFLECTION_FEEDBACK
        thinking = _rewrite_thinking(run, critic, i, thinking, feedback, critic_temperature, cmax)
        rnd = _reanswer(run, reasoner, messages, i, thinking, feedback, True, temperature, max_new_tokens)
        res.rounds.append(rnd)
        reflection = rnd.reflection
    if integrate:
        _integrate(run, question, critic, critic_temperature, cmax)
    return _finish(res)


def expected_calls(variant: str, n_rounds: int, integrate: bool = True) -> int:
    """Model calls of a run: thinking 1 + 3(N-1) (+1), reflection 1 + 2N (+1) (preflexor.md §5.1-5.2)."""
    body = 1 + 3 * (n_rounds - 1) if variant == "thinking" else 1 + 2 * n_rounds
    return body + int(integrate)
