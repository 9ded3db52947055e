"""The Triton kernels against plain PyTorch: on CPU through Triton's interpreter (TRITON_INTERPRET=1), on CUDA natively.

The interpreter is switched on by an environment variable that Triton reads when a kernel is built, so the CPU
checks run in a subprocess (this file executed as a script) and the variable never leaks into other tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from preflexor.fast import kernels  # noqa: E402
from preflexor.logprobs import token_logps, token_logps_reference  # noqa: E402

IGNORE = -100
ROOT = Path(__file__).resolve().parent.parent


def _logits(n, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(n, V, generator=g)).to(dtype).to(device)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = IGNORE
    return logits, labels.to(device)


def check_lse_and_logp(device):
    # V = 5000 runs the online loop over two 4096-wide blocks with a ragged tail; V = 7 is a single padded block
    for n, V, dtype in [(13, 1001, torch.float32), (5, 5000, torch.float32), (9, 7, torch.float32),
                        (11, 1001, torch.bfloat16)]:
        logits, labels = _logits(n, V, dtype, device)
        lse, logp = kernels.lse_and_logp(logits, labels, IGNORE)
        x = logits.float()
        ref_lse = torch.logsumexp(x, dim=1)
        ref_logp = torch.log_softmax(x, dim=1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        ref_logp = torch.where(labels == IGNORE, 0.0, ref_logp)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-6)
        assert lse.dtype == logp.dtype == torch.float32


def check_softmax_grad(device):
    # bf16 output: within one bf16 ulp (rtol 2^-7) of the float32 math; the interpreter's bf16 stores need not round
    # to nearest, so half an ulp would be too strict there
    for n, V, dtype, rtol in [(13, 1001, torch.float32, 1e-6), (5, 5000, torch.float32, 1e-6),
                              (11, 1001, torch.bfloat16, 2 ** -7)]:
        logits, labels = _logits(n, V, dtype, device, seed=1)
        scale = torch.randn(n, device=device)
        x = logits.float()
        lse = torch.logsumexp(x, dim=1)
        onehot = torch.nn.functional.one_hot(labels.clamp(min=0), V).float()
        ref = scale[:, None] * (onehot - torch.softmax(x, dim=1))
        ref[labels == IGNORE] = 0.0
        out = kernels.softmax_grad_(logits, labels, lse, scale, IGNORE)
        assert out.data_ptr() == logits.data_ptr() and out.dtype == dtype  # in place
        torch.testing.assert_close(out.float(), ref, atol=1e-6, rtol=rtol)


def check_token_logps_triton(device):
    g = torch.Generator().manual_seed(2)
    N, H, V = 19, 37, 1001
    hidden = torch.randn(N, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) * (4 / H ** 0.5)).to(device)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = IGNORE
    labels = labels.to(device)
    grad_out = torch.randn(N, generator=g).to(device)
    for weight_grad in (True, False):
        results = []
        for fn in (token_logps_reference, lambda h, w, y: token_logps(h, w, y, chunk_size=7, impl="triton")):
            h = hidden.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(weight_grad)
            out = fn(h, w, labels)
            (out * grad_out).sum().backward()
            results.append((out.detach(), h.grad, w.grad))
        (ref_out, ref_gh, ref_gw), (out, gh, gw) = results
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, ref_gh, atol=1e-5, rtol=1e-5)
        if weight_grad:
            torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=1e-5)


def run_all(device):
    check_lse_and_logp(device)
    check_softmax_grad(device)
    check_token_logps_triton(device)


def test_kernels_under_triton_interpreter_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda():
    run_all("cuda")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest, or set TRITON_INTERPRET=1"
    run_all("cpu")
    print("interpreter checks passed")
