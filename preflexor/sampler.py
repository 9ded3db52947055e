"""Batched generation with a preallocated KV cache: one prefill, then one token per step (gpt-fast / nanochat style).

Ragged prompts are left-padded; each row's RoPE positions start at 0 at its first real token and the mask hides its
pad slots, so a prompt gives the same tokens alone or in any batch. `num_samples` samples per prompt share one
prefill (the B cache rows are copied to B*N). Rows that emit a stop id finish and are dropped from the batch and the
cache, so a long tail does not pay for the short answers. An assistant prefix (an injected thinking block) is just
more prompt.

Randomness is per row: sample j of a prompt with seed s draws from its own `torch.Generator` seeded `s + j`, so
`num_samples=4, seed=s` gives the same samples as four runs with `num_samples=1` and seeds s..s+3, alone or batched.
Each live row draws one uniform per step and takes the token where it falls in the filtered distribution's
cumulative sum (inverse CDF; with top-k over the k candidates only, so no vocabulary-sized sort or noise). On a
float32 CPU model with the fast paths installed (`fast.install`) decoding runs through `cpu_infer` (repacked
weights, the same tokens; `fast=False` keeps the model's own forward).
"""
from __future__ import annotations

import random
import threading
import weakref
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from preflexor.fast import cpu_infer

FINISH_STOP, FINISH_LENGTH = "stop", "length"
# SDPA backends for generation on CUDA: not cuDNN's, whose plans are specialised to the key length (one more every
# decode step), so each step paid for a new plan on the CPU (bench/RESULTS_gpu.md). Empty: torch's own choice.
# `sdpa_kernel` sets process-wide flags: other threads' attention on CUDA skips cuDNN during a generation too.
DECODE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@dataclass
class GenerationResult:
    """New tokens per prompt and sample (stop id excluded), why each finished, and the prompt lengths."""

    tokens: list[list[list[int]]]
    finish_reasons: list[list[str]]  # "stop" (a stop id or `on_token` ended it) | "length" (hit max_new_tokens)
    prompt_tokens: list[int] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s) for p in self.tokens for s in p)


# -- filters and sampling ----------------------------------------------------------------------------------------
def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept, as transformers'
    TopKLogitsWarper does). k None or 0 keeps all."""
    if not k or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (R, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose total probability is
    >= p, and always at least the most likely one. Written as transformers' TopPLogitsWarper (ascending sort, drop
    tokens whose ascending cumulative probability is <= 1 - p) so boundary cases agree with it."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)  # (R, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))


def sample_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """logits (R, V) -> token ids (R,). Temperature 0 is argmax; otherwise logits / T, top-k, top-p (transformers'
    order), then one inverse-CDF draw per row from that row's generator. With top-k everything runs on the k sorted
    candidates of `torch.topk`; if some row's k-th value is tied, all tied tokens stay (as in `apply_top_k`) and the
    candidates come from a full sort instead, in the same descending order, so other rows draw the same tokens
    (up to float rounding)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    R, V = logits.shape
    idx = None  # candidate -> vocabulary id, when candidates are a sorted subset
    if top_k and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # (R, k), descending
        if bool(((logits >= vals[:, -1:]).sum(-1) > top_k).any()):  # ties at the k-th value: keep them all
            vals, idx = torch.sort(apply_top_k(logits, top_k), dim=-1, descending=True)  # (R, V)
        logits = vals
    logits = apply_top_p(logits, top_p)
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)  # (R, C)
    if generators is None:
        u = torch.rand(R, device=logits.device)
    else:
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])  # (R,)
    # The first candidate whose cdf exceeds u * total; it has probability > 0, since cdf steps up there.
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.size(-1) - 1)  # (R, 1)
    return choice.squeeze(-1) if idx is None else idx.gather(-1, choice).squeeze(-1)


# -- model steps ---------------------------------------------------------------------------------------------------
def head_params(model) -> tuple[torch.Tensor, torch.Tensor | None] | Callable:
    """The output projection, built once per generation: (weight [V, H], bias) as plain tensors (trainable rows
    written in), or for a head with a LoRA the head itself (`model.head_logits`: the low-rank term on the hidden
    states, never folded into a [V, H] matrix)."""
    if model.head_lowrank() is not None:
        return lambda hidden: model.head_logits(hidden).float()
    return model.head_parts()[0], model.head_bias()


def _head(model, hidden: torch.Tensor, head: tuple | Callable | None = None) -> torch.Tensor:
    if callable(head):  # `cpu_infer.Packed.logits`: the head prepacked for the CPU
        return head(hidden)
    w, b = head if head is not None else head_params(model)
    return F.linear(hidden, w, b).float()


def prefill(model, tokens: torch.Tensor, position_ids: torch.Tensor, attn_mask: torch.Tensor,
            head: tuple | Callable | None = None) -> torch.Tensor:
    """Run the (B, L) left-padded prompts through the model, filling cache slots 0..L-1, and return the float32
    logits (B, V) of the last position only. `head`: `head_params`, or `cpu_infer.Packed.logits`."""
    input_pos = torch.arange(tokens.size(1), device=tokens.device)  # (L,)
    hidden = model(tokens, input_pos=input_pos, position_ids=position_ids, attn_mask=attn_mask, return_hidden=True)
    return _head(model, hidden[:, -1], head)  # (B, V)


def decode_one_token(model, tokens: torch.Tensor, slot: torch.Tensor, position_ids: torch.Tensor,
                     attn_mask: torch.Tensor, head: tuple | None = None) -> torch.Tensor:
    """One step: tokens (R, 1) written at cache `slot` (1,), RoPE positions (R, 1), mask (R, 1, 1, S) -> float32
    logits (R, V). `head` = `head_params(model)`, computed once per generation."""
    hidden = model(tokens, input_pos=slot, position_ids=position_ids, attn_mask=attn_mask, return_hidden=True)
    return _head(model, hidden[:, -1], head)


def _prefill_mask(pad: torch.Tensor, L: int, S: int) -> torch.Tensor:
    """(B, 1, L, S) bool: query i sees slots <= i that are not its row's left padding. A pad query also sees itself,
    so no row of the softmax is empty (an all-masked row would give NaN, and NaN values written to the cache would
    poison later steps through 0 * NaN)."""
    slots = torch.arange(S, device=pad.device)
    q = torch.arange(L, device=pad.device)
    causal = slots[None, :] <= q[:, None]  # (L, S)
    real = slots[None, :] >= pad[:, None]  # (B, S)
    diag = slots[None, :] == q[:, None]  # (L, S)
    return ((causal[None] & real[:, None]) | diag[None]).unsqueeze(1)  # (B, 1, L, S)


def _make_generators(seeds: list[int | None], num_samples: int, device) -> list[torch.Generator]:
    """One generator per row; row (prompt i, sample j) is seeded seeds[i] + j (a fresh random seed when None)."""
    gens = []
    for s in seeds:
        base = s if s is not None else random.SystemRandom().randrange(2**62)
        gens += [torch.Generator(device=device).manual_seed(base + j) for j in range(num_samples)]
    return gens


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


_compiled_step = None
_model_locks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model) -> threading.Lock:
    """The lock `generate_ex` holds while it uses `model`: the KV cache lives on the model, so two generations on
    one model (from several threads) must run one after the other."""
    with _locks_guard:
        return _model_locks.setdefault(model, threading.Lock())


def _decode_step_fn(compile: bool, device: torch.device):
    global _compiled_step
    if not compile:
        return decode_one_token
    if device.type != "cuda":
        raise ValueError("compile=True is for CUDA models only (on CPU the eager decode step is used)")
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_one_token, dynamic=False)
    return _compiled_step


def decode_attention(device: torch.device):
    """The SDPA backends a generation on `device` runs under (`DECODE_SDPA_BACKENDS` on CUDA, else no change)."""
    if device.type == "cuda" and DECODE_SDPA_BACKENDS:
        return sdpa_kernel(list(DECODE_SDPA_BACKENDS))
    return nullcontext()


@contextmanager
def _fresh_cache(model, B: int, S: int):
    """A new (B, S) KV cache and eval mode for one generation, under the model's lock; afterwards the cache is
    freed and the train/eval mode restored."""
    with model_lock(model):
        was_training = model.training
        model.eval()
        model.setup_cache(B, S)
        try:
            yield
        finally:
            model.clear_cache()
            model.train(was_training)


def _select_cache_rows(model, idx: torch.Tensor, filled: int) -> None:
    """Keep (or repeat) the cache rows `idx` of every layer: N samples per prompt, or dropping finished rows. Only
    the `filled` slots are copied; the rest start as zeros (written before they are attended to)."""
    for c in model.kv_caches():
        for name in ("k", "v"):
            old = getattr(c, name)  # (R, n_kv, S, D)
            new = old.new_zeros((len(idx), *old.shape[1:]))
            new[:, :, :filled] = old[idx, :, :filled]
            setattr(c, name, new)


def _progress_bar(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="generate", unit="tok")


# -- the loop ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate_ex(model, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
                stop_ids: Sequence[int] | None = None, seed: int | list[int | None] | None = None, pad_id: int = 0,
                progress: bool = False, on_token: Callable[[int, int], bool] | None = None,
                compile: bool = False, fast: bool | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` new tokens for each prompt, `num_samples` times per prompt.

    Args:
        model: a `Transformer`; its KV cache is set up here and cleared afterwards (it runs in eval mode).
        prompts: token-id lists, ragged, each non-empty.
        max_new_tokens: one limit, or one per prompt.
        temperature, top_k, top_p: 0 is greedy; else filters applied as in `sample_logits`.
        num_samples: samples per prompt, all from one prefill.
        stop_ids: ids that end a row; the stop id itself is not returned.
        seed: one seed for every prompt, or one per prompt (None = random); see the module docstring.
        pad_id: id fed in pad slots (never attended to).
        on_token: called as on_token(row, token) for every kept new token, row = prompt * num_samples + sample;
            returning True ends that row with reason "stop" (used for stop strings and streaming).
        compile: torch.compile the decode step (CUDA only; compiled once per batch size and cache length). Finished
            rows then stay in the batch, keeping its shape fixed.
        fast: decode with `cpu_infer`'s repacked weights (same tokens; logits equal up to float rounding). None
            (default) = on for float32 CPU models with the fast paths installed; False = the plain model.
    """
    B, N = len(prompts), num_samples
    if N < 1:
        raise ValueError(f"num_samples must be >= 1, got {N}")
    limits = [int(m) for m in _per_prompt(max_new_tokens, B, "max_new_tokens")]
    seeds = _per_prompt(seed, B, "seed")
    if B == 0:
        return GenerationResult([], [], [])
    cfg = model.config
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {cfg.vocab_size})")
    lens_list = [len(p) for p in prompts]
    L, M = max(lens_list), max(limits)
    if L + M > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({M}) exceeds the model's {cfg.max_position_embeddings}")
    if M <= 0:
        return GenerationResult([[[] for _ in range(N)] for _ in range(B)],
                                [[FINISH_LENGTH] * N for _ in range(B)], lens_list)
    device = model.model.embed_tokens.weight.device
    stop = set(stop_ids or ())
    S = L + M - 1  # prompt slots + every generated token but the last, which is never fed back
    if fast is None:
        fast = not compile and cpu_infer.default_on(model)
    if fast and (compile or not cpu_infer.available(model)):
        raise ValueError("fast=True needs a float32 model on the CPU and compile=False")
    step_fn = _decode_step_fn(compile, device)

    lens = torch.tensor(lens_list, device=device)
    pad = L - lens  # (B,)
    padded = torch.tensor([[pad_id] * (L - n) + p for p, n in zip(prompts, lens_list)], device=device)  # (B, L)
    positions = (torch.arange(L, device=device)[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
    slots = torch.arange(S, device=device)
    # Decode-time mask (B, 1, 1, S): real prompt slots now, each new slot switched on as it is written.
    step_mask = ((slots[None, :] >= pad[:, None]) & (slots[None, :] < L))[:, None, None, :]

    tokens_out: list[list[int]] = [[] for _ in range(B * N)]
    reasons: list[str | None] = [None] * (B * N)
    with _fresh_cache(model, B, S), ExitStack() as stack:
        packed = stack.enter_context(cpu_infer.session(model, B * N)) if fast else None
        stack.enter_context(decode_attention(device))
        head = head_params(model) if packed is None else packed.logits  # weight and bias, or the packed head
        logits = prefill(model, padded, positions, _prefill_mask(pad, L, S)[..., :L], head)  # (B, V): L slots
        padded_rows = bool((pad > 0).any())  # the fast step needs no mask when no row is left-padded
        if N > 1:  # N samples per prompt from the one prefill: copy cache rows, not recompute
            _select_cache_rows(model, torch.arange(B, device=device).repeat_interleave(N), L)  # (B*N,) rows
            logits = logits.repeat_interleave(N, dim=0)  # (B*N, V)
            step_mask = step_mask.repeat_interleave(N, dim=0)  # (B*N, 1, 1, S)
        rows = list(range(B * N))  # original row (prompt * N + sample) of each batch row
        row_limit = [limits[r // N] for r in rows]
        gens = _make_generators(seeds, N, device) if temperature > 0 else None
        pos = lens.repeat_interleave(N)[:, None]  # (R, 1) RoPE position of the token fed next
        bar = _progress_bar(M) if progress else None
        step = 0
        while True:
            tok = sample_logits(logits, temperature, top_k, top_p, gens)  # (R,)
            keep = []
            for i, (r, t) in enumerate(zip(rows, tok.tolist())):
                if reasons[r] is not None:  # finished earlier (rows stay in the batch when compiled)
                    continue
                if row_limit[r] <= 0:  # a prompt given max_new_tokens=0 in a batch with others
                    reasons[r] = FINISH_LENGTH
                    continue
                if t in stop:
                    reasons[r] = FINISH_STOP
                    continue
                tokens_out[r].append(t)
                if on_token is not None and on_token(r, t):
                    reasons[r] = FINISH_STOP
                elif len(tokens_out[r]) >= row_limit[r]:
                    reasons[r] = FINISH_LENGTH
                else:
                    keep.append(i)
            if bar is not None:
                bar.update(1)
            if not keep:
                break
            if len(keep) < len(rows) and not compile:  # drop finished rows from the batch and the cache
                idx = torch.tensor(keep, device=device)
                _select_cache_rows(model, idx, L + step)
                tok, pos, step_mask = tok[idx], pos[idx], step_mask[idx]
                rows = [rows[i] for i in keep]
                gens = [gens[i] for i in keep] if gens is not None else None
            slot = L + step
            step_mask[..., slot] = True
            if packed is not None:
                logits = packed.decode(model, tok[:, None], slot, pos, step_mask if padded_rows else None)
            else:
                mask = step_mask if compile else step_mask[..., :slot + 1]  # attend to the filled slots only
                logits = step_fn(model, tok[:, None], slots[slot:slot + 1], pos, mask, head)
            pos = pos + 1
            step += 1
        if bar is not None:
            bar.close()
    out = [[tokens_out[i * N + j] for j in range(N)] for i in range(B)]
    why = [[reasons[i * N + j] for j in range(N)] for i in range(B)]
    return GenerationResult(out, why, lens_list)


def generate(model, prompts: list[list[int]], max_new_tokens: int | list[int], temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, num_samples: int = 1,
             stop_ids: Sequence[int] | None = None, seed: int | list[int | None] | None = None, pad_id: int = 0,
             progress: bool = False, fast: bool | None = None) -> list[list[list[int]]]:
    """New token ids per prompt and per sample (stop id excluded); see `generate_ex` for the arguments."""
    return generate_ex(model, prompts, max_new_tokens, temperature, top_k, top_p, num_samples, stop_ids, seed,
                       pad_id, progress, fast=fast).tokens
