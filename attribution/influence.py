"""Influence scores: pairwise (queries × training examples), self-influence, top-k.

score(q, z) = ∇ℓ(q)ᵀ (G + λI)⁻¹ ∇ℓ(z), summed over tracked modules; ℓ(q) is the task's
measurement of the query (the summed NLL of its completion) and ℓ(z) the training loss of
z. Positive: training on z raises the probability of q's completion (lowers its loss).

The preconditioned query gradients P_q = (G + λI)⁻¹ ∇ℓ(q) are computed once; training
gradients are streamed batch by batch and never all held in memory. For one module,

    score(q, z) = ⟨P_q, G_z⟩ = Σₜ g_{z,t}ᵀ P_q a_{z,t},

so a score can be formed from the materialized per-example gradient G_z (cheap when the
module is small next to the sequence) or token by token without forming G_z (cheap when
P_q has low rank r: Σₜ (U_qᵀ g_t)·(V_qᵀ a_t)); the cheaper form is chosen per module.
The token form also gives per-token scores, which sum to the total; per-module scores
sum to the total too. With ``query_rank`` the P_q are replaced by their rank-r SVD
(Grosse et al. 2023 batch many queries this way).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from attribution.curvature import DTYPES, Damping, Factors, partition_bounds
from attribution.distributed import (
    broadcast,
    current_shard,
    gather,
    on_main,
    to_cpu,
    work_record,
)
from attribution.errors import InputError, check_choice, check_positive_ints
from attribution.gradients import Visitor, example_gradients, module_io, outer_sum, stream_io
from attribution.modules import select_modules
from attribution.precision import AUTOCAST
from attribution.solve import CURVATURES, conjugate_gradient
from attribution.store import ScoreStore
from attribution.task import Task, batches


@dataclass(frozen=True)
class ScoreArguments:
    """How scores are computed from factors."""

    damping: Damping = field(
        default_factory=Damping, metadata={"help": "λ of (G + λI)⁻¹ (see Damping)"}
    )
    query_rank: int | None = field(
        default=None, metadata={"help": "rank-r SVD of preconditioned queries; None: exact"}
    )
    batch_size: int = field(default=16, metadata={"help": "training sequences per pass"})
    partitions: int = field(
        default=1, metadata={"help": "parts of the training set, each saved when done"}
    )
    per_module: bool = field(default=False, metadata={"help": "keep each module's scores"})
    per_token: bool = field(default=False, metadata={"help": "keep each training token's score"})
    dtype: str = field(default="float32", metadata={"help": "float32 or float64"})
    autocast: str = field(
        default="none",
        metadata={"help": "forward passes in bfloat16/float16 (see FactorArguments)"},
    )
    cg_curvature: str = field(
        default="fisher",
        metadata={
            "help": "the exact matrix CG solves with: fisher (the factors' own, empirical or "
            "true) or hessian (of the mean training loss, by double backpropagation)"
        },
    )
    cg_preconditioned: bool = field(
        default=True,
        metadata={"help": "precondition CG with the factors (False: plain CG, the control)"},
    )
    cg_iterations: int = field(
        default=0,
        metadata={
            "help": "conjugate-gradient iterations on the exact damped curvature, preconditioned "
            "by the factors and started from their solution (0: the factors' solution alone)"
        },
    )

    def __post_init__(self) -> None:
        check_choice("ScoreArguments", "autocast", self.autocast, AUTOCAST)
        if self.dtype not in DTYPES:
            raise InputError(f"ScoreArguments.dtype must be float32 or float64, got {self.dtype!r}")
        check_positive_ints(
            "ScoreArguments", {"batch_size": self.batch_size, "partitions": self.partitions}
        )
        if self.cg_curvature not in CURVATURES:
            raise InputError(
                f"ScoreArguments.cg_curvature must be one of {CURVATURES}, "
                f"got {self.cg_curvature!r}"
            )
        cg = self.cg_iterations
        if not isinstance(cg, int) or isinstance(cg, bool) or cg < 0:
            raise InputError(f"ScoreArguments.cg_iterations must be an integer >= 0, got {cg!r}")
        if self.query_rank is not None and (
            not isinstance(self.query_rank, int) or self.query_rank < 1
        ):
            raise InputError(f"ScoreArguments.query_rank must be >= 1, got {self.query_rank!r}")
        object.__setattr__(self, "damping", Damping.of(self.damping))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class Scores:
    """Pairwise scores: ``total`` [n_query, n_train]; optional per-module and per-token.

    ``per_token[q, z, t]`` is the score of token t of training example z (the input
    position t of the tracked modules); padding positions hold 0.
    """

    total: torch.Tensor
    per_module: dict[str, torch.Tensor] | None = None
    per_token: torch.Tensor | None = None


@dataclass
class QueryGradients:
    """Preconditioned query gradients per module: dense [n_q, out, in] or rank-r factors."""

    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    left: dict[str, torch.Tensor] = field(default_factory=dict)  # U·S [n_q, out, r]
    right: dict[str, torch.Tensor] = field(default_factory=dict)  # V [n_q, in, r]
    _rebuilt: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def n_queries(self) -> int:
        first = next(iter(self.dense.values() or self.left.values()))
        return first.shape[0]

    def dense_of(self, name: str) -> torch.Tensor:
        """[n_q, out, in]: the stored matrix, or U·S·Vᵀ rebuilt once from the factors."""
        if name in self.dense:
            return self.dense[name]
        if name not in self._rebuilt:
            self._rebuilt[name] = torch.einsum("qor,qir->qoi", self.left[name], self.right[name])
        return self._rebuilt[name]


def precondition_queries(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    factors: Factors,
    arguments: ScoreArguments | None = None,
    progress: bool | None = None,
    train: Sequence[Any] | None = None,
) -> QueryGradients:
    """P_q = (G + λI)⁻¹ ∇ℓ(q) for every query and module (optionally rank-r).

    With ``arguments.cg_iterations`` > 0 the system is solved with the exact curvature of
    ``train`` (required then) by preconditioned conjugate gradient (:mod:`attribution.solve`);
    otherwise with the factors' approximation.
    """
    arguments = arguments or ScoreArguments()
    if arguments.cg_iterations and train is None:
        raise InputError("cg_iterations needs the training examples (the exact curvature)")
    raw = query_gradients(model, task, queries, factors, arguments, progress)
    if arguments.cg_iterations:
        solved = conjugate_gradient(
            model,
            task,
            train,
            factors,
            raw,
            arguments.damping,
            arguments.cg_iterations,
            progress=progress,
            preconditioned=arguments.cg_preconditioned,
            curvature=arguments.cg_curvature,
        ).solution
    else:
        solved = {n: factors.inverse_product(n, g, arguments.damping) for n, g in raw.items()}
    result = QueryGradients()
    for name, dense in solved.items():
        if arguments.query_rank is None:
            result.dense[name] = dense
        else:
            result.left[name], result.right[name] = _low_rank(dense, arguments.query_rank)
    return result


def query_gradients(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    factors: Factors,
    arguments: ScoreArguments | None = None,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """∇ℓ(q) of every query (the task's measurement) per tracked module, [n_q, out, in]."""
    arguments = arguments or ScoreArguments()
    modules = _factor_modules(model, factors)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for _, _, batch in batches(model, task, queries, arguments.batch_size, "queries", progress):
        grads = _gradients(model, task, batch, modules, arguments, measurement=True)
        for name, grad in grads.items():
            chunks[name].append(grad)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def pairwise_scores(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any] | QueryGradients,
    train: Sequence[Any],
    factors: Factors,
    arguments: ScoreArguments | None = None,
    progress: bool | None = None,
) -> Scores:
    """Influence of every training example on every query (see the module docstring).

    Under ``torchrun`` the training set is shared among the ranks and every rank gets all
    the columns (:mod:`attribution.distributed`).
    """
    arguments = arguments or ScoreArguments()
    if not isinstance(queries, QueryGradients):
        queries = precondition_queries(model, task, queries, factors, arguments, progress, train)
    return _shared_columns(
        model, task, queries, train, 0, len(train), factors, arguments, progress
    )[0]


def _shared_columns(model, task, queries, train, start, stop, factors, arguments, progress):
    """The scores of ``train[start:stop]``, each rank computing its share (then gathered),
    and the number of examples each rank scored."""
    shard = current_shard()
    low, high = shard.bounds(start, stop)
    scores, done = _columns(model, task, queries, train[low:high], factors, arguments, progress)
    if not shard.parallel:
        return scores, [done]
    shares = gather((as_cpu_scores(scores), done), shard)
    return _join([s for s, _ in shares]), [d for _, d in shares]


def _columns(
    model: nn.Module,
    task: Task,
    queries: QueryGradients,
    train: Sequence[Any],
    factors: Factors,
    arguments: ScoreArguments,
    progress: bool | None,
) -> tuple[Scores, int]:
    """Scores of every example of ``train`` (this process alone), and how many it scored."""
    modules = _factor_modules(model, factors)
    n_q, n_train = queries.n_queries, len(train)
    total = torch.zeros(n_q, n_train, dtype=arguments.torch_dtype)
    per_module = (
        {name: torch.zeros_like(total) for name in modules} if arguments.per_module else None
    )
    per_token = (
        torch.zeros(n_q, n_train, 0, dtype=arguments.torch_dtype) if arguments.per_token else None
    )
    start = 0
    for _, _, batch in batches(model, task, train, arguments.batch_size, "train", progress):
        visitor = _ScoreVisitor(queries, arguments.per_token)
        stream_io(
            model,
            task,
            batch,
            modules,
            visitor,
            dtype=arguments.torch_dtype,
            autocast_to=arguments.autocast,
        )
        stop = start + batch["input_ids"].shape[0]
        for name in modules:
            scores = visitor.module_scores(name, n_q, stop - start, total.dtype)
            total[:, start:stop] += scores.to(total.device)
            if per_module is not None:
                per_module[name][:, start:stop] = scores.to(total.device)
            tokens = visitor.token_scores(name) if arguments.per_token else None
            if tokens is not None:
                per_token = _widened(per_token, tokens.shape[-1])
                per_token[:, start:stop, : tokens.shape[-1]] += tokens.to(per_token.device)
        start = stop
    return Scores(total, per_module, per_token), start


def as_cpu_scores(scores: Scores) -> Scores:
    """``scores`` with every tensor on the CPU (what is gathered and saved)."""
    modules = None if scores.per_module is None else to_cpu(scores.per_module)
    per_token = None if scores.per_token is None else scores.per_token.cpu()
    return Scores(scores.total.cpu(), modules, per_token)


def _widened(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` [..., w] zero-padded on the right to at least ``width``."""
    extra = width - tensor.shape[-1]
    return torch.nn.functional.pad(tensor, (0, extra)) if extra > 0 else tensor


def stored_pairwise_scores(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    train: Sequence[Any],
    factors: Factors,
    folder: Any,
    arguments: ScoreArguments | None = None,
    ids: Mapping[str, Sequence[str]] | None = None,
    progress: bool | None = None,
    *,
    fingerprint: str | None = None,
) -> Scores:
    """:func:`pairwise_scores` saved in a score folder, resumable part by part.

    The training set is split into ``arguments.partitions`` parts; each part's columns are
    saved when done, and a rerun with the same description skips finished parts. The
    result is ``pairwise.safetensors`` (``scores`` [n_query, n_train], ``module/<name>``,
    ``per_token``), with ``ids`` (e.g. ``{"query_ids": [...], "train_ids": [...]}``) as
    JSON strings in its metadata. ``fingerprint``: the model's, when the caller has it.
    """
    arguments = arguments or ScoreArguments()
    shard = current_shard()
    store = on_main(
        lambda: ScoreStore.open_for(folder, model, queries, train, factors, arguments, fingerprint),
        shard,
    )
    done = broadcast(store.load("pairwise") if store else None, shard)
    if done is not None:
        return _from_tensors(done)
    prepared = None
    parts = []
    counts, resumed = [0] * shard.world_size, 0
    for part, (start, stop) in enumerate(partition_bounds(len(train), arguments.partitions)):
        tensors = broadcast(store.load(f"pairwise.part-{part}") if store else None, shard)
        if tensors is None:
            if prepared is None:
                prepared = precondition_queries(
                    model, task, queries, factors, arguments, progress, train
                )
            scores, done_here = _shared_columns(
                model, task, prepared, train, start, stop, factors, arguments, progress
            )
            counts = [a + b for a, b in zip(counts, done_here, strict=True)]
            tensors = dict(as_mapping(scores))
            if store:
                store.save(f"pairwise.part-{part}", tensors)
        else:
            resumed += stop - start
        parts.append(_from_tensors(tensors))
    scores = _join(parts)
    metadata = {key: json.dumps(list(value)) for key, value in (ids or {}).items()}
    metadata.update(work_record(counts, resumed))
    if store:
        store.save("pairwise", dict(as_mapping(scores)), metadata)
        store.drop_parts("pairwise")
    return scores


def _from_tensors(tensors: Mapping[str, torch.Tensor]) -> Scores:
    modules = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("module/")}
    return Scores(tensors["scores"], modules or None, tensors.get("per_token"))


def _join(parts: list[Scores]) -> Scores:
    """Scores of consecutive parts of the training set, joined along the train axis."""
    first = parts[0]
    per_module = None
    if first.per_module is not None:
        per_module = {
            n: torch.cat([p.per_module[n] for p in parts], dim=1) for n in first.per_module
        }
    per_token = _cat_padded([p.per_token for p in parts]) if first.per_token is not None else None
    return Scores(torch.cat([p.total for p in parts], dim=1), per_module, per_token)


def self_scores(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    factors: Factors,
    arguments: ScoreArguments | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Self-influence ∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) of every example, computed directly with
    the factors' approximation (an exact solve per example is not offered)."""
    arguments = arguments or ScoreArguments()
    if arguments.cg_iterations:
        raise InputError(
            "cg_iterations applies to pairwise scores; self-influence uses the factors' inverse"
        )
    shard = current_shard()
    low, high = shard.bounds(0, len(train))
    local = _self_scores(model, task, train[low:high], factors, arguments, progress)
    return torch.cat(gather(local.cpu(), shard)) if shard.parallel else local


def _self_scores(model, task, train, factors, arguments, progress) -> torch.Tensor:
    """Self-influence of every example of ``train``, in this process alone."""
    modules = _factor_modules(model, factors)
    result = [torch.zeros(0, dtype=arguments.torch_dtype)]
    for _, _, batch in batches(model, task, train, arguments.batch_size, "self", progress):
        grads = _gradients(model, task, batch, modules, arguments, measurement=False)
        total = None
        for name, grad in grads.items():
            term = factors.quadratic_form(name, grad, arguments.damping)
            total = term if total is None else total + term
        result.append(total.cpu())
    return torch.cat(result)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` strongest proponents (largest) and opponents (smallest) per row.

    >>> top_k(torch.tensor([[0.5, -2.0, 3.0, 0.0]]), 2)
    (tensor([[2, 0]]), tensor([[1, 3]]))
    """
    if not 1 <= k <= scores.shape[1]:
        raise InputError(
            f"top-k must be between 1 and the {scores.shape[1]} training examples, got {k}"
        )
    proponents = torch.topk(scores, k, dim=1).indices
    opponents = torch.topk(-scores, k, dim=1).indices
    return proponents, opponents


class _ScoreVisitor(Visitor):
    """Each module call's scores, formed from its a and g as the backward reaches it
    (:func:`~attribution.gradients.stream_io`), so no module's a or g outlives its use.

    Scores are linear in G_z = Σ_calls Σₜ gₜ aₜᵀ, so a module called several times adds
    its calls' scores; its per-token scores are its calls' joined along the sequence, in
    call order (a call whose output got no gradient contributes zeros).
    """

    def __init__(self, queries: QueryGradients, per_token: bool):
        self.queries, self.per_token = queries, per_token
        self.lengths: dict[str, list[int]] = {}  # each call's sequence length, call order
        self.scores: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, dict[int, torch.Tensor]] = {}

    def on_input(self, name, a, bias):
        calls = self.lengths.setdefault(name, [])
        calls.append(a.shape[1])
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a
        return len(calls) - 1, a

    def on_grad(self, name, kept, g, last):
        call, a = kept
        scores, tokens = _module_scores(a, g, self.queries, name, self.per_token)
        self.scores[name] = scores if name not in self.scores else self.scores[name] + scores
        if tokens is not None:
            self.tokens.setdefault(name, {})[call] = tokens

    def module_scores(self, name: str, n_q: int, n_batch: int, dtype) -> torch.Tensor:
        """[n_q, batch]: the module's scores (zeros if no call got a gradient)."""
        if name in self.scores:
            return self.scores[name]
        return torch.zeros(n_q, n_batch, dtype=dtype)

    def token_scores(self, name: str) -> torch.Tensor | None:
        """[n_q, batch, Σ call lengths]: the calls' per-token scores in call order."""
        calls = self.tokens.get(name)
        if not calls:
            return None
        first = next(iter(calls.values()))  # [n_q, batch, seq]: the shape of a missing call
        parts = [
            calls[c] if c in calls else first.new_zeros(*first.shape[:2], length)
            for c, length in enumerate(self.lengths[name])
        ]
        return torch.cat(parts, dim=-1)


def _module_scores(
    a: torch.Tensor, g: torch.Tensor, queries: QueryGradients, name: str, per_token: bool
):
    """Scores [n_q, batch] of one module call (a [batch, seq, in (+1)], g [batch, seq, out]),
    and per-token scores [n_q, batch, seq] if asked."""
    n_q, (n_batch, n_tokens, n_out), n_in = queries.n_queries, g.shape, a.shape[-1]
    materialize_cost = n_batch * n_tokens * n_out * n_in + n_q * n_batch * n_out * n_in
    if name in queries.dense:
        token_cost = n_q * n_batch * n_tokens * n_out * n_in
    else:
        token_cost = n_q * n_batch * n_tokens * queries.left[name].shape[-1] * (n_out + n_in)
    if per_token or token_cost < materialize_cost:
        tokens = _token_scores(a, g, queries, name)
        return tokens.sum(-1), tokens if per_token else None
    dense = queries.dense_of(name).to(a.dtype).reshape(n_q, -1)  # [q, out·in]
    grads = outer_sum(g, a).reshape(n_batch, -1)  # [batch, out·in]
    return dense @ grads.T, None


def _token_scores(a: torch.Tensor, g: torch.Tensor, queries: QueryGradients, name: str):
    """gₜᵀ P_q aₜ for every query q and token t, shape [n_q, batch, seq].

    Dense P: contract the larger of in/out first, so the kept intermediate [tokens, q,
    min(in, out)] is the smaller one; rank r: (Uᵀ gₜ)·(Vᵀ aₜ), intermediates [tokens, q, r].
    """
    n_batch, n_tokens, n_out = g.shape
    n_in, n_q = a.shape[-1], queries.n_queries
    a2, g2 = a.reshape(-1, n_in), g.reshape(-1, n_out)  # [tokens, in], [tokens, out]
    if name in queries.dense:
        p = queries.dense[name].to(a.dtype)  # [q, out, in]
        if n_out <= n_in:
            pa = (a2 @ p.reshape(n_q * n_out, n_in).T).view(-1, n_q, n_out)
            tokens = torch.bmm(pa, g2.unsqueeze(-1)).squeeze(-1)  # [tokens, q]
        else:
            gp = (g2 @ p.transpose(1, 2).reshape(n_q * n_in, n_out).T).view(-1, n_q, n_in)
            tokens = torch.bmm(gp, a2.unsqueeze(-1)).squeeze(-1)
    else:
        left, right = queries.left[name].to(a.dtype), queries.right[name].to(a.dtype)
        rank = left.shape[-1]
        ug = (g2 @ left.transpose(0, 1).reshape(n_out, n_q * rank)).view(-1, n_q, rank)
        va = (a2 @ right.transpose(0, 1).reshape(n_in, n_q * rank)).view(-1, n_q, rank)
        tokens = (ug * va).sum(-1)
    return tokens.view(n_batch, n_tokens, n_q).permute(2, 0, 1)


def _low_rank(dense: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (U·S, V) of each matrix of a batch [n, out, in], via SVD in float64."""
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    r = min(rank, s.shape[-1])
    left = (u[..., :r] * s[..., None, :r]).to(dense.dtype)
    right = vh[..., :r, :].transpose(-1, -2).to(dense.dtype)
    return left, right


def _gradients(model, task, batch, modules, arguments, measurement):
    records = module_io(
        model,
        task,
        batch,
        modules,
        measurement=measurement,
        dtype=arguments.torch_dtype,
        autocast_to=arguments.autocast,
    )
    return {name: example_gradients(record) for name, record in records.items()}


def _factor_modules(model: nn.Module, factors: Factors) -> dict[str, nn.Module]:
    return select_modules(model, factors.modules)


def _cat_padded(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Join [q, b, t] chunks along b, right-padding t with zeros."""
    width = max(c.shape[-1] for c in chunks)
    padded = [torch.nn.functional.pad(c, (0, width - c.shape[-1])) for c in chunks]
    return torch.cat(padded, dim=1)


def check_queries_have_targets(
    task: Task, queries: Sequence[Any], ids: Sequence[str] | None = None
) -> None:
    """Refuse a query with no labelled token left (after truncation): its score would be 0."""
    for i, query in enumerate(queries):
        labels = task.collate([query])["labels"]
        if not (labels[:, 1:] != -100).any():
            name = ids[i] if ids is not None else i
            raise InputError(
                f"query {name!r} has no completion tokens left after tokenization/truncation; "
                "give it a non-empty completion or raise --max-length"
            )


def as_mapping(scores: Scores) -> Mapping[str, torch.Tensor]:
    """The tensors of ``scores`` by name, for saving."""
    tensors = {"scores": scores.total}
    for name, value in (scores.per_module or {}).items():
        tensors[f"module/{name}"] = value
    if scores.per_token is not None:
        tensors["per_token"] = scores.per_token
    return tensors
