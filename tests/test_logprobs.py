"""token_logps (chunked, custom autograd) against the eager reference; sequence_logps sums and means."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preflexor import logprobs
from preflexor.logprobs import default_chunk_size, sequence_logps, token_logps, token_logps_reference

IGNORE = -100
ROOT = Path(__file__).resolve().parent.parent


def _inputs(N=27, H=37, V=1001, dtype=torch.float32, seed=0, logit_std=4.0):
    """Non-power-of-two H and V; logits with std ~logit_std (peaked softmaxes); ~20% ignored labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (logit_std / H ** 0.5)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = IGNORE
    labels[0] = IGNORE
    return hidden.to(dtype), weight.to(dtype), labels


def _fwd_bwd(fn, hidden, weight, labels, grad_out, weight_grad=True, hidden_grad=True):
    h = hidden.clone().requires_grad_(hidden_grad)
    w = weight.clone().requires_grad_(weight_grad)
    out = fn(h, w, labels)
    (out * grad_out).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 7, 100, None])
@pytest.mark.parametrize("grads", ["hidden+weight", "hidden", "weight"])
def test_token_logps_matches_reference_fp32(chunk_size, grads):
    hidden, weight, labels = _inputs()
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    flags = dict(weight_grad="weight" in grads, hidden_grad="hidden" in grads)
    ref = _fwd_bwd(token_logps_reference, hidden, weight, labels, grad_out, **flags)
    ours = _fwd_bwd(lambda h, w, y: token_logps(h, w, y, chunk_size=chunk_size, impl="torch"),
                    hidden, weight, labels, grad_out, **flags)
    assert ours[0].dtype == torch.float32
    assert torch.all(ours[0][labels == IGNORE] == 0.0)
    if flags["hidden_grad"]:
        assert torch.all(ours[1][labels == IGNORE] == 0.0)  # ignored tokens pass no gradient to their hidden row
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_logps_3d_shape_and_no_grad():
    hidden, weight, labels = _inputs(N=24)
    h3, y3 = hidden.view(4, 6, -1), labels.view(4, 6)  # [B, T, H], [B, T]
    out = token_logps(h3, weight, y3, chunk_size=5)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out, token_logps_reference(h3, weight, y3), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = token_logps(h3.requires_grad_(), weight, y3)
    assert not out.requires_grad


@pytest.mark.parametrize("weight_grad", [True, False])
def test_token_logps_gradcheck_float64(weight_grad):
    hidden, weight, labels = _inputs(N=6, H=5, V=7, dtype=torch.float64, logit_std=2.0)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(weight_grad)
    assert torch.autograd.gradcheck(lambda h, w: token_logps(h, w, labels, chunk_size=4, impl="torch"), (h, w))


@pytest.mark.parametrize("weight_grad", [True, False])
def test_token_logps_bf16_no_worse_than_eager(weight_grad):
    """CCE-style: |ours_bf16 - gt| <= |eager_bf16 - gt| + 1e-2 elementwise, gt = the fp32 reference on the same
    (bf16-representable) inputs. The upstream gradient is scaled like a mean loss (|grad| well below 1), so 1e-2 is
    a few bf16 ulps of the gradients, not a free pass: a wrong softmax or a missed row is off by ~0.1."""
    hidden, weight, labels = _inputs(N=64, H=48, V=503, seed=3)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    grad_out = 0.25 * torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    gt = _fwd_bwd(token_logps_reference, hb.float(), wb.float(), labels, grad_out, weight_grad)
    eager = _fwd_bwd(token_logps_reference, hb, wb, labels, grad_out, weight_grad)
    ours = _fwd_bwd(lambda h, w, y: token_logps(h, w, y, chunk_size=24, impl="torch"), hb, wb, labels, grad_out,
                    weight_grad)
    assert ours[1].dtype == torch.bfloat16 and (not weight_grad or ours[2].dtype == torch.bfloat16)
    for name, o, e, t in zip(["logp", "grad_hidden", "grad_weight"], ours, eager, gt):
        if t is None:
            continue
        err_ours, err_eager = (o.float() - t).abs(), (e.float() - t).abs()
        assert torch.all(err_ours <= err_eager + 1e-2), f"{name}: worst excess {(err_ours - err_eager).max():.3g}"


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (views, such as W.t(), hold no memory
    of their own and are skipped)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("weight_grad", [True, False])
def test_token_logps_never_materialises_full_logits(weight_grad):
    hidden, weight, labels = _inputs(N=128, H=16, V=1001)
    N, V = hidden.shape[0], weight.shape[0]
    grad_out = torch.ones(N)
    with _LargestTensor() as eager:
        _fwd_bwd(token_logps_reference, hidden, weight, labels, grad_out, weight_grad)
    assert eager.max_numel >= N * V  # the probe sees the [N, V] logits of the eager path
    with _LargestTensor() as ours:
        _fwd_bwd(lambda h, w, y: token_logps(h, w, y, chunk_size=16, impl="torch"), hidden, weight, labels, grad_out,
                 weight_grad)
    assert ours.max_numel <= max(16 * V, V * hidden.shape[1])  # one [chunk, V] block, or the [V, H] weight grad


# -- a head whose only trainable part is a few rows (stage 1: the new thinking tokens) ---------------------------


def _rows_inputs(in_labels: bool, dtype=torch.float32, **kw):
    """_inputs plus K=3 trained rows (unsorted ids) with fresh values; `in_labels` puts two of them among the labels,
    else no label is a trained row (their gradient is then the softmax term alone)."""
    hidden, weight, labels = _inputs(**kw)
    rows = torch.tensor([weight.shape[0] - 3, 4, weight.shape[0] // 2])
    g = torch.Generator().manual_seed(7)
    row_weight = (torch.randn(len(rows), weight.shape[1], generator=g) * 4 / weight.shape[1] ** 0.5).to(dtype)
    labels[torch.isin(labels, rows)] = 0
    if in_labels:
        labels[[2, 5, 9]] = rows[[0, 1, 0]]
    return hidden.to(dtype), weight.to(dtype), labels, rows, row_weight


def _rows_fwd_bwd(fn, hidden, row_weight, grad_out):
    h, r = hidden.clone().requires_grad_(), row_weight.clone().requires_grad_()
    out = fn(h, r)
    (out * grad_out).sum().backward()
    return out.detach(), h.grad, r.grad


def _ref_rows(weight, labels, rows):
    """The plain path: the head built by index_put, full autograd through it (what stage 1 did before)."""
    return lambda h, r: token_logps_reference(h, weight.index_put((rows,), r), labels)


def _ours_rows(weight, labels, rows, **kw):
    """The rows path: a constant head holding the rows' values, gradient to the [K, H] rows only."""
    return lambda h, r: token_logps(h, weight.index_put((rows,), r.detach()), labels, rows=rows, row_weight=r, **kw)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, None])
@pytest.mark.parametrize("in_labels", [True, False])
def test_token_logps_rows_matches_index_put_reference(chunk_size, in_labels):
    hidden, weight, labels, rows, row_weight = _rows_inputs(in_labels)
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    ref = _rows_fwd_bwd(_ref_rows(weight, labels, rows), hidden, row_weight, grad_out)
    ours = _rows_fwd_bwd(_ours_rows(weight, labels, rows, chunk_size=chunk_size, impl="torch"), hidden, row_weight,
                         grad_out)
    assert ours[2].shape == row_weight.shape and ours[2].abs().min() > 0  # every trained row gets a gradient
    assert torch.all(ours[1][labels == IGNORE] == 0.0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # only the hidden needs a gradient (rows constant): the frozen-head path, same values
    h = hidden.clone().requires_grad_()
    out = token_logps(h, weight.index_put((rows,), row_weight), labels, chunk_size=chunk_size, rows=rows,
                      row_weight=row_weight)
    (out * grad_out).sum().backward()
    torch.testing.assert_close(h.grad, ref[1], atol=1e-5, rtol=1e-5)


def test_token_logps_rows_gradcheck_float64_and_rows_only():
    hidden, weight, labels, rows, row_weight = _rows_inputs(True, dtype=torch.float64, N=12, H=5, V=9,
                                                            logit_std=2.0)
    rows = torch.tensor([7, 1])
    row_weight = row_weight[:2]
    labels[3] = 1

    def f(h, r):
        return token_logps(h, weight.index_put((rows,), r.detach()), labels, chunk_size=5, impl="torch", rows=rows,
                           row_weight=r)

    h, r = hidden.requires_grad_(), row_weight.requires_grad_()
    assert torch.autograd.gradcheck(f, (h, r))
    assert torch.autograd.gradcheck(lambda r: f(hidden.detach(), r), (r,))  # constant hidden: row gradient alone


def test_token_logps_rows_bf16_no_worse_than_eager():
    """The CUDA training dtypes: bf16 activations, float32 head and rows; CCE-style bound as in the bf16 test above."""
    hidden, weight, labels, rows, row_weight = _rows_inputs(True, N=64, H=48, V=503, seed=3)
    hb = hidden.bfloat16()
    grad_out = 0.25 * torch.randn(labels.shape, generator=torch.Generator().manual_seed(4))
    gt = _rows_fwd_bwd(_ref_rows(weight, labels, rows), hb.float(), row_weight, grad_out)
    eager = _rows_fwd_bwd(_ref_rows(weight, labels, rows), hb, row_weight, grad_out)
    ours = _rows_fwd_bwd(_ours_rows(weight, labels, rows, chunk_size=24, impl="torch"), hb, row_weight, grad_out)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for name, o, e, t in zip(["logp", "grad_hidden", "grad_rows"], ours, eager, gt):
        err_ours, err_eager = (o.float() - t).abs(), (e.float() - t).abs()
        assert torch.all(err_ours <= err_eager + 1e-2), f"{name}: worst excess {(err_ours - err_eager).max():.3g}"


def test_token_logps_rows_never_forms_a_vocab_by_hidden_gradient():
    hidden, weight, labels, rows, row_weight = _rows_inputs(True, N=128, H=16, V=1001)
    w = weight.index_put((rows,), row_weight)
    with _LargestTensor() as probe:
        _rows_fwd_bwd(lambda h, r: token_logps(h, w, labels, chunk_size=8, impl="torch", rows=rows, row_weight=r),
                      hidden, row_weight, torch.ones(128))
    assert probe.max_numel <= 8 * w.shape[0] < w.numel()  # one [chunk, V] block; no [V, H] tensor at all


def test_token_logps_rows_bad_args():
    hidden, weight, labels, rows, row_weight = _rows_inputs(True, N=10)
    w = weight.index_put((rows,), row_weight)
    cases = [
        (dict(rows=rows), "both or neither"),
        (dict(rows=rows.float(), row_weight=row_weight), "1-D integer"),
        (dict(rows=rows[:, None], row_weight=row_weight), "1-D integer"),
        (dict(rows=rows, row_weight=row_weight[:2]), r"\[K, H\] = \[3, 37\]"),
        (dict(rows=rows, row_weight=row_weight[:, :5]), r"\[K, H\]"),
        (dict(rows=torch.tensor([4, 4, 9]), row_weight=row_weight), "distinct"),
        (dict(rows=torch.tensor([4, 1001, 9]), row_weight=row_weight), r"in \[0, 1001\)"),
        (dict(rows=rows, row_weight=row_weight + 1), "differs from row_weight"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            token_logps(hidden, w, labels, **kw)
    with pytest.raises(ValueError, match="weight is a constant"):
        token_logps(hidden, w.requires_grad_(), labels, rows=rows, row_weight=row_weight)


def check_rows_triton(device: str) -> None:
    """The rows path through the Triton kernels against the index_put reference (run under TRITON_INTERPRET=1 on
    CPU by the test below, natively on CUDA)."""
    hidden, weight, labels, rows, row_weight = _rows_inputs(True, N=19)
    hidden, weight, labels, rows, row_weight = (t.to(device) for t in (hidden, weight, labels, rows, row_weight))
    grad_out = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref = _rows_fwd_bwd(_ref_rows(weight, labels, rows), hidden, row_weight, grad_out)
    ours = _rows_fwd_bwd(_ours_rows(weight, labels, rows, chunk_size=7, impl="triton"), hidden, row_weight, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_logps_rows_triton_interpreter_on_cpu():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows triton checks passed" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_token_logps_rows_triton_on_cuda():
    pytest.importorskip("triton")
    check_rows_triton("cuda")


def test_default_chunk_size_and_bad_args():
    assert default_chunk_size(10, 49152) == 10
    assert default_chunk_size(2048, 49152) == 512  # a quarter of the tokens
    assert default_chunk_size(4096, 128256) == 1024
    assert default_chunk_size(1000, 1001) == logprobs.MIN_CHUNK
    cuda = torch.device("cuda")  # on a GPU the byte cap alone: 1040 tokens of 128256 logits, not a quarter
    assert default_chunk_size(2048, 128256, cuda) == 1040 and default_chunk_size(300, 128256, cuda) == 300
    for V in (49152, 128256):  # long batches: capped by bytes
        rows = default_chunk_size(100_000, V)
        assert rows % 8 == 0 and rows * V * 4 <= logprobs.CHUNK_BYTES < (rows + 8) * V * 4
    hidden, weight, labels = _inputs(N=8)
    with pytest.raises(ValueError, match="labels"):
        token_logps(hidden, weight, labels[:5])
    with pytest.raises(ValueError, match="same H"):
        token_logps(hidden[:, :10], weight, labels)
    with pytest.raises(ValueError, match="labels must be in"):
        token_logps(hidden, weight, torch.full_like(labels, weight.shape[0]))
    with pytest.raises(ValueError, match="impl"):
        token_logps(hidden, weight, labels, impl="cuda")


def test_impl_choice_and_the_plain_path():
    """No impl = auto = the chunked torch path on the CPU; "plain" (no fast paths installed: `F.linear`, no oneDNN)
    equals it, values and gradients; anything else is a ValueError naming the choices."""
    hidden, weight, labels = _inputs(N=40)
    assert logprobs._resolve_impl(None, torch.device("cpu")) == "torch"  # auto on CPU
    with pytest.raises(ValueError, match="auto|torch|triton|plain"):
        token_logps(hidden, weight, labels, impl="bogus")
    grad_out = torch.randn(40)
    for weight_grad in (False, True):
        a, b = (_fwd_bwd(lambda h, w, y: token_logps(h, w, y, chunk_size=16, impl=impl), hidden, weight, labels,
                         grad_out, weight_grad) for impl in ("torch", "plain"))
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_sequence_logps_sum_mean_and_masks():
    tok = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, 0.0, 0.0], [-9.0, -9.0, -9.0, -9.0]])
    response = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(sequence_logps(tok, response, average=False), torch.tensor([-9.0, -1.0, 0.0]))
    torch.testing.assert_close(sequence_logps(tok, response, average=True), torch.tensor([-3.0, -0.5, 0.0]))
    thinking = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # hide token 1 of row 0
    answer_only = response & ~thinking
    torch.testing.assert_close(sequence_logps(tok, answer_only, average=True), torch.tensor([-3.5, -0.5, 0.0]))
    torch.testing.assert_close(sequence_logps(tok, answer_only.float(), average=False), torch.tensor([-7.0, -1.0, 0.0]))
    assert sequence_logps(tok.bfloat16(), response, average=True).dtype == torch.float32
    with pytest.raises(ValueError, match="mask"):
        sequence_logps(tok, response[:, :3], average=True)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logps(tok.flatten(), response.flatten(), average=False)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest, or set TRITON_INTERPRET=1"
    check_rows_triton("cpu")
    print("rows triton checks passed")


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("impl", ["torch", "plain"])
def test_token_logps_lowrank_head_term_matches_the_folded_head(with_rows, impl):
    """A head LoRA as a term on the hidden states (`lowrank=(A, B, s)`: logits = h W^T + s (h A^T) B^T) == the
    folded head W + s B A with full autograd: values and the gradients of hidden, A, B (and trained rows), 1e-5;
    float64 gradcheck of the custom backward."""
    hidden, weight, labels = _inputs(N=40)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, weight.shape[1], generator=g) * 0.3, torch.randn(weight.shape[0], 3, generator=g) * 0.3
    rows = torch.tensor([3, 17, 400]) if with_rows else None
    up = torch.randn(40, generator=g)

    def run(fused: bool):
        h, A, B = hidden.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        rw = weight[rows].clone().requires_grad_() if with_rows else None
        if fused:
            kw = {"rows": rows, "row_weight": rw} if with_rows else {}
            out = token_logps(h, weight, labels, chunk_size=16, impl=impl, lowrank=(A, B, 0.7), **kw)
        else:
            w = weight.index_put((rows,), rw) if with_rows else weight
            out = token_logps_reference(h, w + 0.7 * B @ A, labels)
        grads = torch.autograd.grad((out * up).sum(), [h, A, B] + ([rw] if with_rows else []))
        return out, grads

    (got, g1), (ref, g2) = run(True), run(False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    hd, wd, ad, bd = (t.double() for t in (hidden[:6], weight[:50], a, b[:50]))
    lab = labels[:6].clamp(max=49)
    assert torch.autograd.gradcheck(lambda h, A, B: token_logps(h, wd, lab, chunk_size=4, impl=impl,
                                                                 lowrank=(A, B, 0.7)),
                                    (hd.requires_grad_(), ad.requires_grad_(), bd.requires_grad_()))
