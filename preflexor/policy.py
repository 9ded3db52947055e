"""The policy-gradient forward (stage 3): sampled completions collated after their prompts, and the log-prob of every
completion token under the policy or under the adapter-disabled reference.
"""
from __future__ import annotations

import torch

from preflexor import fast
from preflexor.fast.shared_prompt import hidden_shared_group
from preflexor.logprobs import token_logps
from preflexor.lora import disable_lora
from preflexor.runtime import Runtime


def collate_completions(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Right-padded rows prompt + completion: `input_ids` [N, T], `attention_mask` [N, T], `targets` [N, T] (at
    position t the token t + 1 when that is a completion token, else -100) and `completion_mask` [N, T] (targets !=
    -100), so row n's completion log-probs sit where the mask is set."""
    rows = [p + c for p, c in zip(prompts, completions)]
    T = max(len(r) for r in rows)
    shared = all(p == prompts[0] for p in prompts)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    for n, (p, c) in enumerate(zip(prompts, completions)):
        r = p + c
        ids[n, :len(r)] = torch.tensor(r)
        attn[n, :len(r)] = 1
        if c:
            targets[n, len(p) - 1:len(r) - 1] = torch.tensor(c)  # position t predicts token t + 1
    out = {"input_ids": ids, "attention_mask": attn, "targets": targets, "completion_mask": targets != -100}
    if shared:  # one prompt for every row (a question's group): the forward may run it once
        out["prompt"] = torch.tensor(prompts[0])
        out["completions"] = [torch.tensor(c, dtype=torch.long) for c in completions]
    return out


def completion_token_logps(model, batch: dict, rt: Runtime) -> torch.Tensor:
    """[N, T] log-probs of the completion tokens (0.0 elsewhere), the head through the chunked `token_logps` on the
    positions that predict a completion token only (never the full [N, T, V] logits). Rows of one prompt (a
    question's group) run it once, packed with the completions (`fast.shared_prompt.hidden_shared_group`), when
    the fast paths are installed; else one padded forward."""
    ids, targets = batch["input_ids"].to(rt.device), batch["targets"].to(rt.device)
    t = max(int(batch["attention_mask"].sum(dim=1).max()), 1)
    ids, targets = ids[:, :t], targets[:, :t]
    where = targets != -100
    if "prompt" in batch and fast.installed(model) and model.share_prompt:
        hidden = hidden_shared_group(model, batch["prompt"].to(rt.device),
                                     [c.to(rt.device) for c in batch["completions"]], rt.autocast_ctx)  # (n, H)
    else:
        with rt.autocast_ctx():
            hidden = model(ids, return_hidden=True)[where]  # (n, H)
    weight, rows, row_weight = model.head_parts()
    lowrank = model.head_lowrank()
    if rt.autocast is None:  # fp32 log-probs over fp32 or bf16 weights without autocast
        hidden, weight = hidden.float(), weight.float()
        row_weight = None if row_weight is None else row_weight.float()
        lowrank = None if lowrank is None else (lowrank[0].float(), lowrank[1].float(), lowrank[2])
    tl = token_logps(hidden, weight, targets[where], rows=rows, row_weight=row_weight, lowrank=lowrank,
                     impl=None if fast.installed(model) else "plain")
    out = torch.zeros(targets.shape, dtype=tl.dtype, device=tl.device).masked_scatter(where, tl)
    full = batch["targets"].shape[1]
    return out if t == full else torch.nn.functional.pad(out, (0, full - t))


@torch.no_grad()
def reference_token_logps(model, batch: dict, rt: Runtime) -> torch.Tensor:
    """The same with the LoRA adapters disabled: the model stage 3 started from (no second copy of the weights)."""
    was_training = model.training
    model.eval()
    with disable_lora(model):
        out = completion_token_logps(model, batch, rt)
    model.train(was_training)
    return out
