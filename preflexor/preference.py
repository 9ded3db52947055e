"""The preference forward, shared by training and evaluation: per-token log-probs of a collated pair batch,
per-sequence log-probs as a loss wants them, the adapter-disabled reference, any registered loss on them
(`losses.compute`), and the held-out pair evaluation with one set of metric names.

Metric names: those of the losses (rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}, ORPO's
nll, log_odds_ratio, log_odds_chosen) and `loss`; the held-out evaluation adds `nll` (token-mean NLL of the whole
chosen response, every loss) and `logps/accuracies` (mean log-prob of the whole chosen response > rejected's: needs
no reference and no loss).
"""
from __future__ import annotations

import torch

from preflexor import fast, losses
from preflexor.data import collate_pairs
from preflexor.fast.shared_prompt import hidden_shared_prompt, worth_sharing
from preflexor.logprobs import sequence_logps, token_logps
from preflexor.lora import disable_lora
from preflexor.losses import LossSpec
from preflexor.runtime import Runtime


def response_token_logps(model, batch: dict, rt: Runtime) -> torch.Tensor:
    """Log-prob of every response token of a collated batch ([2B, T] from `data.collate_pairs`, 0.0 elsewhere).

    With the fast paths installed, the pair's shared prompt runs once, packed with both halves' answers
    (`fast.shared_prompt`); otherwise, or where packing costs more positions, one forward runs per half, cut to its
    longest row, so a short rejected answer is not padded to a long chosen one (rows are right padded and attention is
    causal: the cut changes no real token). The head runs only on rows that predict a response token, through the
    chunked `token_logps` (never the full logits); a head that trains only new-token rows (stage 1) goes in as a
    constant matrix plus those rows, so no [V, H] gradient is formed. A batch with `prompt_targets` (ORPO's NLL over
    the prompt too) also scores the chosen rows' prompt tokens, one forward per half."""
    ids, targets = batch["input_ids"].to(rt.device), batch["targets"].to(rt.device)
    lengths = batch["attention_mask"].sum(dim=1)  # (2B,)
    B2, T = ids.shape
    prompt_targets = batch.get("prompt_targets")
    if prompt_targets is not None:
        targets = torch.where(targets != -100, targets, prompt_targets.to(rt.device))
    where = (targets != -100)  # (2B, T) positions that predict a scored token, row-major = the order picked below
    if prompt_targets is None and fast.installed(model) and model.share_prompt and worth_sharing(batch, lengths):
        hidden = hidden_shared_prompt(model, ids, batch["prompt_lens"].to(rt.device),
                                      batch["response_lens"].to(rt.device), rt.autocast_ctx)
    else:
        picked = []
        for half in (slice(0, B2 // 2), slice(B2 // 2, B2)):
            t = max(int(lengths[half].max()), 1)
            with rt.autocast_ctx():
                hidden = model(ids[half, :t], return_hidden=True)  # (B, t, H)
            picked.append(hidden[where[half, :t]])  # (n, H)
        hidden = torch.cat(picked)  # (n_chosen + n_rejected, H)
    labels = targets[where]
    weight, rows, row_weight = model.head_parts()
    lowrank = model.head_lowrank()  # the head's LoRA as a term on the hidden states, not folded into the matrix
    if rt.autocast is None:  # fp32 log-probs for fp32 or bf16 weights without autocast (evaluation of a bf16 model)
        hidden, weight = hidden.float(), weight.float()
        row_weight = None if row_weight is None else row_weight.float()
        lowrank = None if lowrank is None else (lowrank[0].float(), lowrank[1].float(), lowrank[2])
    tl = token_logps(hidden, weight, labels, rows=rows, row_weight=row_weight, lowrank=lowrank,
                     impl=None if fast.installed(model) else "plain")  # (n,)
    return torch.zeros(B2, T, dtype=tl.dtype, device=tl.device).masked_scatter(where, tl)  # (2B, T)


def policy_logps(model, batch: dict, spec: LossSpec, rt: Runtime) -> dict:
    """[chosen; rejected] rows -> per-sequence log-probs (mean or sum per the loss) and ORPO's NLL."""
    return _seq(response_token_logps(model, batch, rt), batch, spec, rt)


def _seq(tl: torch.Tensor, batch: dict, spec: LossSpec, rt: Runtime) -> dict:
    loss_mask, nll_mask = batch["loss_mask"].to(rt.device), batch["nll_mask"].to(rt.device)
    seq = sequence_logps(tl, loss_mask, average=spec.average_logps)
    chosen, rejected = seq.chunk(2)
    out = {"chosen": chosen, "rejected": rejected}
    if spec.needs_nll:
        out["nll"] = -sequence_logps(tl, nll_mask, average=True).chunk(2)[0]  # token mean over each chosen response
    return out


@torch.no_grad()
def reference_logps(model, batch: dict, spec: LossSpec, rt: Runtime) -> dict:
    """Reference log-probs = the same network with its LoRA adapters disabled (no second copy of the weights)."""
    was_training = model.training
    model.eval()  # dropout off: the reference is deterministic
    with disable_lora(model):
        out = policy_logps(model, batch, spec, rt)
    model.train(was_training)
    return {k: v.detach() for k, v in out.items()}


def preference_loss(model, batch: dict, loss_cfg, rt: Runtime, ref: dict | None = None):
    """Per-example losses and metrics of one micro-batch with the configured loss (`config.LossConfig`); `ref` holds
    precomputed reference log-probs, else a loss that needs them gets them from the adapter-disabled model."""
    spec = losses.get_loss(loss_cfg.name, key="loss.name")
    pol = policy_logps(model, batch, spec, rt)
    if spec.needs_ref and ref is None:
        ref = reference_logps(model, batch, spec, rt)
    return losses.compute(loss_cfg.name, pol, ref, loss_cfg.params)


@torch.no_grad()
def precompute_ref(model, examples: list[dict], pad_id: int, spec: LossSpec, rt: Runtime,
                    batch_size: int = 1) -> list[dict]:
    """Reference log-probs of every example once (adapters disabled), so training steps skip the reference forward.
    The held-out set is done in `evaluate_pairs`' batches: the same shapes give the same float rounding, so at step 0
    policy and reference agree exactly and the held-out rewards are exactly zero (no ties broken by noise)."""
    out = []
    for i in range(0, len(examples), batch_size):
        r = reference_logps(model, collate_pairs(examples[i:i + batch_size], pad_id), spec, rt)
        out += [{"chosen": c.cpu(), "rejected": j.cpu()} for c, j in zip(r["chosen"], r["rejected"])]
    return out


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, loss_cfg, rt: Runtime, batch_size: int = 4,
                   ref_cache: list | None = None) -> dict:
    """Held-out pairs (tokenized examples) with the configured loss: the mean of every per-example metric (see the
    module docstring), plus `margins` (per pair) and `n_pairs`. The reference comes from `ref_cache`
    (`precompute_ref`, e.g. of another model) or from the model with its adapters disabled. Model in eval mode."""
    spec = losses.get_loss(loss_cfg.name, key="loss.name")
    was_training = model.training
    model.eval()
    rows: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(examples), batch_size):
        batch = collate_pairs(examples[i:i + batch_size], pad_id, nll_prompt=loss_cfg.nll_prompt and spec.needs_nll)
        tl = response_token_logps(model, batch, rt)  # (2B, T)
        whole = sequence_logps(tl, batch["targets"].to(tl.device) != -100, average=True).chunk(2)  # every response token
        pol = _seq(tl, batch, spec, rt)
        ref = None
        if ref_cache is not None:
            ref = {k: torch.stack([r[k] for r in ref_cache[i:i + batch_size]]) for k in ("chosen", "rejected")}
        elif spec.needs_ref:
            ref = reference_logps(model, batch, spec, rt)
        per_example, metrics = losses.compute(loss_cfg.name, pol, ref, loss_cfg.params)
        extra = {"loss": per_example, "nll": -whole[0], "logps/accuracies": (whole[0] > whole[1]).float()}
        for k, v in {**metrics, **extra}.items():
            rows.setdefault(k, []).append(v.detach().float().cpu())
    model.train(was_training)
    out = {k: float(torch.cat(v).mean()) for k, v in rows.items()}
    margins = torch.cat(rows["rewards/margins"]) if rows else torch.zeros(0)
    return {**out, "margins": [round(float(x), 5) for x in margins], "n_pairs": len(examples)}
