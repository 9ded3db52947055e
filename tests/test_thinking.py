"""The thinking-block grammar: the tags match the tokenizer's reasoning tokens, the builders, the strict format
check and its streaming watch, the lenient extraction with every fallback, and the one rule of the answer."""
import pytest

from preflexor.thinking import (TAGS, THINK_END, THINK_START, TRIGGER, AnswerWatch, FormatWatch, answer_after, assemble_thinking,
                                extract_block, final_answer, split_response, split_thinking, strip_tags,
                                thinking_prefix)

TS, TE, RS, RE = "<|thinking|>", "<|/thinking|>", "<|reflect|>", "<|/reflect|>"


def test_tags_trigger_and_builders():
    from preflexor.tokenizer import REASONING_TOKENS

    assert TAGS == REASONING_TOKENS and (THINK_START, THINK_END) == (TS, TE) and TRIGGER == " Use <|thinking|>."
    block = assemble_thinking({"Reasoning Steps": "t"})
    assert thinking_prefix("**Reasoning Steps**:\n\nt") == block  # the trained layout, to the byte
    assert thinking_prefix(" t ") == f"{TS}\nt\n\n{TE}" and strip_tags(f" a{RS}b{TE} ") == "a b"
    assert assemble_thinking({"A": " a ", "B": "b"}) == f"{TS}\n**A**:\n\na\n\n**B**:\n\nb\n\n{TE}"


# -- the strict format check ----------------------------------------------------------------------------------------

def test_split_thinking_and_final_answer():
    ok = f"  {THINK_START}\nsteps\n{THINK_END}\nThe answer."
    assert split_thinking(ok) == {"thinking": "steps", "answer": "The answer.", "well_formed": True, "issue": None}
    assert split_thinking("plain")["issue"] == "no opening <|thinking|>"
    assert split_thinking(f"{THINK_START} never closed")["issue"] == "unclosed <|thinking|>"
    assert split_thinking(f"{THINK_START}a{THINK_END}b{THINK_START}c{THINK_END}d")["issue"] == \
        "more than one thinking block"
    assert split_thinking(f"{THINK_START}a{THINK_END}  ")["issue"] == "empty answer"
    assert final_answer(ok) == "The answer."
    assert final_answer(f"{THINK_START}a{THINK_END}b{THINK_START}c{THINK_END} last") == "last"
    assert final_answer(f"{THINK_START} cut off") == ""
    assert final_answer("no  thinking\nat all") == "no thinking at all"


def test_final_answer_is_the_answer_of_split_response():
    """One rule for "the answer": a reflection is not answer, nor is an unclosed block opened after the answer."""
    for text, answer in [(f"{TS}t{TE}{RS}r{RE} ans", "ans"), (f"{TS}t{TE} ans {RS} cut", "ans"),
                         (f"{TS}t{TE}\nthe<|response|>\n\nanswer ", "the answer")]:
        assert final_answer(text) == answer == " ".join(strip_tags(split_response(text)["answer"]).split())


def test_format_watch_stops_only_rows_that_cannot_be_well_formed(tiny_llama_dir):
    from preflexor.checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    tok.add_reasoning_tokens()
    enc = lambda s: tok.encode(s, allow_special=True)  # noqa: E731
    start, end = tok.reasoning_ids[THINK_START], tok.reasoning_ids[THINK_END]

    def feed(ids):
        watch = FormatWatch(tok, 1)
        return [watch(0, t) for t in ids], watch.stopped[0]

    assert feed(enc("\n") + [start] + enc("\nstep one") + [end] + enc("Answer."))[1] is False
    assert feed(enc("Bone is hard."))[0][0] is True  # the first non-blank text is not the opening tag
    blank = enc("\n\n")
    assert feed(blank + enc("Bone"))[0][:len(blank) + 1] == [False] * len(blank) + [True]
    assert feed(enc("<|thin"))[1] is False  # the tag spelled out in pieces may still become it
    mid = enc(" a ")
    assert feed([start] + mid + [start])[0] == [False] * (1 + len(mid)) + [True]  # a second opening tag


def test_answer_watch_stops_at_the_end_of_the_answers_first_line(tiny_llama_dir):
    """The row ends on the token that completes the answer's first line, and the check of what was generated up to
    there equals the check of the whole response."""
    from preflexor.checkpoint import load_tokenizer
    from preflexor.tasks import check

    tok = load_tokenizer(tiny_llama_dir)
    tok.add_reasoning_tokens()
    enc = lambda s: tok.encode(s, allow_special=True)  # noqa: E731

    def stop_at(text):
        ids, watch = enc(text), AnswerWatch(tok, 1)
        at = next((k for k, t in enumerate(ids) if watch(0, t)), None)
        return None if at is None else tok.decode(ids[:at + 1])

    whole = f"{TS}\n1. A is a kind of B.\n2. So A is a kind of C.\n{TE}\nYes\nMore text.\n"
    got = stop_at(whole)
    assert got.rstrip().endswith("Yes")
    assert check(final_answer(got, keep_lines=True), "Yes") and check(final_answer(whole, keep_lines=True), "Yes")
    assert final_answer(whole) == "Yes More text."  # the answer metrics' form: one line
    assert stop_at("\n\nNo, because the step fails.\nAnd so on") == "\n\nNo, because the step fails.\n"
    assert stop_at(f"{TS}\nstill thinking\nand more\n") is None  # no line of the answer yet
    assert stop_at(f"{TS}\nt\n{TE}\n\n") is None  # blank lines are not an answer line
    assert stop_at("Yes") is None  # a line without its newline: the turn's end or the budget decides


# -- the lenient extraction -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, content, issue", [
    (f"{TS}a{TE} b", "a", None),
    ("no tags at all", None, "no <|thinking|> block"),
    ("", None, "no <|thinking|> block"),
    (f"{TS} cut off", "cut off", "unclosed <|thinking|>"),
    (f"before{TE} after", "before", "<|/thinking|> without <|thinking|>; took the text before it"),
    (f"{TS}one{TE}{TS}two{TE} x", "one", "2 <|thinking|> blocks; used the first"),
    (f"{TS}a {TS} b{TE}", "a <|thinking|> b", "<|thinking|> opened twice before <|/thinking|>"),
    (f"{TS}  {TE} x", "", "empty <|thinking|> block"),
    (f"{TE} x {TS} y", "y", "unclosed <|thinking|>"),
])
def test_extract_block(text, content, issue):
    assert extract_block(text, TS, TE) == (content, issue)


@pytest.mark.parametrize("text, reflect, expected", [
    (f"{TS}t{TE}\nthe answer", False, ("t", None, "the answer", [])),
    ("bare answer", False, (None, None, "bare answer", ["no <|thinking|> block"])),
    ("", False, (None, None, "", ["no <|thinking|> block", "empty answer"])),
    (f"{TS}t", False, ("t", None, "", ["unclosed <|thinking|>", "response ended inside a block; no answer"])),
    (f"{TS}t{TE}", False, ("t", None, "", ["empty answer"])),
    (f"{TS}t{TE}{RS}r{RE} ans", True, ("t", "r", "ans", [])),
    (f"{RS}r{RE} ans", True, (None, "r", "ans", ["no <|thinking|> block"])),  # reflect without thinking
    (f"{TS}t{TE} ans", True, ("t", None, "ans", ["no <|reflect|> block"])),
    (f"{TS}t{TE} ans {RS} cut", True,
     ("t", "cut", "ans", ["unclosed <|reflect|>", "<|reflect|>… after the answer is not closed; dropped it"])),
    (f"{TS}a{TE}{TS}b{TE} final", False, ("a", None, "final", ["2 <|thinking|> blocks; used the first"])),
])
def test_split_response(text, reflect, expected):
    p = split_response(text, reflect=reflect)
    assert (p["thinking"], p["reflection"], p["answer"], p["issues"]) == expected


def test_answer_after():
    assert answer_after(f"a{TE}b{TE} c ", TE) == ("c", None)
    assert answer_after("nothing", TE) == (None, "no <|/thinking|>")
    assert answer_after(f"x{RE} late {TE} later", [TE, RE]) == ("later", None)
