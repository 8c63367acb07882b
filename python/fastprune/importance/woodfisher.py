"""WoodFisher: second-order (Optimal Brain Surgeon) pruning with the empirical (or sampled) Fisher.

Reference: Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression", NeurIPS 2020 (arXiv:2004.14340).

Pipeline: per-sample (or per-mini-batch) gradients of the selected weights, streamed in chunks into
:class:`fastprune.FisherInverse` (never an ``N x d`` matrix); OBS saliency
``rho_q = w_q^2 / (2 [F^-1]_qq)``; selection (global or per layer); the OBS weight update
``dw = -F^-1 sum_{q in Q} (w_q / [F^-1]_qq) e_q`` (the reference code's summed single-weight
updates, default) or the exact joint update within a block ``dw = -F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q``
(``joint=True``).

Per-sample gradients: ``torch.func.vmap(grad(...))`` where the model allows it, else (``per_sample=
"auto"``: after vmap refused the first chunk, with one logged line) one ordinary backward per
gradient, which works for any model (HuggingFace BERT's attention mask has data-dependent control
flow that vmap refuses). The Fisher: ``"empirical"`` (the paper's: gradients of the loss at the
data's targets) or ``"sampled"`` (targets drawn from the model's own predictive distribution,
categorical over logits or a unit Gaussian around the outputs: the "true" Fisher, which does not
vanish at a model that fits its targets exactly, e.g. a distillation loss to itself).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.func import grad, vmap
from torch.nn.utils.stateless import _reparametrize_module
from tqdm.auto import tqdm

from fastprune import distributed as fd
from fastprune._modes import restore_modes, training_flags
from fastprune.batches import Batch, as_batch, output_tensor
from fastprune.distributed import all_reduce_sum_
from fastprune.fisher import FisherInverse, ShardedFisherInverse
from fastprune.masks import ParamRef, effective_weight, is_pruned

__all__ = [
    "FisherStats",
    "collect_fisher",
    "default_loss",
    "obs_updates",
    "per_sample_gradients",
]

log = logging.getLogger("fastprune")

LossOfBatch = Callable[[nn.Module, Batch], torch.Tensor]


def _param_key(ref: ParamRef) -> str:
    """The name to substitute: ``*_orig`` for a pruned parameter (the hook then multiplies by the
    mask, so gradients of pruned entries are exactly zero)."""
    name = ref.param_name + "_orig" if is_pruned(ref.module, ref.param_name) else ref.param_name
    return f"{ref.module_name}.{name}" if ref.module_name else name


def _raw_param(ref: ParamRef) -> torch.Tensor:
    return getattr(ref.module, ref.param_name + "_orig" if is_pruned(ref.module, ref.param_name) else ref.param_name)


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy, mean over the samples; token logits ``(..., T, V)`` with targets ``(..., T)``
    are flattened, and targets ``-100`` ignored (HuggingFace's convention)."""
    if outputs.dim() >= 3 or (outputs.dim() == 2 and targets.dim() == 2):
        return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten(), ignore_index=-100)
    return nn.functional.cross_entropy(outputs, targets)


def _gaussian_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of a unit Gaussian around the outputs (up to a constant), summed
    over each sample's outputs and averaged over the samples."""
    return 0.5 * (outputs - targets).pow(2).flatten(1).sum(1).mean()


def batch_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    fisher: Literal["empirical", "sampled"] = "empirical",
    likelihood: Literal["categorical", "gaussian"] = "categorical",
    upcast: bool = False,
) -> LossOfBatch:
    """The mean loss of a :class:`~fastprune.batches.Batch` that the gradients are taken of.

    ``forward(model, batch)`` (the batch as the loader yielded it) replaces everything: it returns
    the batch's mean loss. Otherwise the model runs on the batch's inputs and ``loss_fn(outputs,
    targets)`` (default :func:`default_loss`) reads its output tensor (a HuggingFace output's
    ``logits``). With ``fisher="sampled"`` the targets were drawn from the model (see
    :func:`sample_targets`) and the loss is the likelihood's (cross entropy, or a unit Gaussian's)."""
    if forward is not None:
        return lambda model, b: forward(model, b.rebuild())
    if fisher == "sampled":
        fn = default_loss if likelihood == "categorical" else _gaussian_loss
    else:
        fn = loss_fn or default_loss

    def run(model: nn.Module, b: Batch) -> torch.Tensor:
        if b.targets is None:
            raise ValueError(
                "the batches carry no targets: give (inputs, targets) batches or a dict with 'labels', "
                "fisher='sampled' (targets drawn from the model: no labels needed), or forward=(model, batch) -> loss"
            )
        out = output_tensor(model(*b.args, **b.kwargs))
        return fn(out.float() if upcast else out, b.targets)

    return run


def sample_targets(
    model: nn.Module, b: Batch, likelihood: Literal["categorical", "gaussian"], generator: torch.Generator
) -> Batch:
    """``b`` with targets drawn from the model's predictive distribution at its inputs: a class from
    ``softmax(logits)`` per sample (and token), or ``outputs + N(0, 1)``."""
    with torch.no_grad():
        out = output_tensor(model(*b.args, **b.kwargs)).float()
    if likelihood == "categorical":
        probs = torch.softmax(out, dim=-1).reshape(-1, out.shape[-1])
        y = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(out.shape[:-1]).to(out.device)
    else:
        y = out + torch.randn(out.shape, generator=generator).to(device=out.device)
    return b.with_targets(y)


def batch_gradients(
    model: nn.Module,
    refs: Sequence[ParamRef],
    b: Batch,
    loss: LossOfBatch,
    fisher_batch_size: int = 1,
    engine: Literal["vmap", "loop"] = "vmap",
) -> list[torch.Tensor]:
    """Gradients of ``loss`` w.r.t. each selected weight, one row per sample (or per group of
    ``fisher_batch_size`` samples, averaged): a list of ``(k, numel)`` tensors, no autograd graph.

    ``engine="vmap"``: ``torch.func.vmap(grad(...))`` with the weights substituted
    (``_reparametrize_module``); ``"loop"``: one ``torch.autograd.grad`` per row. The model runs as
    it is (call ``model.eval()`` first for BN statistics to stay fixed)."""
    m = fisher_batch_size
    n = (b.size // m) * m
    if n == 0:
        return [torch.zeros(0, effective_weight(r.module, r.param_name).numel()) for r in refs]
    keys = [_param_key(r) for r in refs]
    half = all(effective_weight(r.module, r.param_name).dtype in (torch.float16, torch.bfloat16) for r in refs)
    if engine == "loop":
        raws = [_raw_param(r) for r in refs]
        rows: list[list[torch.Tensor]] = [[] for _ in refs]
        for start in range(0, n, m):
            with torch.enable_grad():
                gs = torch.autograd.grad(loss(model, b.slice(start, start + m)), raws, allow_unused=True)
            for i, (g, raw) in enumerate(zip(gs, raws, strict=True)):
                rows[i].append((torch.zeros_like(raw) if g is None else g).reshape(-1))
        return [torch.stack(r).to(torch.float32 if half else r[0].dtype) for r in rows]
    tensors, rebuild = b.sample_tensors()
    xs = [t[:n].reshape(n // m, m, *t.shape[1:]) for t in tensors]
    params = {k: effective_weight(r.module, r.param_name) for k, r in zip(keys, refs, strict=True)}

    def loss_of(p: dict[str, torch.Tensor], *ts: torch.Tensor) -> torch.Tensor:
        with _reparametrize_module(model, p, tie_weights=True):
            return loss(model, rebuild(list(ts), m))

    # The outer no_grad stops autograd from recording a graph back to the parameters that are not
    # substituted (biases, norm layers): torch.func.grad computes its own gradients regardless.
    with torch.no_grad():
        grads = vmap(grad(loss_of), in_dims=(None, *([0] * len(xs))))(params, *xs)
    return [grads[k].reshape(n // m, -1).to(torch.float32 if half else grads[k].dtype) for k in keys]


def per_sample_gradients(
    model: nn.Module,
    refs: Sequence[ParamRef],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fisher_batch_size: int = 1,
) -> list[torch.Tensor]:
    """:func:`batch_gradients` for one input tensor and its targets with ``loss_fn(outputs,
    targets)`` (vmap): a list of ``(k, numel)`` tensors."""
    half = all(effective_weight(r.module, r.param_name).dtype in (torch.float16, torch.bfloat16) for r in refs)
    b = Batch((inputs,), {}, targets, int(inputs.shape[0]), "tuple")
    return batch_gradients(model, refs, b, batch_loss(loss_fn, upcast=half), fisher_batch_size, "vmap")


@dataclass
class FisherStats:
    """What :func:`collect_fisher` gathered: one FisherInverse per layer (``blocks="layer"``) or
    one for all (``blocks="global"``), and the diagonal Fisher for the baseline. ``names`` and
    ``sizes`` identify the weights (``"<module>.<param>"``, numel), so that the statistics of one
    model can prune copies of it (``prune(copy, "woodfisher", fisher_inverse=stats)``)."""

    refs: list[ParamRef]
    inverses: list[Any]  # FisherInverse (or ShardedFisherInverse) per layer, or a single one
    blocks: str
    fisher_diag: list[torch.Tensor]  # (numel,) per layer: (1/N) sum g^2
    num_grads: int
    kind: str = "empirical"
    names: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.names:
            self.names = [r.name for r in self.refs]
        if not self.sizes:
            self.sizes = [_numel(r) for r in self.refs]

    @property
    def block_size(self) -> int:
        return self.inverses[0].block_size

    @property
    def damp(self) -> float:
        return self.inverses[0].damp

    def inverse_diag(self) -> list[torch.Tensor]:
        """Diagonal of F^-1, per layer, flattened."""
        if self.blocks == "layer":
            return [fi.diag() for fi in self.inverses]
        return list(torch.split(self.inverses[0].diag(), self.sizes))

    def matvec(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """F^-1 v for per-layer vectors v (flattened)."""
        if self.blocks == "layer":
            return [fi.matvec(v.reshape(-1).to(fi.dtype)) for fi, v in zip(self.inverses, vs, strict=True)]
        out = self.inverses[0].matvec(torch.cat([v.reshape(-1) for v in vs]).to(self.inverses[0].dtype))
        return list(torch.split(out, self.sizes))


def _numel(ref: ParamRef) -> int:
    return effective_weight(ref.module, ref.param_name).numel()


class _GradientStream:
    """The gradients of one rank's data, ``n`` rows at a time (:meth:`take`): loader batches are
    cut into pieces (the samples a take does not need wait for the next one), each piece's
    per-sample gradients checked finite and added to the diagonal Fisher's sums."""

    def __init__(
        self,
        model: nn.Module,
        refs: Sequence[ParamRef],
        data: Iterable[Any],
        loss: LossOfBatch,
        *,
        fisher_batch_size: int,
        forward: Callable[[nn.Module, Any], torch.Tensor] | None,
        fisher: str,
        likelihood: Literal["categorical", "gaussian"],
        per_sample: str,
        rows_per_piece: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.model, self.refs, self.loss, self.forward = model, list(refs), loss, forward
        self.fbs, self.fisher, self.likelihood, self.per_sample = fisher_batch_size, fisher, likelihood, per_sample
        self.rows_per_piece, self.bar = rows_per_piece, bar
        self.engine: Literal["vmap", "loop"] = "loop" if per_sample == "loop" else "vmap"
        self.gen = torch.Generator().manual_seed(seed)
        self.sizes = [_numel(r) for r in refs]
        device = effective_weight(refs[0].module, refs[0].param_name).device
        self.diag = [torch.zeros(n, dtype=torch.float64, device=device) for n in self.sizes]
        self._it = iter(data)
        self._pending: Batch | None = None
        self.seen = 0

    def _gradients(self, piece: Batch) -> list[torch.Tensor]:
        try:
            return batch_gradients(self.model, self.refs, piece, self.loss, self.fbs, self.engine)
        except Exception as e:  # noqa: BLE001 - vmap refuses many models: fall back below
            if self.engine != "vmap" or self.per_sample != "auto" or self.seen > 0:
                raise
            log.warning(
                "fastprune: torch.func.vmap cannot take per-sample gradients of this model (%s: %s); "
                "using one backward per gradient instead",
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
            )
            self.engine = "loop"
            return batch_gradients(self.model, self.refs, piece, self.loss, self.fbs, self.engine)

    def take(self, n: int) -> list[torch.Tensor]:
        """Up to ``n`` gradient rows per weight (fewer only when the data ran out): ``(k, numel)`` each."""
        rows: list[list[torch.Tensor]] = [[] for _ in self.refs]
        got = 0
        while got < n:
            if self._pending is None or self._pending.size < self.fbs:
                raw = next(self._it, _END)
                if raw is _END:
                    break
                self._pending = as_batch(raw) if self.forward is None else _opaque(raw)
                continue
            step = min(n - got, self.rows_per_piece) * self.fbs
            piece, self._pending = self._pending.slice(0, step), self._pending.slice(step, self._pending.size)
            if self.fisher == "sampled":
                piece = sample_targets(self.model, piece, self.likelihood, self.gen)
            gs = self._gradients(piece)
            k = gs[0].shape[0]
            if k == 0:
                continue
            for g in gs:
                if not bool(torch.isfinite(g).all()):
                    raise ValueError("a gradient is NaN or Inf (non-finite loss?): the Fisher cannot be built")
            for i, g in enumerate(gs):
                self.diag[i] += (g.double() ** 2).sum(0)
                rows[i].append(g)
            got += k
            self.seen += k
            self.bar.update(k)
        return [torch.cat(r) if r else torch.zeros(0, n_i) for r, n_i in zip(rows, self.sizes, strict=True)]


_END = object()


def _requests(remaining: int, active: list[bool], most: int) -> list[int]:
    """How many gradients each rank takes this round: ``remaining`` split over the ranks whose data
    has not run out (the first ones one more), at most ``most`` each."""
    ranks = [r for r, a in enumerate(active) if a]
    out = [0] * len(active)
    for i, r in enumerate(ranks):
        out[r] = min(most, remaining // len(ranks) + (1 if i < remaining % len(ranks) else 0))
    return out


def collect_fisher(
    model: nn.Module,
    refs: Sequence[ParamRef],
    data: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    num_grads: int,
    block_size: int,
    damp: float,
    blocks: Literal["layer", "global"] = "layer",
    fisher_batch_size: int = 1,
    need_inverse: bool = True,
    progress: bool = True,
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    fisher: Literal["empirical", "sampled"] = "empirical",
    likelihood: Literal["categorical", "gaussian"] = "categorical",
    per_sample: Literal["auto", "vmap", "loop"] = "auto",
    max_memory: int = 1 << 30,
    seed: int = 0,
) -> FisherStats:
    """Stream ``num_grads`` gradients (each the mean over ``fisher_batch_size`` samples) from
    ``data`` (batches in any format of :mod:`fastprune.batches`) into block inverse Fishers.

    The model is put in eval mode while gradients are taken (BN uses its running statistics) and
    restored after. Gradients are gathered across loader batches into chunks of up to
    ``max_memory`` bytes before each Woodbury update (a rank-k update costs little more than a
    rank-1 one: larger chunks are faster); working memory is the Fisher blocks plus about twice
    that. See the module docstring for ``fisher``, ``likelihood`` and ``per_sample``; ``seed``
    fixes the sampled targets. Raises ValueError on an empty loader or a non-finite gradient;
    warns when the Fisher's mean diagonal is far below ``damp`` (it then carries no information
    and the saliencies are magnitude's).

    With a ``torch.distributed`` process group of several ranks, ``data`` is this rank's shard:
    the ranks take the gradients in rounds (every round each rank its share of what is still
    missing, at most one chunk; a rank whose shard ran out leaves the others to make up the rest,
    so N gradients are taken whenever the shards hold N between them) and each round's chunks go to
    the owners of the Fisher blocks (:class:`fastprune.fisher.ShardedFisherInverse`); a rank that
    fails makes every rank fail in the same round."""
    sizes = [_numel(r) for r in refs]
    d_total = sum(sizes)
    fdtype = (
        torch.float64
        if any(effective_weight(r.module, r.param_name).dtype == torch.float64 for r in refs)
        else torch.float32
    )
    device = effective_weight(refs[0].module, refs[0].param_name).device
    sharded = fd.is_distributed()
    if sharded:  # every rank's gradients must be of the same model
        fd.check_same_everywhere(
            [effective_weight(r.module, r.param_name) for r in refs],
            "the weights",
            " (every rank must start from the same model: seed its initialisation or load one checkpoint)",
        )
    kind = ShardedFisherInverse if sharded else FisherInverse
    world, me = fd.world_size(), fd.rank()
    if blocks == "layer":
        inverses = [kind(n, block_size, damp, num_grads, dtype=fdtype, device=device) for n in sizes]
    else:
        inverses = [kind(d_total, block_size, damp, num_grads, dtype=fdtype, device=device)]
    half = all(effective_weight(r.module, r.param_name).dtype in (torch.float16, torch.bfloat16) for r in refs)
    loss = batch_loss(loss_fn, forward, fisher, likelihood, upcast=half)
    elem = 8 if fdtype == torch.float64 else 4
    # the buffered chunk and the vmap output of one loader slice: about 2 rows per row kept
    rows_per_chunk = max(1, max_memory // max(1, 2 * d_total * elem))
    flags = training_flags(model)
    model.eval()
    bar = tqdm(total=-(-num_grads // world), desc="gradients", unit="grad", disable=not progress, leave=False)
    stream = _GradientStream(
        model, refs, data, loss, fisher_batch_size=fisher_batch_size, forward=forward, fisher=fisher,
        likelihood=likelihood, per_sample=per_sample, rows_per_piece=rows_per_chunk, seed=seed, bar=bar,
    )  # fmt: skip
    remaining, active = num_grads, [True] * world
    try:
        while remaining > 0 and any(active):
            want = _requests(remaining, active, rows_per_chunk)
            error: BaseException | None = None
            gs: list[torch.Tensor] = []
            try:
                gs = stream.take(want[me]) if want[me] else [torch.zeros(0, n) for n in sizes]
            except BaseException as e:  # noqa: BLE001 - raised on every rank by exchange_counts
                error = e
            counts = fd.exchange_counts(gs[0].shape[0] if gs else 0, error, "the Fisher's gradients")
            active = [a and c >= w for a, c, w in zip(active, counts, want, strict=True)]
            remaining -= sum(counts)
            if not need_inverse or sum(counts) == 0:
                continue
            chunks = gs if blocks == "layer" else [torch.cat(gs, dim=1)]
            for fi, g in zip(inverses, chunks, strict=True):
                if sharded:
                    fi.update(g, counts)
                elif g.shape[0]:
                    fi.update(g)
    finally:
        bar.close()
        restore_modes(flags)
    seen = num_grads - remaining
    if seen == 0:
        raise ValueError("data yielded no gradients (empty loader, or batches smaller than fisher_batch_size)")
    diag = stream.diag
    if sharded:
        all_reduce_sum_(diag)
    fdiag = [x / num_grads for x in diag]
    mean_diag = float(sum(x.sum() for x in fdiag)) / max(1, d_total)
    if mean_diag < 1e-3 * damp:
        warnings.warn(
            f"the Fisher's mean diagonal ({mean_diag:.3g}) is below damp={damp:g} / 1000: "
            "it carries no information, so WoodFisher degenerates to magnitude pruning (gradients ~0: a loss that "
            "is minimal at these weights, such as distillation to the model itself?). Use fisher='sampled', "
            "or a smaller damp",
            stacklevel=2,
        )
    return FisherStats(list(refs), inverses, blocks, fdiag, seen, kind=fisher)


def _opaque(raw: Any) -> Batch:
    """A batch only a user's ``forward`` reads. One the defaults can take apart is split into samples;
    any other is one gradient (of its mean loss)."""
    try:
        return as_batch(raw)
    except TypeError:
        return Batch((raw,), {}, None, 1, "tensor")


def obs_updates(
    stats: FisherStats,
    weights: list[torch.Tensor],
    keep: list[torch.Tensor],
    joint: bool = False,
    inv_diag: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """OBS weight changes for pruning the entries where ``keep`` is False (flattened per layer).

    ``joint=False``: ``dw = -F^-1 sum_q (w_q / [F^-1]_qq) e_q`` (the summed single-weight updates of
    the reference code). ``joint=True``: per Fisher block, the exact joint solve
    ``dw = -F^-1_{:,Q} ([F^-1]_QQ)^-1 w_Q`` (Q = pruned entries of the block). ``inv_diag``: the
    caller's :meth:`FisherStats.inverse_diag`, when it has it (a sharded Fisher gathers it)."""
    if not joint:
        inv_diag = stats.inverse_diag() if inv_diag is None else inv_diag
        vs = [
            torch.where(~k.reshape(-1), w.reshape(-1).double() / dg.double(), torch.zeros((), dtype=torch.float64))
            for w, k, dg in zip(weights, keep, inv_diag, strict=True)
        ]
        return [-x.double() for x in stats.matvec([v.to(stats.inverses[0].dtype) for v in vs])]
    # joint: per block of each FisherInverse (a sharded one solves its own blocks and gathers)
    flat_w = [w.reshape(-1).double() for w in weights]
    flat_k = [k.reshape(-1) for k in keep]
    if stats.blocks == "global":
        flat_w, flat_k = [torch.cat(flat_w)], [torch.cat(flat_k)]
    outs = [fi.joint_update(w, k) for fi, w, k in zip(stats.inverses, flat_w, flat_k, strict=True)]
    if stats.blocks == "global":
        return list(torch.split(outs[0], stats.sizes))
    return outs
