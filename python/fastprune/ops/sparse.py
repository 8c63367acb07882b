"""CSR sparse execution: ``pack_sparse`` and ``sparse_linear``.

The packed form of a weight (out, in) is three tensors (the schema is fixed):

* ``row_ptr`` int32 (out + 1): row o's nonzeros are ``[row_ptr[o], row_ptr[o + 1])``;
* ``col_idx`` int16 when in <= 65536 (the kernels read it as uint16), else int32: their columns;
* ``values`` the nonzeros, in the weight's dtype.

Batch-1 sparse products are memory-bound: 16-bit columns make a nonzero cost 6 bytes instead of 8,
which is what lets a 90 %-sparse layer run more than 5x faster than its dense twin.
"""

from __future__ import annotations

import torch

from fastprune.reference import sparse as _reference
from fastprune.reference.sparse import unpack_sparse

__all__ = ["pack_sparse", "sparse_bottleneck", "sparse_conv2d", "sparse_ffn", "sparse_linear", "unpack_sparse"]


def _run(op: torch._ops.OpOverload, *args: object) -> torch.Tensor:
    """``op(*args)``; with gradients off, below the autograd layer. The autograd kernel that
    ``torch.library.register_autograd`` installs is Python: with gradients off it only redispatches
    below itself, after converting every argument to Python objects and back, ~17 us a call
    (measured, 4x4 input, Intel Xeon: 40 us a call through it, 23 us below it; 54 such calls make
    a ResNet-50). Skipping it computes the same thing; under ``torch.compile`` the op is called as
    it is (the tracer sees one call)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _float_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def pack_sparse(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR form of ``weight`` (out, in) without its zeros: ``(row_ptr, col_idx, values)``.

    Raises ValueError for a weight that is not 2-D or holds NaN/Inf (a conv filter is flattened
    to (out, in/groups * kh * kw) first).
    """
    w = _float_tensor(weight, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds NaN or Inf: it cannot be packed")
    return torch.ops.fastprune.pack_sparse(w.detach())


def sparse_linear(
    input: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    in_features: int,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """``act(input @ W^T + bias)`` with W in :func:`pack_sparse`'s form.

    Shapes: input (..., in_features) -> (..., out) with out = ``row_ptr.numel() - 1``; float32 runs
    the vectorised CPU kernels (AVX-512 / AVX2 / portable, chosen at run time), float64 the
    portable loop. Differentiable with respect to ``input`` (and ``bias``); gradients with
    respect to the packed weight are not supported (train the dense layer, then pack).
    """
    _float_tensor(input, "input")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension must be {in_features} (the packed weight's in_features), "
            f"got shape {tuple(input.shape)}"
        )
    _check_columns(col_idx, in_features)
    return _run(torch.ops.fastprune.sparse_linear.default, input, row_ptr, col_idx, values, in_features, bias, relu)


def sparse_ffn(
    input: torch.Tensor,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    up_bias: torch.Tensor | None,
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down_bias: torch.Tensor | None,
    in_features: int,
    activation: str = "gelu",
) -> torch.Tensor:
    """``down(act(up(input)))`` for two weights in :func:`pack_sparse`'s form (``up`` and ``down`` are
    ``(row_ptr, col_idx, values)``), ``act`` one of ``"gelu"`` (exact erf), ``"relu"``, ``"none"``.

    The same values as :func:`sparse_linear`, the activation, then :func:`sparse_linear` (which is
    what runs for float64 or fewer rows than the panel loop's block); from one full block of
    samples on (64 with AVX-512, 32 with AVX2) each block's hidden activations stay in the blocked
    layout the second layer reads, in cache, instead of being written out as an (n, hidden)
    matrix and read back: a transformer's feed-forward block. There the GELU is applied to the
    first layer's accumulators as they are stored, erf by a piecewise polynomial (within 3e-7 of
    float64 GELU times 1 + ``|x|``; ATen's float32 GELU: 1.2e-6), so the values match the composed
    form to float rounding rather than bit for bit. Differentiable with respect to ``input`` and
    the biases."""
    _float_tensor(input, "input")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive int, got {in_features!r}")
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"input's last dimension must be {in_features}, got shape {tuple(input.shape)}")
    if activation not in ("gelu", "relu", "none"):
        raise ValueError(f"activation must be 'gelu', 'relu' or 'none', got {activation!r}")
    hidden = up[0].numel() - 1
    _check_columns(up[1], in_features)
    _check_columns(down[1], hidden)
    return _run(torch.ops.fastprune.sparse_ffn.default, input, *up, up_bias, *down, down_bias, in_features, activation)


def _check_columns(col_idx: torch.Tensor, in_features: int) -> None:
    """A packed weight made for a wider input is a clear error. (The native op is memory-safe either
    way: 16-bit columns read a zero-padded copy of the input, 32-bit ones are range-checked.)"""
    if torch.compiler.is_compiling():  # under compile the op's own checks remain (memory-safe)
        return
    hit = getattr(col_idx, "_fastprune_max_col", None)
    if hit is not None and hit[1] < in_features and hit[0] == col_idx._version:
        return  # (checked before and unchanged since: the common case, ~1 us)
    if col_idx.dtype != torch.int16 or col_idx.numel() == 0 or col_idx.device.type == "meta":
        return
    # (version counter, largest column), kept on the tensor: checked once per packed weight, not per call
    if col_idx.is_inference():  # no version counter to key a cache on: checked each call
        hit = (None, int((col_idx.to(torch.int32) & 0xFFFF).max()))
    else:
        hit = getattr(col_idx, "_fastprune_max_col", None)
    if hit is None or (hit[0] is not None and hit[0] != col_idx._version):
        hit = (col_idx._version, int((col_idx.to(torch.int32) & 0xFFFF).max()))
        col_idx._fastprune_max_col = hit
    if hit[1] >= in_features:
        raise ValueError(
            f"col_idx holds column {hit[1]} but in_features is {in_features}: the packed weight was made "
            "for a different shape"
        )


def _sparse_linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    input, row_ptr, col_idx, values, in_features, bias, relu = inputs
    ctx.in_features, ctx.relu, ctx.has_bias = in_features, relu, bias is not None
    ctx.save_for_backward(row_ptr, col_idx, values, output if relu else None)


def _sparse_linear_backward(ctx, grad):  # noqa: ANN001
    row_ptr, col_idx, values, output = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise RuntimeError(
            "sparse_linear: gradients with respect to the packed weight (values) are not supported; "
            "train the dense layer (masked) and pack it again"
        )
    if ctx.relu:
        grad = grad * (output > 0).to(grad.dtype)
    w = unpack_sparse(row_ptr, col_idx, values, ctx.in_features)
    grad_input = grad @ w if ctx.needs_input_grad[0] else None
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return grad_input, None, None, None, None, grad_bias, None


torch.library.register_autograd("fastprune::sparse_linear", _sparse_linear_backward, setup_context=_sparse_linear_setup)


def _pair(v: int | tuple[int, int] | list[int], name: str) -> list[int]:
    if type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return list(v)  # (the common case first: a module's own tuples, ~0.3 us instead of 1.5)
    vals = [v, v] if isinstance(v, int) and not isinstance(v, bool) else list(v)
    if len(vals) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) for t in vals):
        raise ValueError(f"{name} must be an int or two ints, got {v!r}")
    return vals


def sparse_conv2d(
    input: torch.Tensor,
    row_ptr: torch.Tensor,
    col_idx: torch.Tensor,
    values: torch.Tensor,
    weight_shape: tuple[int, int, int, int] | list[int],
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(conv2d(input, W) + bias + residual)`` with W (out, in/groups, kh, kw) packed by
    :func:`pack_sparse` from ``W.flatten(1)``.

    Shapes: input (N, C, H, W) -> (N, out, Hout, Wout), as ``F.conv2d`` with the same stride,
    padding (zeros), dilation and groups (depthwise included). The CPU kernel is a direct
    convolution vectorised along output pixels: the input is laid out once per call in stride
    phases so that every nonzero tap reads a contiguous run (no im2col). ``residual`` (the
    output's shape) is added before the optional ReLU. Differentiable with respect to ``input``,
    ``bias`` and ``residual``; not with respect to the packed weight.

    The packed form does not record how many columns its weight had: a ``weight_shape`` with fewer
    columns (in/groups * kh * kw) than a packed column index is an error, but one with more cannot
    be told from the right one (keep the shape with the packed tensors, as
    :class:`fastprune.nn.SparseConv2d` does).
    """
    _float_tensor(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    ws = [int(v) for v in weight_shape]
    if len(ws) != 4:
        raise ValueError(f"weight_shape must be (out, in/groups, kh, kw), got {weight_shape!r}")
    if input.shape[1] != ws[1] * groups:
        raise ValueError(
            f"input has {input.shape[1]} channels; the packed weight expects {ws[1] * groups} "
            f"(in/groups={ws[1]}, groups={groups})"
        )
    _check_columns(col_idx, ws[1] * ws[2] * ws[3])
    return _run(
        torch.ops.fastprune.sparse_conv2d.default,
        input,
        row_ptr,
        col_idx,
        values,
        ws,
        bias,
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
        groups,
        relu,
        residual,
    )


def _sparse_conv2d_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    input, row_ptr, col_idx, values, ws, bias, stride, padding, dilation, groups, relu, residual = inputs
    ctx.conf = (
        list(input.shape),
        list(ws),
        stride,
        padding,
        dilation,
        groups,
        relu,
        bias is not None,
        residual is not None,
    )
    ctx.save_for_backward(row_ptr, col_idx, values, output if relu else None)


def _sparse_conv2d_backward(ctx, grad):  # noqa: ANN001
    row_ptr, col_idx, values, output = ctx.saved_tensors
    in_shape, ws, stride, padding, dilation, groups, relu, has_bias, has_res = ctx.conf
    if ctx.needs_input_grad[3]:
        raise RuntimeError(
            "sparse_conv2d: gradients with respect to the packed weight (values) are not supported; "
            "train the dense layer (masked) and pack it again"
        )
    if relu:
        grad = grad * (output > 0).to(grad.dtype)
    grad_input = None
    if ctx.needs_input_grad[0]:
        w = unpack_sparse(row_ptr, col_idx, values, ws[1] * ws[2] * ws[3]).reshape(ws)
        grad_input = torch.nn.grad.conv2d_input(in_shape, w, grad, stride, padding, dilation, groups)
    grad_bias = grad.sum((0, 2, 3)) if has_bias and ctx.needs_input_grad[5] else None
    grad_res = grad if has_res and ctx.needs_input_grad[11] else None
    return grad_input, None, None, None, None, grad_bias, None, None, None, None, None, grad_res


torch.library.register_autograd("fastprune::sparse_conv2d", _sparse_conv2d_backward, setup_context=_sparse_conv2d_setup)


def _sparse_ffn_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    input, rp1, c1, v1, b1, rp2, c2, v2, b2, in_features, activation = inputs
    ctx.in_features, ctx.activation = in_features, activation
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.save_for_backward(input, rp1, c1, v1, b1, rp2, c2, v2)


def _sparse_ffn_backward(ctx, grad):  # noqa: ANN001
    input, rp1, c1, v1, b1, rp2, c2, v2 = ctx.saved_tensors
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[7]:
        raise RuntimeError(
            "sparse_ffn: gradients with respect to the packed weights (values) are not supported; "
            "train the dense layers (masked) and pack them again"
        )
    w1 = unpack_sparse(rp1, c1, v1, ctx.in_features)
    w2 = unpack_sparse(rp2, c2, v2, rp1.numel() - 1)
    with torch.enable_grad():  # the hidden pre-activation again, and the activation's derivative
        a = torch.nn.functional.linear(input.detach(), w1, b1.detach() if b1 is not None else None).requires_grad_()
        h = (
            torch.nn.functional.gelu(a)
            if ctx.activation == "gelu"
            else torch.relu(a)
            if ctx.activation == "relu"
            else a
        )
        (grad_a,) = torch.autograd.grad(h, a, grad @ w2)
    grad_input = grad_a @ w1 if ctx.needs_input_grad[0] else None
    grad_b1 = grad_a.reshape(-1, grad_a.shape[-1]).sum(0) if ctx.has_b1 and ctx.needs_input_grad[4] else None
    grad_b2 = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_b2 and ctx.needs_input_grad[8] else None
    return grad_input, None, None, None, grad_b1, None, None, None, grad_b2, None, None


torch.library.register_autograd("fastprune::sparse_ffn", _sparse_ffn_backward, setup_context=_sparse_ffn_setup)


def _packed(t: object, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not (isinstance(t, (tuple, list)) and len(t) == 3 and all(isinstance(v, torch.Tensor) for v in t)):
        raise TypeError(f"{name} must be pack_sparse's (row_ptr, col_idx, values), got {type(t).__name__}")
    return tuple(t)  # type: ignore[return-value]


def sparse_bottleneck(
    input: torch.Tensor,
    conv1: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias1: torch.Tensor | None,
    conv2: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias2: torch.Tensor | None,
    weight_shape2: tuple[int, int, int, int] | list[int],
    padding2: int | tuple[int, int],
    conv3: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias3: torch.Tensor | None,
) -> torch.Tensor:
    """A ResNet bottleneck without downsampling in one call:
    ``relu(conv3(relu(conv2(relu(conv1(input) + bias1)) + bias2)) + bias3 + input)``.

    conv1 and conv3 are 1x1 (pack_sparse of their (out, in) weights: conv1 (mid1, C), conv3
    (C, mid2)), conv2 is ``weight_shape2`` = (mid2, mid1, kh, kw) with stride 1 and ``padding2``
    keeping the size ((k - 1) / 2 each way). Shapes: input (N, C, H, W) -> (N, C, H, W). The same
    values as the three :func:`sparse_conv2d` calls (with ``relu=True``, the last with
    ``residual=input``), computed depth-first on the CPU where the generated conv code runs every
    layer (float32, AVX-512, H * W a multiple of 16): each sample (or range of rows, with fewer
    samples than threads) in bands of about 256 positions, conv1 -> conv2 -> conv3 while the band's
    activations are in L2; elsewhere, the three calls. Differentiable with respect to ``input`` and
    the biases.
    """
    _float_tensor(input, "input")
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    p1, p2, p3 = _packed(conv1, "conv1"), _packed(conv2, "conv2"), _packed(conv3, "conv3")
    ws = [int(v) for v in weight_shape2]
    if len(ws) != 4:
        raise ValueError(f"weight_shape2 must be (out, in, kh, kw), got {weight_shape2!r}")
    pad = _pair(padding2, "padding2")
    c, mid1 = input.shape[1], p1[0].numel() - 1
    if ws[1] != mid1:
        raise ValueError(f"conv2 takes {ws[1]} channels (weight_shape2), conv1 gives {mid1}")
    if p3[0].numel() - 1 != c:
        raise ValueError(f"conv3 gives {p3[0].numel() - 1} channels; the residual (the input) has {c}")
    if any(2 * p != k - 1 for p, k in zip(pad, ws[2:], strict=True)):
        raise ValueError(f"conv2 must keep the size: padding2 {pad} for a {ws[2]}x{ws[3]} kernel (want (k - 1) / 2)")
    _check_columns(p1[1], c)
    _check_columns(p2[1], ws[1] * ws[2] * ws[3])
    _check_columns(p3[1], ws[0])
    return _run(torch.ops.fastprune.sparse_bottleneck.default, input, *p1, bias1, *p2, bias2, ws, pad, *p3, bias3)


def _sparse_bottleneck_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, rp1, c1, v1, b1, rp2, c2, v2, b2, ws, pad, rp3, c3, v3, b3 = inputs
    ctx.conf = (list(ws), list(pad))
    ctx.save_for_backward(x, rp1, c1, v1, b1, rp2, c2, v2, b2, rp3, c3, v3, b3)


def _sparse_bottleneck_backward(ctx, grad):  # noqa: ANN001
    x, rp1, c1, v1, b1, rp2, c2, v2, b2, rp3, c3, v3, b3 = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[3] or need[7] or need[13]:
        raise RuntimeError(
            "sparse_bottleneck: gradients with respect to the packed weights (values) are not supported; "
            "train the dense layers (masked) and pack them again"
        )
    ws, pad = ctx.conf
    # the block again in plain PyTorch (the reference), differentiated
    wrt = {i: t.detach().requires_grad_() for i, t in ((0, x), (4, b1), (8, b2), (14, b3)) if t is not None and need[i]}
    with torch.enable_grad():
        y = _reference.sparse_bottleneck(
            wrt.get(0, x.detach()),
            (rp1, c1, v1),
            wrt.get(4, b1),
            (rp2, c2, v2),
            wrt.get(8, b2),
            ws,
            pad,
            (rp3, c3, v3),
            wrt.get(14, b3),
        )
        grads = torch.autograd.grad(y, list(wrt.values()), grad) if wrt else ()
    by_index = dict(zip(wrt, grads, strict=True))
    return tuple(by_index.get(i) for i in range(15))


torch.library.register_autograd(
    "fastprune::sparse_bottleneck", _sparse_bottleneck_backward, setup_context=_sparse_bottleneck_setup
)
