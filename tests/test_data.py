"""Preference JSONL validation, truncation/dropping, thinking masks (exact positions) and collation."""
import json

import pytest
import torch

from preflexor.data import (IGNORE_INDEX, collate_pairs, load_pairs, read_pairs, thinking_mask, thinking_spans,
                            tokenize_pair, tokenize_pairs)
from preflexor.errors import UserError

S, E = 1, 2  # <|thinking|>, <|/thinking|>


class CharTokenizer:
    """One id per character; the two thinking strings are single ids (like Tokenizer.encode(allow_special=True))."""
    think_start_id, think_end_id, eot_id, pad_id = S, E, 3, 0
    SPECIAL = {"<|thinking|>": S, "<|/thinking|>": E}

    def encode(self, text, allow_special=False):
        ids, i = [], 0
        while i < len(text):
            for s, t in self.SPECIAL.items():
                if allow_special and text.startswith(s, i):
                    ids.append(t)
                    i += len(s)
                    break
            else:
                ids.append(100 + ord(text[i]))
                i += 1
        return ids

    def encode_chat(self, messages, add_generation_prompt=True, allow_special=False):
        ids = []
        for m in messages:
            ids += [4] + self.encode(m["role"] + ":" + m["content"], allow_special) + [3]
        return ids + ([5] if add_generation_prompt else [])


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


# -- reading ------------------------------------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "Q? Use <|thinking|>.", "chosen": "<|thinking|>x<|/thinking|>A", "rejected": "B",
                   "meta": {"index": 0}})


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    ('["a"]', "expected a JSON object, got list"),
    ('{"prompt": "p", "chosen": "c"}', "missing key 'rejected'"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "key 'chosen' must be a string, got int"),
    ('{"prompt": " ", "chosen": "c", "rejected": "r"}', "key 'prompt' is empty"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "meta": []}', "key 'meta' must be an object"),
])
def test_bad_line_names_file_and_line(tmp_path, bad, reason):
    path = _write(tmp_path / "pairs.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(UserError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}:3: ") and reason in str(e.value)
    records, problems = read_pairs(path, skip_bad=True)
    assert len(records) == 2 and len(problems) == 1 and problems[0].startswith(f"{path}:3: ")
    assert len(load_pairs(path, skip_bad=True)) == 2


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="no valid preference pairs"):
        load_pairs(_write(tmp_path / "empty.jsonl", [""]))


# -- tokenization and truncation --------------------------------------------------------------------------------

def test_tokenize_pair_format_and_truncation():
    tok = CharTokenizer()
    rec = {"prompt": "abcdefghij", "chosen": "<|thinking|>xy<|/thinking|>ANSWER", "rejected": "no"}
    ex = tokenize_pair(tok, rec, max_prompt_len=8, max_length=100)
    full_prompt = tok.encode_chat([{"role": "user", "content": "abcdefghij"}])
    assert ex["prompt_ids"] == full_prompt  # fits: untouched
    assert ex["chosen_ids"] == [S, 220, 221, E] + tok.encode("ANSWER") + [tok.eot_id]
    assert ex["rejected_ids"] == tok.encode("no") + [tok.eot_id]
    # too long: prompt keeps its last 8 tokens (keep_end), then responses get max_length - 8 tokens
    P, C = len(full_prompt), len(ex["chosen_ids"])
    ex = tokenize_pair(tok, rec, max_prompt_len=8, max_length=8 + 5)
    assert ex["prompt_ids"] == full_prompt[-8:]
    assert ex["chosen_ids"] == ([S, 220, 221, E] + tok.encode("ANSWER"))[:5]
    assert ex["rejected_ids"] == tok.encode("no") + [tok.eot_id]  # shorter than the budget: untouched
    # the prompt is only cut when it has to be
    ex = tokenize_pair(tok, rec, max_prompt_len=8, max_length=P + C)
    assert ex["prompt_ids"] == full_prompt and len(ex["chosen_ids"]) == C
    # with a system prompt the chat turn carries it
    ex = tokenize_pair(tok, rec, system="sys", max_length=1000)
    assert ex["prompt_ids"][:1 + len("system:sys")] == [4] + tok.encode("system:sys")


def test_fully_truncated_pairs_are_dropped_and_counted():
    tok = CharTokenizer()
    rec = {"prompt": "abcdefghijkl", "chosen": "c", "rejected": "r"}
    assert len(tok.encode_chat([{"role": "user", "content": rec["prompt"]}])) == 20
    assert tokenize_pair(tok, rec, max_prompt_len=20, max_length=20) is None  # the prompt (20) leaves no room
    kept, dropped = tokenize_pairs(tok, [rec, {**rec, "prompt": "a"}], max_prompt_len=20, max_length=20)
    assert dropped == 1 and len(kept) == 1


def test_tokenize_applies_same_mask_to_both():
    tok = CharTokenizer()
    rec = {"prompt": "q", "chosen": "<|thinking|>ab<|/thinking|>A", "rejected": "<|thinking|>c<|/thinking|>BB"}
    ex = tokenize_pair(tok, rec, mask_mode="answer_only")
    assert ex["chosen_mask"] == [False, False, False, True, True, True]
    assert ex["rejected_mask"] == [False, False, True, True, True, True]


# -- thinking masks -------------------------------------------------------------------------------------------------

def _mask(ids, mode, **kw):
    return thinking_mask(ids, mode, S, E, **kw).tolist()


def test_answer_only_exact_positions():
    T, F = True, False
    one = [S, 10, 11, E, 20, 21, 3]
    assert _mask(one, "answer_only") == [F, F, F, T, T, T, T]
    assert _mask(one, "answer_only", keep_delimiter=False) == [F, F, F, F, T, T, T]
    several = [S, 10, E, 20, S, 11, 12, E, 21, 3]  # masked up to the LAST end delimiter
    assert _mask(several, "answer_only") == [F, F, F, F, F, F, F, T, T, T]
    assert _mask(several, "answer_only", keep_delimiter=False) == [F] * 8 + [T, T]
    assert _mask([20, 21, 22, 3], "answer_only") == [T, T, T, T]  # no thinking at all: keep every label
    truncated = [S, 10, 11, 12]  # unclosed (cut by max_length): no end delimiter, keep all
    assert _mask(truncated, "answer_only") == [T, T, T, T]
    second_unclosed = [S, 10, E, 20, S, 11]  # the last CLOSED block decides
    assert _mask(second_unclosed, "answer_only") == [F, F, T, T, T, T]
    assert _mask(one, "none") == [T] * 7
    assert thinking_mask(torch.tensor(one), "answer_only", S, E).tolist() == [F, F, F, T, T, T, T]  # tensors too


def test_thinking_spans_matching():
    assert thinking_spans([S, 10, E, 20, S, 11, 12, E], S, E) == [(0, 2), (4, 7)]
    assert thinking_spans([E, S, 10, E, S, 11], S, E) == [(1, 3)]  # a stray end and an unclosed start: no span
    assert thinking_spans([S, 10, S, 11, E], S, E) == [(2, 4)]  # the end takes the nearest preceding start


def test_random_fraction_exact_counts_and_positions():
    g = torch.Generator().manual_seed(0)
    ids = [S, 10, 11, 12, 13, 14, E, 20, S, 15, 16, 17, E, 21, 3]
    m = thinking_mask(ids, "random_fraction", S, E, fraction=0.4, generator=g)
    # block 1 inner L=5 -> floor(2.0)=2 masked in positions 1..5; block 2 inner L=3 -> floor(1.2)=1 in 9..11
    masked = (~m).nonzero().flatten().tolist()
    assert len([i for i in masked if 1 <= i <= 5]) == 2 and len([i for i in masked if 9 <= i <= 11]) == 1
    assert len(masked) == 3  # delimiters and answer untouched
    # without keeping delimiters the span is 7 (block 1) and 5 (block 2): floor(2.8)=2, floor(2.0)=2
    m = thinking_mask(ids, "random_fraction", S, E, keep_delimiter=False, fraction=0.4, generator=g)
    masked = (~m).nonzero().flatten().tolist()
    assert len([i for i in masked if 0 <= i <= 6]) == 2 and len([i for i in masked if 8 <= i <= 12]) == 2
    assert len(masked) == 4
    # fraction 1: exactly the inside of every block; the answer and an unclosed block are kept
    ids = [S, 10, 11, E, 20, S, 12, 13]
    assert _mask(ids, "random_fraction", fraction=1.0) == [True, False, False, True, True, True, True, True]
    assert _mask(ids, "random_fraction", fraction=1.0, keep_delimiter=False) == [False] * 4 + [True] * 4
    assert _mask([S, 10, 11, 12, 13, E], "random_fraction", fraction=0.2) == [True] * 6  # floor(0.8) = 0
    assert _mask([20, 21], "random_fraction", fraction=1.0) == [True, True]
    # seeded: the same generator seed masks the same positions
    a = thinking_mask([S, *range(10, 40), E], "random_fraction", S, E, fraction=0.5,
                      generator=torch.Generator().manual_seed(3))
    b = thinking_mask([S, *range(10, 40), E], "random_fraction", S, E, fraction=0.5,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and int((~a).sum()) == 15


def test_bad_mask_mode():
    with pytest.raises(UserError, match="unknown thinking mask mode 'everything'"):
        thinking_mask([1, 2], "everything", S, E)
    with pytest.raises(UserError, match="fraction"):
        thinking_mask([1, 2], "random_fraction", S, E, fraction=1.5)


# -- collation ----------------------------------------------------------------------------------------------------

def test_collate_shapes_and_alignment():
    tok = CharTokenizer()
    recs = [{"prompt": "q1", "chosen": "<|thinking|>ab<|/thinking|>ANS", "rejected": "no"},
            {"prompt": "longer q", "chosen": "yes", "rejected": "<|thinking|>z<|/thinking|>NOPE!"}]
    exs = [tokenize_pair(tok, r, mask_mode="answer_only") for r in recs]
    b = collate_pairs(exs, pad_id=tok.pad_id)
    B = 2
    rows = [(e["prompt_ids"], e[f"{s}_ids"], e[f"{s}_mask"]) for s in ("chosen", "rejected") for e in exs]
    T = max(len(p) + len(r) for p, r, _ in rows)
    for k in ("input_ids", "attention_mask", "labels", "targets", "loss_mask", "nll_mask"):
        assert b[k].shape == (2 * B, T), k
    assert b["attention_mask"].dtype == torch.bool and b["loss_mask"].dtype == torch.bool
    for i, (p, r, m) in enumerate(rows):
        P, R = len(p), len(r)
        assert b["input_ids"][i, :P + R].tolist() == p + r
        assert (b["input_ids"][i, P + R:] == tok.pad_id).all() and b["attention_mask"][i].sum() == P + R
        # logits at t predict labels[t] = input_ids[t + 1]; only kept response tokens carry labels
        lab = b["labels"][i]
        for t in range(T):
            if lab[t] != IGNORE_INDEX:
                assert lab[t] == b["input_ids"][i, t + 1]
        kept = [r[j] for j in range(R) if m[j]]
        assert lab[lab != IGNORE_INDEX].tolist() == kept
        assert b["targets"][i][b["targets"][i] != IGNORE_INDEX].tolist() == r  # all response tokens
        assert b["loss_mask"][i].sum() == sum(m)
        assert b["nll_mask"][i].sum() == (R if i < B else 0)  # chosen rows only, ignoring the thinking mask
        assert b["prompt_lens"][i] == P and b["response_lens"][i] == R
    # chunk(2) splits chosen from rejected
    ch, rj = b["input_ids"].chunk(2)
    assert ch[0, :len(exs[0]["prompt_ids"])].tolist() == rj[0, :len(exs[0]["prompt_ids"])].tolist()
    # without masks every response label is kept
    b2 = collate_pairs([tokenize_pair(tok, r) for r in recs], pad_id=tok.pad_id)
    assert torch.equal(b2["labels"], b2["targets"]) and torch.equal(b2["loss_mask"][:B], b2["nll_mask"][:B])


def test_real_tokenizer_pair(smollm2_dir):
    """With SmolLM2's tokenizer: the thinking strings become single ids, the response ends with <|im_end|>, and the
    answer-only mask keeps exactly `<|/thinking|>` + the answer + the end of turn."""
    from preflexor.checkpoint import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    tok.add_reasoning_tokens()
    rec = {"prompt": "What is bone? Use <|thinking|>.",
           "chosen": "<|thinking|>\n**Reasoning Steps**:\n\nRecall.\n\n<|/thinking|>\nBone is a tissue.",
           "rejected": "Bone is a rock."}
    ex = tokenize_pair(tok, rec, mask_mode="answer_only")
    p, c = ex["prompt_ids"], ex["chosen_ids"]
    assert p.count(tok.think_start_id) == 1 and tok.decode(p).endswith("<|im_start|>assistant\n")
    assert c.count(tok.think_start_id) == 1 and c.count(tok.think_end_id) == 1 and c[-1] == tok.eot_id
    kept = [t for t, m in zip(c, ex["chosen_mask"]) if m]
    assert kept[0] == tok.think_end_id and tok.decode(kept[1:-1]) == "\nBone is a tissue."
    assert all(ex["rejected_mask"])  # no thinking block in the rejected answer: every label kept
