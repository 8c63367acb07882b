"""Max pooling for sparse CNNs: :func:`max_pool2d`.

A ResNet stem (dense 7x7 conv, ReLU, 3x3 max pool) runs the dense conv channels-last (where torch's
conv is fastest) while the sparse convs after it read NCHW. This op pools channels-last input along
the channels (the CPU's vectors), applies the ReLU that came before it (``max`` and ``relu``
commute: the same values), and writes NCHW: one pass instead of ReLU, torch's pool and a layout
copy. Any other input is pooled plane by plane.
"""

from __future__ import annotations

import torch

from fastprune.ops.sparse import _float_tensor, _pair, _run
from fastprune.reference import pool as _reference

__all__ = ["max_pool2d"]


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int] = 0,
    relu: bool = False,
) -> torch.Tensor:
    """``F.max_pool2d(input, kernel_size, stride, padding)``, then ReLU when ``relu``.

    Shapes: input (N, C, H, W), any memory format -> (N, C, Hout, Wout), NCHW-contiguous. No
    dilation, ceil mode or indices; ``2 * padding <= kernel_size`` (as torch requires). NaN
    propagates as in torch (a window holding NaN gives NaN). float32 runs the vectorised CPU loops
    (the ISA chosen at run time), float64 the portable ones. Differentiable with respect to
    ``input``.
    """
    _float_tensor(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    k, s, p = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), _pair(padding, "padding")
    if min(k) < 1 or min(s) < 1:
        raise ValueError(f"kernel_size and stride must be positive, got {kernel_size!r} and {stride!r}")
    if min(p) < 0 or any(2 * pi > ki for pi, ki in zip(p, k, strict=True)):
        raise ValueError(f"padding must be between 0 and half the kernel size, got {padding!r} for {kernel_size!r}")
    if any(n + 2 * pi < ki for n, pi, ki in zip(input.shape[2:], p, k, strict=True)):
        raise ValueError(f"the {tuple(input.shape[2:])} input (padded by {p}) is smaller than the {k} kernel")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    return _run(torch.ops.fastprune.max_pool2d.default, input, k, s, p, relu)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, k, s, p, relu = inputs
    ctx.conf = (list(k), list(s), list(p), relu)
    ctx.save_for_backward(x)


def _backward(ctx, grad):  # noqa: ANN001
    (x,) = ctx.saved_tensors
    k, s, p, relu = ctx.conf
    with torch.enable_grad():
        xr = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(_reference.max_pool2d(xr, k, s, p, relu), xr, grad)
    return gx, None, None, None, None


torch.library.register_autograd("fastprune::max_pool2d", _backward, setup_context=_setup)
