"""The CUDA path, tested on the CPU: the runtime with the CUDA calls faked (device index, collectives on the run's
device, process-group timeout, TF32), kernels launched on their tensor's GPU, evaluation in the run's dtype, and
float32 adapters over a bf16 base (updates below half a bf16 ulp must not round away)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from preflexor import runtime
from preflexor.runtime import Runtime, all_reduce_mean, setup_runtime


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.is_available() -> True; set_device and init_process_group recorded instead of run."""
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(runtime.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.dist, "init_process_group", lambda **kw: calls["init"].append(kw))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PREFLEXOR_DEVICE"):
        monkeypatch.delenv(k, raising=False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield calls
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_single_gpu_gets_an_indexed_device_and_tf32(fake_cuda):
    rt = setup_runtime("cuda", "auto", verbose=False)
    assert rt.device == torch.device("cuda", 0) and fake_cuda["set_device"] == [torch.device("cuda", 0)]
    assert rt.dtype == torch.bfloat16 and rt.autocast == torch.bfloat16 and fake_cuda["init"] == []
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_torchrun_rank_uses_its_local_gpu_and_the_configured_timeout(fake_cuda, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rt = setup_runtime("auto", "auto", verbose=False, timeout_s=120)
    assert rt.device == torch.device("cuda", 1) and (rt.rank, rt.world) == (1, 2) and not rt.main
    assert fake_cuda["init"] == [{"backend": "nccl", "timeout": timedelta(seconds=120)}]


def test_collectives_run_on_the_process_groups_device(monkeypatch):
    """nccl reduces CUDA tensors only: the metric all-reduce builds its tensor on the run's device."""
    seen = []

    class Stop(Exception):
        pass

    def fake_all_reduce(t):
        seen.append(t.device)
        raise Stop

    monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce)
    with pytest.raises(Stop):
        all_reduce_mean(1.0, Runtime(torch.device("meta"), torch.bfloat16, torch.bfloat16, rank=0, world=2))
    assert seen == [torch.device("meta")]
    assert all_reduce_mean(3.0, Runtime(torch.device("cpu"), torch.float32, None)) == 3.0  # one process: no call


def test_kernels_launch_on_their_tensors_gpu(monkeypatch):
    from preflexor.fast import kernels

    entered = []

    class Ctx:
        def __init__(self, d):
            entered.append(torch.device(d))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "device", Ctx)

    class OnGPU1:
        device = torch.device("cuda", 1)

    with kernels.on_device(OnGPU1()):
        pass
    with kernels.on_device(torch.zeros(1)):  # CPU (the Triton interpreter): no CUDA context
        pass
    assert entered == [torch.device("cuda", 1)]


def test_evaluation_loads_models_in_the_runs_dtype(monkeypatch, tmp_path):
    import evaluate

    got = []
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda src, **kw: got.append(kw) or (_Tiny(), None))
    evaluate._load("smollm2-135m-instruct", Runtime(torch.device("cpu"), torch.bfloat16, None), "model", False)
    assert got[0]["dtype"] == torch.bfloat16 and got[0]["device"] == torch.device("cpu")


class _Tiny(torch.nn.Module):
    pass


def test_fp32_adapters_over_a_bf16_base_move_at_stage2s_learning_rate(tiny_llama_dir):
    """A bf16 base: LoRA A/B and the new-token rows are float32 parameters, so one AdamW step at lr 5e-7 changes
    every one of them (in bf16 they would not move: the update is far below half an ulp); the loss equals that of
    the same model computed entirely in float32 within bf16 tolerance."""
    import copy

    from preflexor.checkpoint import load_model_and_tokenizer
    from preflexor.config import LossConfig
    from preflexor.data import collate_pairs, tokenize_pairs
    from preflexor.lora import apply_lora, train_new_token_rows
    from preflexor.optim import build_optimizer
    from preflexor.preference import preference_loss
    from test_train import write_pairs

    model, tok = load_model_and_tokenizer(tiny_llama_dir, dtype="bfloat16")
    apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj", "down_proj", "lm_head"])
    train_new_token_rows(model, sorted(tok.reasoning_ids.values()))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        from preflexor.data import load_pairs

        examples, _ = tokenize_pairs(tok, load_pairs(write_pairs(Path(d) / "p.jsonl", n=2)), max_length=96)
    batch = collate_pairs(examples, tok.pad_id)
    rt = Runtime(torch.device("cpu"), torch.bfloat16, None)
    reference = copy.deepcopy(model).float()  # the fp32-adapter reference: the same numbers without bf16 rounding
    losses, _ = preference_loss(model, batch, LossConfig(name="orpo"), rt)
    ref_losses, _ = preference_loss(reference, batch, LossConfig(name="orpo"), Runtime(torch.device("cpu"),
                                                                                        torch.float32, None))
    torch.testing.assert_close(losses, ref_losses, atol=2e-2, rtol=2e-2)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = build_optimizer(model, 5e-7, 0.0, rt.device)
    losses.mean().backward()
    opt.step()
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    assert unchanged == [], unchanged


@pytest.mark.slow
def test_gpu_check_runs_in_tiny_cpu_mode(tmp_path, tiny_llama_dir):
    """`make gpu-check`'s script with tiny shapes on the CPU (Triton interpreted), so it cannot rot between the
    sessions that have a GPU: every item runs, the kernels agree with float32, EXO starts at policy == reference, one
    step at lr 5e-7 moves the float32 adapters, and the scripts train, resume and run stage 2."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "check.jsonl"
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--tiny", "--out", str(out), "--tokenizer",
                        str(tiny_llama_dir / "tokenizer.json")], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {x["item"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert list(recs) == ["versions", "kernels", "loss_head", "training_step", "sampling", "decode", "scripts"]
    assert not any("error" in x for x in recs.values())
    k = recs["kernels"]
    for mode in ("frozen", "weight_grad", "rows"):
        assert k[mode]["logp_max_abs_err"] <= 2 * k[mode]["eager_bf16_logp_max_abs_err"] + 1e-3
        assert all(v < 0.05 for key, v in k[mode].items() if key.endswith("rel_err"))
    t = recs["training_step"]
    assert t["exo_step0_policy_minus_reference_max"] == 0.0 and t["adapter_dtype"] == "float32"
    assert t["moved_after_one_step_lr5e-07"] == {"lora_a": 1.0, "lora_b": 1.0}
    s = recs["scripts"]
    assert [s[k]["rc"] for k in ("stage1", "stage1_resume", "stage2")] == [0, 0, 0] and s["stage1_resume"]["resumed"]
    assert s["stage1_resume"]["losses"][:2] == s["stage1"]["losses"]  # the resumed run kept the first iteration's log


@pytest.mark.parametrize("tied", [True, False])
def test_head_lora_is_a_low_rank_term_not_folded_into_a_bf16_head(tied):
    """A bf16 head with a LoRA whose delta is far below half a bf16 ulp of W: folded into the [V, H] bf16 matrix it
    vanishes (the folded logits equal the base's). The training head (token_logps on head_parts + head_lowrank, in
    float32 as the preference forward runs it without autocast) sees it; the model's and the sampler's heads apply
    the same low-rank term (in the activations' dtype)."""
    from preflexor.logprobs import token_logps
    from preflexor.lora import apply_lora
    from preflexor.model import ModelArgs, Transformer
    from preflexor.sampler import _head, head_params

    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.0)  # head entries ~0.75: half a bf16 ulp there is ~2e-3
    model = model.to(torch.bfloat16)
    apply_lora(model, 2, 2, 0.0, ["lm_head"])
    head = model.model.embed_tokens if tied else model.lm_head
    a, b = (head.head_lora_a, head.head_lora_b) if tied else (head.lora_a, head.lora_b)
    with torch.no_grad():
        a.fill_(1.0)
        b.normal_(0, 1e-5, generator=torch.Generator().manual_seed(1))  # delta s B A ~1e-5: rounds away in a fold
    assert a.dtype == torch.float32
    x = torch.randn(3, 32).bfloat16()
    base = torch.nn.functional.linear(x.float(), head.weight.float())
    folded = torch.nn.functional.linear(x.float(), model.head_weight().float())
    assert torch.equal(folded, base)  # the fold loses the delta entirely
    want = base + (x.float() @ a.t()) @ b.t()  # scale alpha / r = 1
    weight, rows, row_weight = model.head_parts()
    A, B, s = model.head_lowrank()
    labels = torch.tensor([1, 2, 3])
    tl = token_logps(x.float(), weight.float(), labels, lowrank=(A.float(), B.float(), s))
    ref, flat = (torch.log_softmax(z.double(), -1).gather(1, labels[:, None])[:, 0] for z in (want, base))
    assert float((tl.detach().double() - flat).abs().max()) > 1e-5  # the delta moves the log-probs ...
    torch.testing.assert_close(tl.double(), ref, atol=1e-6, rtol=0)  # ... exactly as the unfolded head says
    lowrank = torch.nn.functional.linear(x, head.weight) + torch.nn.functional.linear(
        torch.nn.functional.linear(x, A.to(x.dtype)), B.to(x.dtype)) * s
    assert torch.equal(model.head_logits(x), lowrank)
    assert torch.equal(_head(model, x, head_params(model)), lowrank.float())


def test_generation_on_cuda_leaves_cudnn_attention_out():
    """cuDNN's SDPA plans are specialised to the key length, which grows every decode step (on an H200 each call cost
    1.7 ms of CPU, bench/RESULTS_gpu.md): a generation on CUDA runs with cuDNN attention switched off, restores the
    flags afterwards, and leaves the CPU's choice alone."""
    from preflexor.sampler import decode_attention

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention(torch.device("cuda", 0)):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with decode_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
