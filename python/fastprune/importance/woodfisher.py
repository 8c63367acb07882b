"""WoodFisher: second-order (Optimal Brain Surgeon) pruning with the empirical Fisher.

Reference: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression", NeurIPS 2020 (arXiv:2004.14340).

Pipeline: per-sample (or per-mini-batch) gradients of the selected weights, computed with
``torch.func`` in chunks and streamed into :class:`fastprune.FisherInverse` (never an ``N x d``
matrix); OBS saliency ``rho_q = w_q^2 / (2 [F^-1]_qq)``; selection (global or per layer); the OBS
weight update ``dw = -F^-1 sum_{q in Q} (w_q / [F^-1]_qq) e_q`` (the reference code's summed
single-weight updates, default) or the exact joint update within a block
``dw = -F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (``joint=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from fastprune._modes import restore_modes, training_flags
from fastprune.fisher import FisherInverse
from fastprune.masks import ParamRef, effective_weight, is_pruned

__all__ = ["FisherStats", "collect_fisher", "obs_updates", "per_sample_gradients"]


def _param_key(ref: ParamRef) -> str:
    """The name functional_call must substitute: ``*_orig`` for a pruned parameter (the hook then
    multiplies by the mask, so gradients of pruned entries are exactly zero)."""
    name = ref.param_name + "_orig" if is_pruned(ref.module, ref.param_name) else ref.param_name
    return f"{ref.module_name}.{name}" if ref.module_name else name


def per_sample_gradients(
    model: nn.Module,
    refs: Sequence[ParamRef],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fisher_batch_size: int = 1,
) -> list[torch.Tensor]:
    """Gradients of the loss w.r.t. each selected weight, one row per sample (or per group of
    ``fisher_batch_size`` samples, averaged): a list of ``(k, numel)`` float32/64 tensors.

    Uses ``torch.func.vmap(grad(...))`` over ``functional_call``; the model runs as it is (call
    ``model.eval()`` first for BN statistics to stay fixed)."""
    m = fisher_batch_size
    n = (inputs.shape[0] // m) * m
    if n == 0:
        return [torch.zeros(0, effective_weight(r.module, r.param_name).numel()) for r in refs]
    x = inputs[:n].reshape(n // m, m, *inputs.shape[1:])
    y = targets[:n].reshape(n // m, m, *targets.shape[1:])
    keys = [_param_key(r) for r in refs]
    params = {k: effective_weight(r.module, r.param_name) for k, r in zip(keys, refs, strict=True)}
    acc = torch.float32 if all(p.dtype in (torch.float16, torch.bfloat16) for p in params.values()) else None

    def loss_of(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xb,))
        return loss_fn(out.float() if acc else out, yb)

    # The outer no_grad stops autograd from recording a graph back to the parameters that are not
    # substituted (biases, norm layers): torch.func.grad computes its own gradients regardless.
    with torch.no_grad():
        grads = vmap(grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
    return [grads[k].reshape(n // m, -1).to(acc or grads[k].dtype) for k in keys]


@dataclass
class FisherStats:
    """What :func:`collect_fisher` gathered: one FisherInverse per layer (``blocks="layer"``) or
    one for all (``blocks="global"``), and the diagonal empirical Fisher for the baseline."""

    refs: list[ParamRef]
    inverses: list[FisherInverse]  # per layer, or a single one
    blocks: str
    fisher_diag: list[torch.Tensor]  # (numel,) per layer: (1/N) sum g^2
    num_grads: int

    def inverse_diag(self) -> list[torch.Tensor]:
        """Diagonal of F^-1, per layer, flattened."""
        if self.blocks == "layer":
            return [fi.diag() for fi in self.inverses]
        d = self.inverses[0].diag()
        return list(torch.split(d, [_numel(r) for r in self.refs]))

    def matvec(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """F^-1 v for per-layer vectors v (flattened)."""
        if self.blocks == "layer":
            return [fi.matvec(v.reshape(-1).to(fi.dtype)) for fi, v in zip(self.inverses, vs, strict=True)]
        out = self.inverses[0].matvec(torch.cat([v.reshape(-1) for v in vs]).to(self.inverses[0].dtype))
        return list(torch.split(out, [_numel(r) for r in self.refs]))


def _numel(ref: ParamRef) -> int:
    return effective_weight(ref.module, ref.param_name).numel()


def collect_fisher(
    model: nn.Module,
    refs: Sequence[ParamRef],
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    num_grads: int,
    block_size: int,
    damp: float,
    blocks: Literal["layer", "global"] = "layer",
    fisher_batch_size: int = 1,
    need_inverse: bool = True,
    progress: bool = True,
    max_chunk_floats: int = 1 << 25,
) -> FisherStats:
    """Stream ``num_grads`` gradients (each the mean over ``fisher_batch_size`` samples) from
    ``data`` (an iterable of ``(inputs, targets)``) into block inverse Fishers. The model is put in
    eval mode while gradients are taken (BN uses its running statistics) and restored after.
    Working memory: the Fisher blocks plus one chunk of at most ``max_chunk_floats`` gradient
    entries. Raises ValueError on an empty loader or a non-finite loss/gradient."""
    sizes = [_numel(r) for r in refs]
    d_total = sum(sizes)
    fdtype = (
        torch.float64
        if any(effective_weight(r.module, r.param_name).dtype == torch.float64 for r in refs)
        else torch.float32
    )
    device = effective_weight(refs[0].module, refs[0].param_name).device
    if blocks == "layer":
        inverses = [FisherInverse(n, block_size, damp, num_grads, dtype=fdtype, device=device) for n in sizes]
    else:
        inverses = [FisherInverse(d_total, block_size, damp, num_grads, dtype=fdtype, device=device)]
    diag = [torch.zeros(n, dtype=torch.float64, device=device) for n in sizes]
    rows_per_chunk = max(1, max_chunk_floats // max(d_total, 1))
    seen = 0
    flags = training_flags(model)
    model.eval()
    bar = tqdm(total=num_grads, desc="gradients", unit="grad", disable=not progress, leave=False)
    try:
        for batch in data:
            if seen >= num_grads:
                break
            x, y = batch[0], batch[1]
            need = (num_grads - seen) * fisher_batch_size
            x, y = x[:need], y[:need]
            for start in range(0, x.shape[0], rows_per_chunk * fisher_batch_size):
                sl = slice(start, start + rows_per_chunk * fisher_batch_size)
                gs = per_sample_gradients(model, refs, x[sl], y[sl], loss_fn, fisher_batch_size)
                k = gs[0].shape[0]
                if k == 0:
                    continue
                for g in gs:
                    if not bool(torch.isfinite(g).all()):
                        raise ValueError("a gradient is NaN or Inf (non-finite loss?): the Fisher cannot be built")
                for i, g in enumerate(gs):
                    diag[i] += (g.double() ** 2).sum(0)
                if need_inverse:
                    if blocks == "layer":
                        for fi, g in zip(inverses, gs, strict=True):
                            fi.update(g)
                    else:
                        inverses[0].update(torch.cat(gs, dim=1))
                seen += k
                bar.update(k)
    finally:
        bar.close()
        restore_modes(flags)
    if seen == 0:
        raise ValueError("data yielded no gradients (empty loader, or batches smaller than fisher_batch_size)")
    fdiag = [x / num_grads for x in diag]
    return FisherStats(list(refs), inverses, blocks, fdiag, seen)


def obs_updates(
    stats: FisherStats, weights: list[torch.Tensor], keep: list[torch.Tensor], joint: bool = False
) -> list[torch.Tensor]:
    """OBS weight changes for pruning the entries where ``keep`` is False (flattened per layer).

    ``joint=False``: ``dw = -F^-1 sum_q (w_q / [F^-1]_qq) e_q`` (the summed single-weight updates of
    the reference code). ``joint=True``: per Fisher block, the exact joint solve
    ``dw = -F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (Q = pruned entries of the block)."""
    inv_diag = stats.inverse_diag()
    if not joint:
        vs = [
            torch.where(~k.reshape(-1), w.reshape(-1).double() / dg.double(), torch.zeros((), dtype=torch.float64))
            for w, k, dg in zip(weights, keep, inv_diag, strict=True)
        ]
        return [-x.double() for x in stats.matvec([v.to(stats.inverses[0].dtype) for v in vs])]
    # joint: per block of each FisherInverse
    flat_w = [w.reshape(-1).double() for w in weights]
    flat_k = [k.reshape(-1) for k in keep]
    if stats.blocks == "global":
        flat_w, flat_k = [torch.cat(flat_w)], [torch.cat(flat_k)]
    outs = []
    for fi, w, k in zip(stats.inverses, flat_w, flat_k, strict=True):
        finv = fi.inverse().double()
        bsz = fi.block_size
        dw = torch.zeros_like(w)
        for b in range(fi.num_blocks):
            lo, hi = b * bsz, min((b + 1) * bsz, w.numel())
            q = (~k[lo:hi]).nonzero().flatten()
            if q.numel() == 0:
                continue
            blk = finv[b, : hi - lo, : hi - lo]
            sol = torch.linalg.solve(blk[q][:, q], w[lo:hi][q])
            dw[lo:hi] = -(blk[:, q] @ sol)
        outs.append(dw)
    if stats.blocks == "global":
        return list(torch.split(outs[0], [_numel(r) for r in stats.refs]))
    return outs
