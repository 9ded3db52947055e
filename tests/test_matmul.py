"""`matmul.linear`: oneDNN on the CPU == F.linear (float32 rounding), and it steps aside wherever it does not apply."""
import pytest
import torch
import torch.nn.functional as F

from preflexor.fast import matmul


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(transposed, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=g)
    w = torch.randn(96, 130, generator=g).t() if transposed else torch.randn(130, 96, generator=g)  # a view or not
    b = torch.randn(130, generator=g) if bias else None
    assert matmul.onednn_ok(x, w, b) == torch.backends.mkldnn.is_available()
    torch.testing.assert_close(matmul.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matmul.linear(x[0, :0], w, b), F.linear(x[0, :0], w, b))  # no rows


def test_linear_steps_aside(monkeypatch):
    """Inputs that need autograd (oneDNN's op has no backward), float64, autocast and `ONEDNN = False` take F.linear."""
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    xg = x.clone().requires_grad_(True)
    assert not matmul.onednn_ok(xg, w) and not matmul.onednn_ok(x.double(), w.double())
    y = matmul.linear(xg, w)
    y.sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(5, 8))
    with torch.no_grad():
        assert matmul.onednn_ok(xg, w) == torch.backends.mkldnn.is_available()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not matmul.onednn_ok(x, w) and matmul.linear(x, w).dtype == torch.bfloat16
    monkeypatch.setattr(matmul, "ONEDNN", False)
    assert not matmul.onednn_ok(x, w)
