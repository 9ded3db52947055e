"""LoRA: identity at init, base untouched by training, disabled = base, merge = W + scale*B A, new-token rows, and
parity with `peft` (test-only) in both directions of adapter-file exchange."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from preflexor.errors import UserError
from preflexor.lora import (LoRAEmbedding, LoRALinear, PROJECTIONS, apply_lora, count_trainable, disable_lora,
                            load_lora_state_dict, load_new_rows, lora_parameters, lora_state_dict, merge_lora,
                            new_rows_state_dict, print_trainable, train_new_token_rows, trainable_parameters)
from preflexor.model import ModelArgs, Transformer
from preflexor.peft_io import load_adapter, save_adapter

ALL = PROJECTIONS + ("embed_tokens", "lm_head")
V = 64
NEW = [60, 61, 63]  # "new token" rows


def tiny(tied: bool, seed: int = 0, hidden: int = 32) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelArgs(vocab_size=V, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    return Transformer(cfg).eval()


def ids(seed: int = 1, T: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (2, T), generator=g)
    x[:, 3] = torch.tensor(NEW[:2])  # every batch contains new tokens
    return x


def randomize(model: nn.Module, std: float = 0.2, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def train_step(model: nn.Module, x: torch.Tensor, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    model.eval()


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- our own invariants ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_init_equals_base_step_keeps_base_disable_and_merge(tied):
    model, x = tiny(tied), ids()
    before = base_state(model)
    with torch.no_grad():
        base_logits = model(x)
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=ALL)
    assert not any(m.training for m in model.modules())  # new dropout modules follow the model's eval mode
    assert set(before) <= set(model.state_dict())  # base keys unchanged, adapters are extra keys
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B = 0 (linear) / A = 0 (embedding): exactly the base
    train_step(model, x)
    sd = model.state_dict()
    for k, v in before.items():
        assert torch.equal(sd[k], v), k  # base weights bit-identical after an AdamW step
    with torch.no_grad():
        logits = model(x)
        assert (logits - base_logits).abs().max() > 1e-3
        with disable_lora(model):
            assert torch.equal(model(x), base_logits)
        assert torch.equal(model(x), logits)  # flags restored on exit
    q = model.model.layers[0].self_attn.q_proj
    expect_q = q.weight + q.scale * (q.lora_b @ q.lora_a)
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, LoRAEmbedding)) for m in model.modules())
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expect_q)
    assert model.lm_head is not None and not model.config.tie_word_embeddings  # tied head got its own delta
    with torch.no_grad():
        merged = model(x)
    torch.testing.assert_close(merged, logits, atol=1e-5, rtol=1e-5)
    once = base_state(model)
    merge_lora(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in once.items())  # idempotent


def test_lora_linear_merge_exact_and_idempotent():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(8, 6, bias=True), r=2, alpha=4.0, rslora=True)
    assert m.scale == 4.0 / math.sqrt(2) and not m.weight.requires_grad and not m.bias.requires_grad
    nn.init.normal_(m.lora_b)
    x = torch.randn(3, 8)
    y = m(x)
    expect = m.weight.detach() + m.scale * (m.lora_b.detach() @ m.lora_a.detach())
    m.merge()
    assert torch.equal(m.weight, expect)
    m.merge()
    assert torch.equal(m.weight, expect)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError):
        with disable_lora(nn.Sequential(m)):
            pass


def test_apply_lora_rejects_bad_input():
    with pytest.raises(UserError, match="unknown target 'qkv_proj'"):
        apply_lora(tiny(True), r=4, alpha=8, targets=["q_proj", "qkv_proj"])
    with pytest.raises(UserError, match="lora.r"):
        apply_lora(tiny(True), r=0, alpha=8)
    model = apply_lora(tiny(True), r=4, alpha=8)
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, r=4, alpha=8)


def test_smollm2_default_trainable_count(capsys):
    try:  # the real SmolLM2-135M-Instruct config (converted from the packaged GGUF once, then cached)
        from preflexor.checkpoint import default_model_dir
        cfg = ModelArgs.from_hf(default_model_dir() / "config.json")
    except Exception:  # asset package missing: the same sizes by hand
        cfg = ModelArgs(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # counting needs no weights
        base = Transformer(cfg)
        model = apply_lora(Transformer(cfg), r=16, alpha=32)
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    in_out = [(H, q), (H, kv), (H, kv), (q, H), (H, I), (H, I), (I, H)]  # q k v o gate up down
    expected = cfg.num_hidden_layers * sum(16 * (i + o) for i, o in in_out)
    trainable, total = count_trainable(model)
    line = print_trainable(model)
    assert "trainable params: 4,884,480" in capsys.readouterr().out and line.startswith("trainable params")
    assert trainable == expected == 4_884_480  # the figure peft reports for SmolLM2-135M, r=16, all projections
    assert total == sum(p.numel() for p in base.parameters()) + trainable


@pytest.mark.parametrize("tied", [True, False])
def test_new_token_rows_only_those_rows_train(tied):
    model, x = tiny(tied), ids()
    with torch.no_grad():
        base_logits = model(x)
    W0 = model.model.embed_tokens.weight.clone()
    H0 = None if tied else model.lm_head.weight.clone()
    apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    train_new_token_rows(model, NEW)
    assert count_trainable(model)[0] == 2 * 4 * ((32 + 32) + (32 + 16)) + len(NEW) * 32 * (1 if tied else 2)  # q, v
    train_step(model, x)
    emb = model.model.embed_tokens
    assert torch.equal(emb.weight, W0)  # the frozen matrix itself is untouched
    others = torch.ones(V, dtype=torch.bool)
    others[NEW] = False
    for w, w0 in [(emb.rows_weight(), W0)] + ([] if tied else [(model.lm_head.rows_weight(), H0)]):
        assert torch.equal(w[others], w0[others])  # every other row bit-identical
        assert (w[NEW] - w0[NEW]).abs().amax(dim=1).min() > 0  # each new row moved
    with torch.no_grad():
        logits = model(x)
        head = model.head_weight()
    assert (logits[..., NEW] - base_logits[..., NEW]).abs().max() > 1e-3  # the (tied) head sees the new rows
    assert torch.equal(head[others], W0[others] if tied else H0[others])
    # the rows survive a round trip and fold into the weights on merge (a rows-only tied model stays tied)
    fresh = apply_lora(tiny(tied), r=4, alpha=8, targets=["q_proj", "v_proj"])
    load_lora_state_dict(fresh, lora_state_dict(model))
    load_new_rows(fresh, new_rows_state_dict(model))
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)
    with pytest.raises(UserError, match="missing key 'model.layers.0.self_attn.k_proj.lora_a'"):
        load_lora_state_dict(apply_lora(tiny(tied), r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj"]),
                             lora_state_dict(model))
    merge_lora(model)
    assert (model.lm_head is None) == tied
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


def pairs_batch(seed: int = 5) -> dict:
    """Two preference pairs whose responses contain new tokens; one chosen response has thinking-masked tokens, so
    ORPO's loss mask and NLL mask differ."""
    from preflexor.data import collate_pairs

    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(0, V - 4, (n,), generator=g).tolist()

    examples = []
    for P, C, R in [(5, 9, 7), (4, 6, 10)]:
        chosen, rejected = toks(C), toks(R)
        chosen[1], chosen[4], rejected[2] = NEW[0], NEW[2], NEW[1]
        examples.append({"prompt_ids": toks(P), "chosen_ids": chosen, "rejected_ids": rejected})
    examples[0]["chosen_mask"] = [True, False, False] + [True] * 6
    return collate_pairs(examples, pad_id=0)


@pytest.mark.parametrize("tied", [True, False])
def test_policy_logps_rows_head_equals_full_head_autograd(tied, monkeypatch):
    """Stage 1 (LoRA on the projections + trained new-token rows): `policy_logps` takes the rows path of
    `token_logps` through `head_parts()`, and the ORPO losses and every trainable gradient equal those of the old
    path (the [V, H] `head_weight()` with full autograd) within 1e-5; the disabled reference gives the same values."""
    from preflexor import preference
    from preflexor.config import LossConfig
    from preflexor.losses import get_loss
    from preflexor.runtime import Runtime

    model = apply_lora(tiny(tied), r=4, alpha=8)  # stage1_orpo.yaml: projections only
    train_new_token_rows(model, NEW)
    randomize(model)  # B != 0, so every LoRA pair gets a gradient
    head = model.model.embed_tokens if tied else model.lm_head
    with torch.no_grad():
        for m in {model.model.embed_tokens, head}:
            m.new_rows.add_(0.3 * torch.randn(m.new_rows.shape, generator=torch.Generator().manual_seed(9)))
    weight, rows, row_weight = model.head_parts()
    assert row_weight is head.new_rows and torch.equal(rows, torch.tensor(NEW)) and not weight.requires_grad
    assert torch.equal(weight, model.head_weight())
    rt, batch = Runtime(torch.device("cpu"), torch.float32, None), pairs_batch()
    calls = []
    real_token_logps = preference.token_logps
    monkeypatch.setattr(preference, "token_logps",
                        lambda *a, **kw: calls.append(kw["rows"]) or real_token_logps(*a, **kw))

    def step():
        model.zero_grad(set_to_none=True)
        losses, _ = preference.preference_loss(model, batch, LossConfig(name="orpo"), rt)
        losses.mean().backward()
        with torch.no_grad():
            ref = preference.reference_logps(model, batch, get_loss("sigmoid"), rt)
        return losses.detach(), ref, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast = step()
    assert calls[0] is not None  # the policy took the rows path
    monkeypatch.setattr(model, "head_parts", lambda: (model.head_weight(), None, None), raising=False)
    old = step()
    torch.testing.assert_close(fast[0], old[0], atol=1e-5, rtol=1e-5)
    for k in ("chosen", "rejected"):
        assert torch.equal(fast[1][k], old[1][k])  # the same matrix, the same plain path
    assert fast[2].keys() == old[2].keys() and len(fast[2]) == 2 * 7 * 2 + (1 if tied else 2)
    for name, g in fast[2].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, old[2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_head_parts_only_for_rows_only_heads():
    """(weight, None, None) for a plain head, frozen rows and a merged model; the rows split whenever they train,
    with a head LoRA too: that LoRA is kept apart (`head_lowrank`, applied to the hidden states, never folded into
    the matrix), so split matrix + s B A == head_weight(); under disable_lora no low-rank term."""
    plain = tiny(True)
    w, rows, rw = plain.head_parts()
    assert w is plain.model.embed_tokens.weight and rows is None and rw is None
    for tied in (True, False):
        model = train_new_token_rows(apply_lora(tiny(tied), r=4, alpha=8, targets=ALL), NEW)
        randomize(model)
        w, rows, rw = model.head_parts()
        assert rows is not None and rw.requires_grad and not w.requires_grad  # rows split, LoRA apart
        a, b, scale = model.head_lowrank()
        with torch.no_grad():
            torch.testing.assert_close(w + scale * b @ a, model.head_weight())
        with disable_lora(model):
            assert model.head_lowrank() is None
            w, rows, rw = model.head_parts()
            assert rows is not None and torch.equal(w, model.head_weight()) and not w.requires_grad
        head = model.model.embed_tokens if tied else model.lm_head
        head.new_rows.requires_grad_(False)
        with disable_lora(model):
            assert model.head_parts()[1] is None  # nothing in the head trains
        merge_lora(model)
        w, rows, rw = model.head_parts()
        assert rows is None and w is model.lm_head.weight


@pytest.mark.parametrize("untie", [False, True])
def test_new_token_rows_with_embedding_and_head_lora_round_trip(tmp_path, untie):
    model, x = tiny(untie), ids()
    if untie:  # what train_orpo does to a tied base before LoRA on lm_head
        model.untie_head()
    train_new_token_rows(model, NEW)
    apply_lora(model, r=4, alpha=8, targets=ALL)  # after rows: LoRA is added to the same wrappers
    train_step(model, x)
    randomize(model)
    with torch.no_grad():
        logits = model(x)
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(tiny(untie), tmp_path / "ad")  # rows travel inside the saved embedding/head matrices
    assert fresh.lm_head is not None  # a tied model is untied by an adapter whose head matrix differs
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), logits, atol=1e-6, rtol=0)


def _save_for_mismatch(tmp_path):
    model = apply_lora(tiny(True), r=4, alpha=8)
    randomize(model)
    save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


@pytest.mark.parametrize("case, pattern", [
    ("rank", r"adapter rank r=4 but the model's LoRA rank is r=8"),
    ("targets", r"adapter targets .* differ from the model's LoRA targets .*only in adapter: \['down_proj'"),
    ("shape", r"model\.layers\.0\..*\.lora_[AB]\.weight has shape \(\d+, \d+\) but the model expects \(\d+, \d+\)"),
])
def test_load_adapter_mismatch_is_one_line_user_error(tmp_path, case, pattern):
    d = _save_for_mismatch(tmp_path)
    model = {"rank": lambda: apply_lora(tiny(True), r=8, alpha=8),
             "targets": lambda: apply_lora(tiny(True), r=4, alpha=8, targets=["q_proj", "v_proj"]),
             "shape": lambda: tiny(True, hidden=48)}[case]()
    before = base_state(model)
    with pytest.raises(UserError, match=pattern) as e:
        load_adapter(model, d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg
    assert set(model.state_dict()) == set(before)  # nothing was applied before the check failed


def test_load_adapter_bad_files(tmp_path):
    d = _save_for_mismatch(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora=True is not supported"):
        load_adapter(tiny(True), d)
    with pytest.raises(UserError, match="adapter_config.json: not found"):
        load_adapter(tiny(True), tmp_path / "nowhere")


# -- parity with peft --------------------------------------------------------------------------------------------

VARIANTS = [  # (tied, targets, new-token rows)
    (True, list(PROJECTIONS), False),
    (True, list(ALL), False),
    (False, list(ALL), False),
    (True, ["q_proj", "v_proj"], True),  # rows as peft "trainable tokens"
    (False, list(ALL), True),  # rows inside the saved embedding/head matrices
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    return transformers, peft


def hf_base(transformers, tied: bool, d):
    """A random tiny HF Llama saved to `d`; weights scaled up so the parity check is not trivially small."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                                   max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(d)
    return m


def ours_from(d) -> Transformer:
    from preflexor.checkpoint import load_model
    return load_model(d).eval()


# logits reach |14| here (weights scaled up); float32 rounding of the two LoRA formulations (our base GEMM + addmm
# with the A matrices of q/k/v as one GEMM, peft's separate products) differs by up to 5e-5
PEFT_ATOL = 1e-4
QUIET = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # peft's tied-weights notes


@QUIET
@pytest.mark.parametrize("tied, targets, rows", VARIANTS)
def test_peft_adapter_loads_into_ours(hf, tmp_path, tied, targets, rows):
    transformers, peft = hf
    pm = hf_base(transformers, tied, tmp_path / "base")
    extra = {"trainable_token_indices": NEW} if rows and "embed_tokens" not in targets else {}
    pm = peft.get_peft_model(pm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:  # lora_A/B, lora_embedding_A/B, trainable token rows
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        if rows and "embed_tokens" in targets:  # peft saves a LoRA-targeted embedding/head whole: give it new rows
            for mod in (pm.base_model.model.model.embed_tokens, pm.base_model.model.lm_head):
                mod.base_layer.weight[NEW] += torch.randn(len(NEW), 32, generator=g)
    pm.eval()
    pm.save_pretrained(tmp_path / "ad")
    x = ids()
    ours = load_adapter(ours_from(tmp_path / "base"), tmp_path / "ad")
    with torch.no_grad():
        theirs = pm(input_ids=x).logits
        mine = ours(x)
        with pm.disable_adapter():
            theirs_base = pm(input_ids=x).logits
    assert (theirs - theirs_base).abs().max() > 1e-2  # the adapter matters, so the comparison can fail
    torch.testing.assert_close(mine, theirs, atol=PEFT_ATOL, rtol=1e-5)
    if not rows:  # peft also disables trainable tokens; ours keeps them (they belong to the stage-1 model)
        with torch.no_grad(), disable_lora(ours):
            torch.testing.assert_close(ours(x), theirs_base, atol=PEFT_ATOL, rtol=1e-5)


@QUIET
@pytest.mark.parametrize("tied, targets, rows", VARIANTS)
def test_our_adapter_loads_into_peft(hf, tmp_path, tied, targets, rows):
    transformers, peft = hf
    hf_base(transformers, tied, tmp_path / "base")
    ours = apply_lora(ours_from(tmp_path / "base"), r=4, alpha=8, targets=targets)
    if rows:
        train_new_token_rows(ours, NEW)
        with torch.no_grad():
            for _, m in [(n, m) for n, m in ours.named_modules() if getattr(m, "new_rows", None) is not None]:
                m.new_rows.add_(torch.randn(m.new_rows.shape, generator=torch.Generator().manual_seed(7)))
    randomize(ours, std=0.3)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) \
        == sorted(targets)
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                        tmp_path / "ad").eval()
    x = ids()
    with torch.no_grad():
        mine, theirs = ours(x), pm(input_ids=x).logits
        base = ours_from(tmp_path / "base")(x)
    assert (mine - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, mine, atol=PEFT_ATOL, rtol=1e-5)
