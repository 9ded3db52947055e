"""A pair's prompt run once for both answers: the shared-prompt packing and its attention (CPU and CUDA).

Chosen and rejected answers continue the same prompt. `hidden_shared_prompt` packs the answers and the prompts they
continue into one row, so every per-token op (norms, projections, MLP) runs once over all positions as one matrix and
each prompt runs once; a `SharedPrompt` layout tells the installed attention (`FastAttention`) to attend per segment:
prompts causally, each answer over its prompt's real keys and causally over itself. On the CPU the segments run
through `_TiledAttention`, which skips the masked scores; elsewhere through SDPA per segment.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

MERGE_SLACK = 1.15  # chosen and rejected answers run as one block when padding adds at most 15% positions


def sdpa(q, k, v, attn_mask=None):
    """`model.attention` with grouped k/v taken as they are (`enable_gqa`: no expanded copies, none saved for the
    backward)."""
    gqa = k.shape[1] != q.shape[1]
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)


@dataclass
class SharedPrompt:
    """Attention layout of one packed row whose answers share their prompts (`hidden_shared_prompt`): every
    per-token op (norms, projections, MLP) runs once over all rows as one matrix, attention runs per segment.

    The packed tokens are answer blocks first, then the prompts: `blocks` lists (rows n, length R) per block, its n
    answers of R tokens (right padded) in order, answer i continuing prompt i % Bp; then Bp prompts of P tokens (right
    padded; `keys` (Bp, P) marks the real ones). Prompts attend causally to themselves; answers attend to their
    prompt's real tokens and causally to themselves (`masks`: one (n or 1, 1, R, P + R) bool mask per block)."""
    blocks: list[tuple[int, int]]
    keys: torch.Tensor
    tiled: bool | None = None  # None: `_TiledAttention` where it serves (float32/64 on the CPU), else SDPA per segment

    def __post_init__(self):
        Bp, P = self.keys.shape
        self.masks, self._additive, self._stacked = [], {}, {}
        self.full = bool(self.keys.all())  # prompts of one length: one (1, 1, R, P + R) mask serves every row
        for n, R in self.blocks:
            causal = torch.ones(R, R, dtype=torch.bool, device=self.keys.device).tril()
            rows = 1 if self.full else n
            prompt = (self.keys[:1] if self.full else self.keys.repeat(n // Bp, 1))[:, None, :].expand(rows, R, P)
            self.masks.append(torch.cat([prompt, causal.expand(rows, R, R)], dim=2)[:, None])

    @property
    def length(self) -> int:
        return sum(n * R for n, R in self.blocks) + self.keys.numel()

    def attend(self, q, k, v):
        """q (nh, T, D), k/v (nkv, T, D) of the packed row after RoPE -> attention output (T, nh*D)."""
        if _tiled_ok(q) if self.tiled is None else self.tiled:
            return _TiledAttention.apply(q, k, v, self)
        Bp, P = self.keys.shape
        sizes = [n * R for n, R in self.blocks] + [Bp * P]
        shapes = self.blocks + [(Bp, P)]
        # split (not slices): the backward joins the segments' gradients with one cat instead of zero-filled copies
        qs, ks, vs = ([t.unflatten(1, nr).transpose(0, 1) for t, nr in zip(x.split(sizes, dim=1), shapes)]
                      for x in (q, k, v))  # per segment (n, heads, R, D) views
        kp, vp = ks[-1], vs[-1]
        if q.dtype not in self._additive:  # SDPA turns a bool mask into an additive one on every call
            self._additive[q.dtype] = [_additive(m, q.dtype) for m in self.masks]
        outs = []
        for (n, R), mask, qa, ka, va in zip(self.blocks, self._additive[q.dtype], qs, ks, vs):
            c = n // Bp  # copies of each prompt in this block (2: chosen and rejected)
            kc, vc = (kp, vp) if c == 1 else (kp.repeat(c, 1, 1, 1), vp.repeat(c, 1, 1, 1))
            keys, values = torch.cat([kc, ka], dim=2), torch.cat([vc, va], dim=2)  # (n, nkv, P + R, D)
            outs.append(sdpa(qa, keys, values, mask))
        outs.append(sdpa(qs[-1], kp, vp))
        return torch.cat([y.transpose(1, 2).flatten(0, 1).flatten(1) for y in outs])  # (T, nh*D)

    def stacked_masks(self, group: int, n_kv: int, dtype) -> list[torch.Tensor]:
        """Additive masks for `_TiledAttention`: per answer block (1 or n * n_kv, R * group, P + R), then the
        prompts' causal (1, P * group, P); query rows stacked (position, head of the group), as the kernel stacks
        them."""
        key = (group, n_kv, dtype)
        if key not in self._stacked:
            Bp, P = self.keys.shape
            causal = torch.ones(P, P, dtype=torch.bool, device=self.keys.device).tril()[None, None]
            out = []
            for m in self.masks + [causal]:
                rows, _, R, S = m.shape
                add = _additive(m[:, 0], dtype).repeat_interleave(group, dim=1)  # (rows, R * group, S)
                if rows > 1:
                    add = add[:, None].expand(rows, n_kv, R * group, S).reshape(rows * n_kv, R * group, S)
                out.append(add)
            self._stacked[key] = out
        return self._stacked[key]


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive one attention adds to its scores (0 or -inf)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


TILE_ROWS = 64  # query positions per tile of `_TiledAttention` (bench/RESULTS_train.md)


def _tiled_ok(q: torch.Tensor) -> bool:
    """The tiled attention serves float32/float64 on the CPU (CUDA keeps the fused SDPA kernels)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")


class _TiledAttention(torch.autograd.Function):
    """Attention over a `SharedPrompt` row on the CPU with the masked work skipped: batched GEMMs over tiles of
    TILE_ROWS query positions, each against only the keys it can see (its prompt and its answer up to the tile's last
    position), so a 64 + 192 answer block computes 75% of the full [192 x 256] scores; the softmax is kept for the
    backward (no recomputation). The grouped query heads of one kv head are stacked into the rows of one product.
    Exact attention: equal to the SDPA path up to float rounding (tests hold values and gradients to it).

    Per segment (answer block of n rows x R, or the prompts): Q (n * nkv, R * g, D) pre-scaled by 1/sqrt(D), with
    rows ordered (position, head of the group); K, V (n * nkv, P + R, D) = [the row's prompt keys; its own keys]."""

    @staticmethod
    def forward(ctx, q, k, v, layout):
        nh, T, D = q.shape
        nkv = k.shape[0]
        g = nh // nkv
        Bp, P = layout.keys.shape
        scale, tile = D ** -0.5, TILE_ROWS
        qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (T, heads, D)
        out = q.new_empty(T, nh, D)
        masks = layout.stacked_masks(g, nkv, q.dtype)
        p0 = T - Bp * P  # the prompts' first packed position
        kp = kt[p0:].view(Bp, P, nkv, D).transpose(1, 2)  # (Bp, nkv, P, D)
        vp = vt[p0:].view(Bp, P, nkv, D).transpose(1, 2)
        # segments (first packed position, rows n, length R, prompt keys in front pre): the answer blocks, then the
        # prompts themselves (causal, no prefix)
        segments, a = [], 0
        for n, R in layout.blocks:
            segments.append((a, n, R, P))
            a += n * R
        segments.append((p0, Bp, P, 0))
        saved = []
        for (a, n, R, pre), mask in zip(segments, masks):
            masked_prefix = pre and not layout.full  # answers after prompts of different lengths: padding keys
            qs = torch.empty(n, nkv, R, g, D, dtype=q.dtype, device=q.device)
            torch.mul(qt[a:a + n * R].view(n, R, nkv, g, D).transpose(1, 2), scale, out=qs)
            ks = torch.empty(n, nkv, pre + R, D, dtype=q.dtype, device=q.device)
            vs = torch.empty_like(ks)
            for dst, src, pref in ((ks, kt, kp), (vs, vt, vp)):
                dst[:, :, pre:] = src[a:a + n * R].view(n, R, nkv, D).transpose(1, 2)
                if pre:
                    dst[:, :, :P].view(n // Bp, Bp, nkv, P, D).copy_(pref.expand(n // Bp, Bp, nkv, P, D))
            qs, ks, vs = qs.view(n * nkv, R * g, D), ks.view(n * nkv, pre + R, D), vs.view(n * nkv, pre + R, D)
            os_ = torch.empty_like(qs)
            probs = []
            for r0 in range(0, R, tile):
                r1 = min(R, r0 + tile)
                L = pre + r1
                s = torch.bmm(qs[:, r0 * g:r1 * g], ks[:, :L].transpose(1, 2))
                lo = 0 if masked_prefix else pre + r0  # keys before the tile's own positions are all visible
                s[:, :, lo:].add_(mask[:, r0 * g:r1 * g, lo:L])
                p = torch.softmax(s, dim=-1)
                del s
                os_[:, r0 * g:r1 * g] = torch.bmm(p, vs[:, :L])
                probs.append(p)
            out[a:a + n * R].view(n, R, nkv, g, D).copy_(os_.view(n, nkv, R, g, D).transpose(1, 2))
            saved += [qs, ks, vs, *probs]
        ctx.layout, ctx.segments, ctx.dims, ctx.tile = layout, segments, (nh, nkv, g, D), tile
        ctx.save_for_backward(*saved)
        return out.view(T, nh * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        layout = ctx.layout
        saved, i = ctx.saved_tensors, 0
        Bp, P = layout.keys.shape
        T = grad.shape[0]
        nh, nkv, g, D = ctx.dims
        scale = D ** -0.5
        go = grad.reshape(T, nh, D)
        dq = grad.new_empty(T, nh, D)
        dk = grad.new_empty(T, nkv, D)
        dv = grad.new_empty(T, nkv, D)
        p0 = T - Bp * P
        prefix_grads = []
        for a, n, R, pre in ctx.segments:
            count = 3 + -(-R // ctx.tile)  # q, k, v and one softmax per tile
            qs, ks, vs, *probs = saved[i:i + count]
            i += count
            dos = go[a:a + n * R].view(n, R, nkv, g, D).transpose(1, 2).reshape(n * nkv, R * g, D)
            dqs = torch.empty_like(qs)
            dks = dvs = None
            for j in reversed(range(len(probs))):  # the last tile sees every key: it creates dK, dV
                r0 = j * ctx.tile
                r1 = min(R, r0 + ctx.tile)
                L = pre + r1
                p, do_t, q_t = probs[j], dos[:, r0 * g:r1 * g], qs[:, r0 * g:r1 * g]
                dv_t = torch.bmm(p.transpose(1, 2), do_t)  # (n * nkv, L, D)
                ds = torch._softmax_backward_data(torch.bmm(do_t, vs[:, :L].transpose(1, 2)), p, -1, p.dtype)
                dqs[:, r0 * g:r1 * g] = torch.bmm(ds, ks[:, :L])
                dk_t = torch.bmm(ds.transpose(1, 2), q_t)
                if dks is None:
                    dks, dvs = dk_t, dv_t
                else:  # (a product into the strided slice would run batch by batch)
                    dks[:, :L].add_(dk_t)
                    dvs[:, :L].add_(dv_t)
            dq[a:a + n * R].view(n, R, nkv, g, D).copy_(dqs.view(n, nkv, R, g, D).transpose(1, 2)).mul_(scale)
            for dst, src in ((dk, dks), (dv, dvs)):
                dst[a:a + n * R].view(n, R, nkv, D).copy_(src.view(n, nkv, pre + R, D)[:, :, pre:].transpose(1, 2))
            if pre:
                prefix_grads.append((n, dks.view(n, nkv, P + R, D)[:, :, :P], dvs.view(n, nkv, P + R, D)[:, :, :P]))
        for n, dkp, dvp in prefix_grads:  # the answers' gradients of their prompt's keys/values
            for dst, src in ((dk, dkp), (dv, dvp)):
                dst[p0:].view(Bp, P, nkv, D).add_(src.view(n // Bp, Bp, nkv, P, D).sum(0).transpose(1, 2))
        return dq.transpose(0, 1), dk.transpose(0, 1), dv.transpose(0, 1), None


def worth_sharing(batch: dict, lengths: torch.Tensor) -> bool:
    """Run the pair's common prompt once (`hidden_shared_prompt`) when that means fewer token positions than one
    forward per half: prompts of different lengths pad the response blocks' keys, and the per-half forwards win."""
    if "prompt_lens" not in batch or "response_lens" not in batch:
        return False
    plens, rlens = batch["prompt_lens"], batch["response_lens"]
    B = len(plens) // 2
    if not torch.equal(plens[:B], plens[B:]):
        return False
    shared = int(plens.max()) + int(rlens[:B].max()) + int(rlens[B:].max())
    return shared < int(lengths[:B].max()) + int(lengths[B:].max())


def hidden_shared_prompt(model, ids, plens, rlens, autocast) -> torch.Tensor:
    """Final hidden states that predict the response tokens, in `targets != -100` row-major order, with each pair's
    prompt run once: one packed forward over the answers and then the prompts (`SharedPrompt`), where the
    answers attend to their prompt's keys (RoPE positions continue from each prompt's length) and every per-token op
    runs over all of them as one matrix. Chosen and rejected answers of similar lengths form one block of 2B rows;
    otherwise one block per half, so a short answer is not padded to a long one. Gradients from both answers meet in
    the prompt's activations. The same numbers as the per-half forwards, up to float rounding (a test holds them
    equal)."""
    B2, T = ids.shape
    B = B2 // 2
    P = plens[:B]  # chosen row b and rejected row B + b share prompt b (data.collate_pairs)
    Pmax, dev = int(P.max()), ids.device
    longest = [max(int(rlens[:B].max()), 1), max(int(rlens[B:].max()), 1)]
    groups = [slice(0, B2)] if 2 * max(longest) <= MERGE_SLACK * sum(longest) else [slice(0, B), slice(B, B2)]
    blocks = [(len(rlens[rows]), max(int(rlens[rows].max()), 1)) for rows in groups]  # (answers n, length R)
    tail = sum(n * R for n, R in blocks)  # the prompts' first packed row
    tokens, positions, index, a = [], [], [], 0
    for rows, (n, R) in zip(groups, blocks):
        j, i = torch.arange(R, device=dev)[None, :], torch.arange(n, device=dev)[:, None]
        pos = plens[rows][:, None] + j  # (n, R) sequence positions of the response tokens
        tokens.append(ids[rows].gather(1, pos.clamp(max=T - 1)))
        positions.append(pos)
        # answer i's token j is predicted by its own token j - 1, token 0 by the last token of its prompt
        at = torch.where(j == 0, tail + i % B * Pmax + plens[rows][:, None] - 1, a + i * R + j - 1)
        index.append(at[j < rlens[rows][:, None]])
        a += n * R
    tokens.append(ids[:B, :Pmax])
    positions.append(torch.arange(Pmax, device=dev).expand(B, Pmax))
    layout = SharedPrompt(blocks, torch.arange(Pmax, device=dev)[None, :] < P[:, None])
    packed_ids, packed_pos = (torch.cat([t.reshape(-1) for t in ts])[None] for ts in (tokens, positions))
    with autocast():
        h = model(packed_ids, position_ids=packed_pos, attn_mask=layout, return_hidden=True)[0]  # (N, H)
    return h[torch.cat(index)]


def hidden_shared_group(model, prompt: torch.Tensor, answers: list[torch.Tensor], autocast) -> torch.Tensor:
    """Final hidden states that predict every answer token (answer 0's tokens in order, then answer 1's, ...) for
    G answers of one prompt (stage 3's group of samples), the prompt run once: one packed row of answer blocks and
    then the prompt (`SharedPrompt` with one prompt). The answers are sorted by length and cut into blocks where
    padding to a block's longest adds at most MERGE_SLACK, so ragged samples are not padded to the longest. The same
    numbers as one forward per answer, up to float rounding (a test holds them equal)."""
    P, dev = prompt.numel(), prompt.device
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]))
    blocks, cur, real = [], [], 0
    for i in order:  # ascending: the new answer is the block's longest
        n = len(answers[i])
        if cur and n * (len(cur) + 1) > MERGE_SLACK * (real + n):
            blocks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    blocks.append(cur)
    sizes = [(len(b), max(max(len(answers[i]) for i in b), 1)) for b in blocks]  # (answers n, length R)
    tail = sum(n * R for n, R in sizes)  # the prompt's first packed position
    tokens, positions, index, a = [], [], {}, 0
    for b, (n, R) in zip(blocks, sizes):
        for r, i in enumerate(b):
            x, j = answers[i], torch.arange(len(answers[i]), device=dev)
            tokens.append(F.pad(x, (0, R - len(x))))  # padded slots come after the real ones: nothing attends to them
            positions.append(P + torch.arange(R, device=dev))
            # token j is predicted by the answer's own token j - 1, token 0 by the prompt's last token
            index[i] = torch.where(j == 0, tail + P - 1, a + r * R + j - 1)
        a += n * R
    tokens.append(prompt)
    positions.append(torch.arange(P, device=dev))
    layout = SharedPrompt(sizes, torch.ones(1, P, dtype=torch.bool, device=dev))
    with autocast():
        h = model(torch.cat(tokens)[None], position_ids=torch.cat(positions)[None], attn_mask=layout,
                  return_hidden=True)[0]  # (packed, H)
    return h[torch.cat([index[i] for i in range(len(answers))])]
