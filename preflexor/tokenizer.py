"""Tokenizer: a thin wrapper over `tokenizers` with chat formatting and PRefLexOR's reasoning tokens.

Text is always encoded with special tokens *not* recognised (`encode_special_tokens = True`, transformers'
`split_special_tokens=True`), so a user writing "<|im_start|>" or "<|thinking|>" gets text tokens, never a control
id; control tokens enter only through the chat format (`encode_chat`) or, for the reasoning tokens, through
`encode(..., allow_special=True)`. The reasoning tokens (Buehler 2024, Sec. 2: `<|thinking|>`...`<|/thinking|>`,
`<|reflect|>`...`<|/reflect|>`, plus scratchpad/response) are single special ids: a Llama-3 vocabulary's 248 unused
`<|reserved_special_token_k|>` slots are renamed in place (no new embedding rows); other vocabularies grow by 8 and
`checkpoint.load_model_and_tokenizer` resizes the model.

Chat formats: ChatML (SmolLM2, Qwen2) or Llama-3 headers, from the chat template or else the vocabulary. ChatML adds
the template's default system message when a conversation has none (SmolLM2: "You are a helpful AI assistant named
SmolLM, trained by Hugging Face"). Llama-3 is Llama-3-Instruct's plain header format (content stripped, BOS first),
without the Llama-3.1/3.2 dated system block ("Cutting Knowledge Date ... Today Date ..."): a date that changes
daily has no place in training data.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import AddedToken

from preflexor.errors import UserError
from preflexor.thinking import TAGS as REASONING_TOKENS  # the reasoning tokens are the thinking grammar's tags
from preflexor.utils import atomic_write_json, atomic_write_text

_RESERVED = re.compile(r"<\|reserved_special_token_(\d+)\|>")
# A ChatML template's built-in system message: '<|im_start|>system\n<literal text><|im_end|>' inside one string.
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]+?)<\|im_end\|>")

# Jinja templates written to tokenizer_config.json when the source had none (so transformers formats chats as we do).
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                   "{% endif %}")


def _token_str(v) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _template_str(t) -> str | None:
    if isinstance(t, list):  # older multi-template form: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) else None


class Tokenizer:
    """Encode/decode text and chats; see the module docstring for the special-token rules."""

    def __init__(self, tk: tokenizers.Tokenizer, config: dict | None = None, name: str = "tokenizer"):
        self.name = name  # where it came from, for error messages
        self._config = dict(config or {})
        self.chat_template = _template_str(self._config.get("chat_template"))
        self._set_backend(tk)
        self.chat_format = self._detect_format()
        m = _DEFAULT_SYSTEM.search(self.chat_template or "") if self.chat_format == "chatml" else None
        self.default_system = m.group(1).replace("\\n", "\n") if m else None

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json: str | Path, tokenizer_config_json: str | Path | None = None) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, and chat_template.jinja beside it if the config has none)."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise UserError(f"{tokenizer_json}: tokenizer file not found")
        try:
            tk = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{tokenizer_json}: cannot read tokenizer ({str(e).splitlines()[0]})") from None
        config = {}
        if tokenizer_config_json is not None and Path(tokenizer_config_json).is_file():
            try:
                config = json.loads(Path(tokenizer_config_json).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{tokenizer_config_json}: invalid JSON ({e})") from None
            jinja = Path(tokenizer_config_json).parent / "chat_template.jinja"
            if not config.get("chat_template") and jinja.is_file():
                config["chat_template"] = jinja.read_text(encoding="utf-8")
        return cls(tk, config, name=str(tokenizer_json))

    def _set_backend(self, tk: tokenizers.Tokenizer) -> None:
        tk.encode_special_tokens = True  # special-token strings in text stay text (not serialised by to_str)
        self._tk = tk
        self._added = {i: t.content for i, t in tk.get_added_tokens_decoder().items()}
        self._special_ids = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        present = [t for t in REASONING_TOKENS if tk.token_to_id(t) is not None]
        self._reasoning_ids = {tk.token_to_id(t) for t in present}
        self._reasoning_re = re.compile("(" + "|".join(map(re.escape, present)) + ")") if present else None

    def _detect_format(self) -> str | None:
        markers = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}
        if self.chat_template:  # a template decides alone; the vocabulary only when there is none
            return next((f for f, m in markers.items() if m in self.chat_template), None)
        return next((f for f, m in markers.items() if self._tk.token_to_id(m) is not None), None)

    # -- ids -----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: base vocabulary plus added tokens (max id + 1)."""
        n = self._tk.get_vocab_size(with_added_tokens=True)
        return max(n, max(self._added, default=-1) + 1)

    def token_id(self, s: str) -> int:
        """Id of a single (special) token; KeyError if `s` is not one token of the vocabulary."""
        i = self._tk.token_to_id(s)
        if i is None:
            hint = " (call add_reasoning_tokens() first)" if s in REASONING_TOKENS else ""
            raise KeyError(f"{s!r} is not a token of {self.name}{hint}")
        return i

    def _maybe_id(self, s: str | None) -> int | None:
        return None if s is None else self._tk.token_to_id(s)

    @property
    def bos_id(self) -> int | None:
        """The BOS the chat format prepends (Llama-3's <|begin_of_text|>); None for ChatML, which has none."""
        if self.chat_format == "chatml":
            return None
        return self._maybe_id(_token_str(self._config.get("bos_token")) or "<|begin_of_text|>")

    @property
    def eot_id(self) -> int:
        """End-of-turn token that closes every assistant response."""
        end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.chat_format)
        return self.token_id(end) if end else self.eos_id

    @property
    def eos_id(self) -> int:
        for s in (_token_str(self._config.get("eos_token")), "<|im_end|>", "<|eot_id|>", "<|endoftext|>",
                  "<|end_of_text|>", "</s>"):
            i = self._maybe_id(s)
            if i is not None:
                return i
        raise UserError(f"{self.name}: no eos token (set eos_token in tokenizer_config.json)")

    @property
    def pad_id(self) -> int:
        i = self._maybe_id(_token_str(self._config.get("pad_token")))
        if i is None:
            i = self._maybe_id("<|finetune_right_pad_id|>")
        return self.eos_id if i is None else i

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end generation: end-of-turn, eos, and the format's other terminators when in the vocab."""
        extra = ("<|endoftext|>",) if self.chat_format == "chatml" else ("<|end_of_text|>", "<|eom_id|>")
        ids = [self.eot_id, self.eos_id] + [self._maybe_id(s) for s in extra]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def assistant_suffix_ids(self) -> list[int]:
        """Ids the template puts after the end-of-turn token (ChatML: "\\n"); not part of the response labels."""
        return self.encode("\n") if self.chat_format == "chatml" else []

    @property
    def reasoning_ids(self) -> dict[str, int]:
        return {t: self._tk.token_to_id(t) for t in REASONING_TOKENS if self._tk.token_to_id(t) is not None}

    think_start_id = property(lambda self: self.token_id(REASONING_TOKENS[0]))
    think_end_id = property(lambda self: self.token_id(REASONING_TOKENS[1]))
    reflect_start_id = property(lambda self: self.token_id("<|reflect|>"))
    reflect_end_id = property(lambda self: self.token_id("<|/reflect|>"))

    # -- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Plain text -> ids, never adding BOS. Special-token strings stay text unless `allow_special`, which turns
        the reasoning-token strings (only those) into their ids."""
        if not allow_special or self._reasoning_re is None:
            return self._tk.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for k, part in enumerate(self._reasoning_re.split(text)):  # odd k: a reasoning token
            if k % 2:
                ids.append(self._tk.token_to_id(part))
            elif part:
                ids.extend(self._tk.encode(part, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. Reasoning tokens always decode to their strings; `skip_special` drops the other special
        tokens (template control tokens, pad, eos)."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids or i in self._reasoning_ids]
        return self._tk.decode(ids, skip_special_tokens=False)

    # -- chat ------------------------------------------------------------------------------------------------------
    def _chat_pieces(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[bool, str]]:
        """The rendered chat as (is_control_token, text) pieces, in order."""
        if self.chat_format is None:
            raise UserError(f"{self.name}: unknown chat format (the chat template and vocabulary have neither "
                            f"<|im_start|> nor <|start_header_id|>)")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"chat message {i} needs string 'role' and 'content', got {str(m)[:80]!r}")
        out: list[tuple[bool, str]] = []
        if self.chat_format == "chatml":
            if messages and messages[0]["role"] != "system" and self.default_system is not None:
                messages = [{"role": "system", "content": self.default_system}, *messages]
            for m in messages:
                out += [(True, "<|im_start|>"), (False, f"{m['role']}\n{m['content']}"), (True, "<|im_end|>"),
                        (False, "\n")]
            if add_generation_prompt:
                out += [(True, "<|im_start|>"), (False, "assistant\n")]
        else:
            bos = self.bos_id
            if bos is not None:
                out.append((True, self._tk.id_to_token(bos)))
            for m in messages:
                out += [(True, "<|start_header_id|>"), (False, m["role"]), (True, "<|end_header_id|>"),
                        (False, "\n\n" + m["content"].strip()), (True, "<|eot_id|>")]
            if add_generation_prompt:
                out += [(True, "<|start_header_id|>"), (False, "assistant"), (True, "<|end_header_id|>"),
                        (False, "\n\n")]
        return out

    def format_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The string the model's own chat template renders for `messages`."""
        return "".join(text for _, text in self._chat_pieces(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    allow_special: bool = False) -> list[int]:
        """Ids of `format_chat(messages)`: template control tokens as ids, each run of text between them encoded as
        one piece (so the ids equal tokenizing the rendered string), message text via `encode(.., allow_special)`."""
        ids: list[int] = []
        for is_control, text in self._chat_pieces(messages, add_generation_prompt):
            if is_control:
                ids.append(self.token_id(text))
            elif text:
                ids.extend(self.encode(text, allow_special))
        return ids

    # -- reasoning tokens --------------------------------------------------------------------------------------------
    def add_reasoning_tokens(self) -> int:
        """Register the 8 reasoning tokens as single special ids, renaming `<|reserved_special_token_k|>` slots (lowest
        k first) so decode gives the new string and appending the rest; returns the vocab size needed. Idempotent."""
        missing = [t for t in REASONING_TOKENS if self._tk.token_to_id(t) is None]
        if not missing:
            return self.vocab_size
        reserved = sorted((int(m.group(1)), i, s) for i, s in self._added.items() if (m := _RESERVED.fullmatch(s)))
        reuse = list(zip(reserved, missing))
        if reuse:
            data = json.loads(self._tk.to_str())
            vocab = data.get("model", {}).get("vocab")
            for (_, tid, old), new in reuse:
                for entry in data["added_tokens"]:
                    if entry["id"] == tid:
                        entry.update(content=new, special=True, normalized=False, lstrip=False, rstrip=False)
                if isinstance(vocab, dict) and vocab.get(old) == tid:
                    vocab[new] = vocab.pop(old)
            tk = tokenizers.Tokenizer.from_str(json.dumps(data))
        else:
            tk = self._tk
        rest = missing[len(reuse):]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in rest])
        self._set_backend(tk)
        return self.vocab_size

    # -- save --------------------------------------------------------------------------------------------------------
    def hf_config(self) -> dict:
        """tokenizer_config.json contents that transformers' AutoTokenizer reads back to the same tokenizer."""
        template = self.chat_template or {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}.get(self.chat_format)
        bos = self.bos_id if self.chat_format != "chatml" else self._maybe_id(_token_str(self._config.get("bos_token")))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is (no per-model rebuild)
            "bos_token": None if bos is None else self._tk.id_to_token(bos),
            "eos_token": self._tk.id_to_token(self.eos_id),
            "pad_token": self._tk.id_to_token(self.pad_id),
            "unk_token": _token_str(self._config.get("unk_token")),
            "additional_special_tokens": list(self.reasoning_ids),
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self._config.get("model_max_length", 8192),
            "chat_template": template,
        }
        return {k: v for k, v in cfg.items() if v is not None}

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json (with any added reasoning tokens) and tokenizer_config.json (incl. chat_template)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "tokenizer.json", self._tk.to_str())
        atomic_write_json(d / "tokenizer_config.json", self.hf_config())

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, chat_format={self.chat_format!r})"
