"""A gradient index: every training gradient stored once, so a query costs one product.

With the curvature's eigenbasis Q_S (gradient side), Q_A (activation side), eigenvalues Λ
[out, in (+1)] and damping λ, the EK-FAC (or K-FAC) score of one module is

    score(q, z) = ⟨R_q ⊘ (Λ + λ), R_z⟩ = ⟨R_q ⊘ √(Λ + λ), R_z ⊘ √(Λ + λ)⟩,
    R_x = Q_Sᵀ G_x Q_A,

G_x the per-example gradient in the ``[out, in (+1)]`` layout (the query's measurement,
the training example's loss), summed over modules. So each training example is stored
once as Z̃_z = C(R_z ⊘ √(Λ + λ)) per module (``diagonal`` factors: Q = I), with a
compression C, and a query against the whole training set is one matrix product,
scores = Q̃ Z̃ᵀ, Q̃ the query's gradient through the same map. Two compressions:

- ``eigen``: keep the ``dimension`` coordinates with the largest Λ (a module with fewer
  coordinates keeps all). EK-FAC fits Λ = E[R_z²], so the kept coordinates are those
  where training gradients vary most relative to the damping (Λ/(Λ + λ) is the scaled
  variance). Exact at full dimension.
- ``projection``: a Kronecker-structured random projection, as LoGra does:
  C(X) = P_S X P_Aᵀ with P_S [r_s, out] and P_A [r_a, in] having orthonormal rows (the
  Q of a seeded Gaussian's QR, seed mixed with the module's position). At full dimension
  P_S and P_A are orthogonal, C preserves inner products and the scores are exact.
  r_s × r_a keeps the module's aspect ratio within the budget: r_s = round(√(d·out/in))
  (clamped to [1, out]), r_a = ⌊d / r_s⌋ (clamped to [1, in]), then r_s = ⌊d / r_a⌋
  (clamped) to use what is left, so r_s·r_a ≤ d (:func:`projection_shape`).

``dimension`` is per module; ``None`` keeps every coordinate (exact). The damping is baked
into the index: scores with another damping are refused. ``identity`` factors have no
eigenvalues to scale by and are refused.

``storage`` float16 or bfloat16 keeps the vectors in 16 bits (half the disk and half the
memory the product reads; rounding of relative size 2⁻¹¹ or 2⁻⁸ per coordinate); they are
computed, and upcast for the product, in ``dtype``. With EK-FAC, Λ = E[R_z²], so a stored
coordinate has mean square Λ/(Λ + λ) ≤ 1 over the training set: well inside float16's
range (a vector that overflows it is refused).

>>> projection_shape(64, 256, 1024), projection_shape(64, 256, None)
((16, 64), (64, 256))
>>> lam, r_q, r_z = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
>>> damped = (r_q / (lam + 1.0) * r_z).sum()
>>> indexed = (r_q / (lam + 1.0).sqrt()) @ (r_z / (lam + 1.0).sqrt())
>>> bool(torch.isclose(damped, indexed))
True

Training batches are streamed (gradients never all in memory) over ``[start, stop)``,
split into ``partitions`` parts; with a folder (:class:`~attribution.store.IndexStore`)
each part is saved under its example range when done, so a killed build resumes, and
builds of disjoint ranges (e.g. one per process) fill one index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution.curvature import DTYPES, Damping, FactorArguments, Factors, partition_bounds
from attribution.distributed import broadcast, current_shard, gather, on_main, work_record
from attribution.errors import (
    FactorMismatchError,
    InputError,
    NonFiniteError,
    check_choice,
    check_positive_ints,
)
from attribution.gradients import module_io, outer_sum
from attribution.modules import select_modules
from attribution.store import IndexStore
from attribution.task import Task, batches

METHODS = ("eigen", "projection")
STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHUNK_FLOATS = 1 << 20  # stored floats upcast at a time by index_scores (4 MB in float32)
INDEXABLE = ("diagonal", "kfac", "ekfac")  # strategies with eigenvalues to scale by


@dataclass(frozen=True)
class IndexArguments:
    """How a gradient index is built. Every field is recorded beside the index on disk."""

    dimension: int | None = field(
        default=None,
        metadata={"help": "stored coordinates per module and example; none: all (exact)"},
    )
    method: str = field(
        default="eigen",
        metadata={
            "help": "eigen (the coordinates of largest eigenvalue) or projection (a random "
            "Kronecker projection, LoGra)",
            "choices": METHODS,
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds the projection matrices"})
    batch_size: int = field(default=16, metadata={"help": "sequences per pass"})
    partitions: int = field(
        default=1, metadata={"help": "parts of the range built, each saved when done"}
    )
    dtype: str = field(
        default="float32", metadata={"help": "float32 or float64: gradients, vectors and scores"}
    )
    storage: str | None = field(
        default=None,  # None: as dtype (and what an index built before this field holds)
        metadata={
            "help": "precision the vectors are stored in: float16 or bfloat16 halve the disk "
            "and the product's memory traffic (computed, and multiplied after upcasting, in the "
            "gradients' dtype; default: that dtype, float32)",
            "choices": tuple(STORAGE),
        },
    )
    damping: Damping = field(
        default_factory=Damping, metadata={"help": "λ of (G + λI)⁻¹, baked into the index"}
    )

    def __post_init__(self) -> None:
        d = self.dimension
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise InputError(f"IndexArguments.dimension must be an integer >= 1 or None, got {d!r}")
        check_choice("IndexArguments", "method", self.method, METHODS)
        if self.dtype not in DTYPES:
            raise InputError(f"IndexArguments.dtype must be float32 or float64, got {self.dtype!r}")
        if self.storage is not None:
            check_choice("IndexArguments", "storage", self.storage, tuple(STORAGE))
        check_positive_ints(
            "IndexArguments", {"batch_size": self.batch_size, "partitions": self.partitions}
        )
        damping = self.damping
        damping = Damping(**damping) if isinstance(damping, Mapping) else Damping.of(damping)
        object.__setattr__(self, "damping", damping)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The stored vectors' dtype: ``storage``, else ``dtype``."""
        return self.torch_dtype if self.storage is None else STORAGE[self.storage]


@dataclass(frozen=True)
class IndexPart:
    """The compressed gradients of training examples [start, stop): in memory or on disk."""

    start: int
    stop: int
    vectors: torch.Tensor | None = None  # [stop - start, floats per example]
    path: Path | None = None

    def load(self) -> torch.Tensor:
        if self.vectors is not None:
            return self.vectors
        from safetensors.torch import load_file

        return load_file(self.path)["vectors"]


@dataclass
class Index:
    """Compressed, preconditioned training gradients and the map that made them.

    ``bases[module]`` holds ``scale`` = (Λ + λ)^(-1/2) [out, in], the eigenvectors
    ``gradient_eigenvectors`` / ``activation_eigenvectors`` (not for diagonal factors), and
    ``keep`` (eigen: flat indices of the stored coordinates) or ``p_s`` / ``p_a``
    (projection). ``parts`` hold the vectors of the training examples built so far; the
    columns of a vector are the modules' coordinates, in ``bases`` order.
    """

    arguments: IndexArguments
    factor_arguments: FactorArguments
    bases: dict[str, dict[str, torch.Tensor]]
    n_train: int
    parts: list[IndexPart] = field(default_factory=list)
    description: dict[str, Any] = field(default_factory=dict)  # arguments.json when stored

    @property
    def modules(self) -> list[str]:
        return list(self.bases)

    @property
    def dimensions(self) -> dict[str, int]:
        """Stored floats per example, per module."""
        return {name: _stored(basis) for name, basis in self.bases.items()}

    @property
    def floats_per_example(self) -> int:
        return sum(self.dimensions.values())

    def complete_parts(self) -> list[IndexPart]:
        """Parts that cover [0, n_train) exactly once, in order (refused when some are
        missing)."""
        chosen = _tiling([(p.start, p.stop) for p in self.parts], self.n_train)
        if chosen is None:
            built = sum(p.stop - p.start for p in _union(self.parts))
            raise InputError(
                f"the index holds {built} of its {self.n_train} training examples; finish "
                "building it (excise index on the same folder resumes)"
            )
        by_range = {(p.start, p.stop): p for p in self.parts}
        return [by_range[r] for r in chosen]

    def vectors(self) -> torch.Tensor:
        """Every training example's vector, [n_train, floats per example], as stored."""
        return torch.cat([part.load() for part in self.complete_parts()])

    def in_memory(self) -> Index:
        """This index with every part's vectors read into memory (for repeated queries;
        :func:`index_scores` otherwise reads the parts from disk on each call)."""
        parts = [IndexPart(p.start, p.stop, vectors=p.load()) for p in self.complete_parts()]
        return Index(
            self.arguments,
            self.factor_arguments,
            self.bases,
            self.n_train,
            parts,
            self.description,
        )

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None) -> Index:
        """The index saved in ``folder``; with ``model``, refused when built for another."""
        store = IndexStore.existing(folder, model)
        description = store.description
        bases = _nested(store.load("basis") or {})
        if not bases:
            raise InputError(f"{folder}: the index has no basis yet; build it again")
        parts = [IndexPart(a, b, path=store.part_path(a, b)) for a, b in store.ranges()]
        return cls(
            IndexArguments(**description["arguments"]),
            FactorArguments(**description["factor_arguments"]),
            {name: bases[name] for name in description["modules"]},
            description["n_train"],
            parts,
            description,
        )


def projection_shape(n_out: int, n_in: int, dimension: int | None) -> tuple[int, int]:
    """(r_s, r_a) of a Kronecker projection of an [n_out, n_in] matrix to at most
    ``dimension`` coordinates, keeping the aspect ratio (see the module docstring).

    >>> projection_shape(8, 2, 4), projection_shape(3, 3, 100), projection_shape(5, 7, 1)
    ((4, 1), (3, 3), (1, 1))
    """
    if dimension is None or dimension >= n_out * n_in:
        return n_out, n_in
    r_s = min(max(round(math.sqrt(dimension * n_out / n_in)), 1), n_out)
    r_a = min(max(dimension // r_s, 1), n_in)
    r_s = min(max(dimension // r_a, 1), n_out)
    return r_s, r_a


def index_bases(factors: Factors, arguments: IndexArguments) -> dict[str, dict[str, torch.Tensor]]:
    """The map from a module's gradient to its stored coordinates, for every module."""
    strategy = factors.arguments.strategy
    if strategy not in INDEXABLE:
        raise InputError(
            f"an index needs curvature eigenvalues: {strategy} factors have none; fit "
            f"{', '.join(INDEXABLE)} factors"
        )
    dtype = arguments.torch_dtype
    bases = {}
    for position, name in enumerate(factors.modules):
        eig = factors.eigenvalues(name).double()  # [out, in]
        lam = factors.damping(name, arguments.damping)
        if not (eig + lam > 0).all():
            raise InputError(
                f"module {name!r} has zero eigenvalues and no damping: give a damping > 0"
            )
        basis = {"scale": (eig + lam).rsqrt().to(dtype), "damping": torch.tensor(lam)}
        if strategy != "diagonal":
            for side in ("gradient", "activation"):
                key = f"{side}_eigenvectors"
                basis[key] = factors.tensors[name][key].to(dtype)
        n_out, n_in = eig.shape
        if arguments.method == "eigen":
            order = torch.argsort(eig.flatten(), descending=True, stable=True)
            keep = n_out * n_in if arguments.dimension is None else arguments.dimension
            basis["keep"] = order[:keep].sort().values
        else:
            r_s, r_a = projection_shape(n_out, n_in, arguments.dimension)
            generator = torch.Generator().manual_seed(arguments.seed * 1_000_003 + position)
            basis["p_s"] = _orthonormal_rows(r_s, n_out, generator).to(dtype)
            basis["p_a"] = _orthonormal_rows(r_a, n_in, generator).to(dtype)
        bases[name] = basis
    return bases


def build_index(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    factors: Factors,
    arguments: IndexArguments | None = None,
    folder: str | Path | None = None,
    progress: bool | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Index:
    """Compress every training gradient of ``train[start:stop]`` (see the module docstring).

    The range is split into ``arguments.partitions`` parts. With ``folder`` each part is
    saved when done and a rerun skips finished parts; a folder begun with other arguments,
    another model, other factors or other data is refused (``fingerprint``: the model's,
    when known; ``extra``: more facts recorded and matched, e.g. the tokenizer's
    ``max_length``). The result holds the parts of this range (the whole index when the
    range is the whole training set; :meth:`Index.load` gathers what several builds made).
    """
    arguments = arguments or IndexArguments()
    stop = len(train) if stop is None else stop
    if not 0 <= start < stop <= len(train):
        raise InputError(f"index range [{start}, {stop}) outside the {len(train)} examples")
    bases = index_bases(factors, arguments)
    shard = current_shard()  # under torchrun: a share of every part per rank, rank 0 writes
    store = None
    if folder is not None:
        dimensions = {name: _stored(basis) for name, basis in bases.items()}
        store = on_main(
            lambda: IndexStore.open_for(
                folder, arguments, model, factors, train, dimensions, fingerprint, extra
            ),
            shard,
        )
        saved = broadcast(store.load("basis") if store else None, shard)
        if saved is None:
            if store:
                flat = {f"{m}/{k}": t for m, b in bases.items() for k, t in b.items()}
                store.save("basis", flat)
        else:
            bases = {name: _nested(saved)[name] for name in bases}
    modules = select_modules(model, factors.modules)
    parts = []
    for a, b in partition_bounds(stop - start, arguments.partitions):
        first, last = start + a, start + b
        path = IndexStore(folder).part_path(first, last) if folder is not None else None
        if broadcast(path is not None and path.exists(), shard):  # finished by an earlier run
            parts.append(IndexPart(first, last, path=path))
            continue
        low, high = shard.bounds(first, last)
        vectors = part_vectors(model, task, train, modules, bases, arguments, low, high, progress)
        shares = gather(vectors, shard)
        vectors = _stored_as(torch.cat(shares), arguments, first, last)
        if path is None:
            parts.append(IndexPart(first, last, vectors=vectors))
            continue
        if store:
            name = path.name.removesuffix(".safetensors")
            store.save(name, {"vectors": vectors}, work_record([len(v) for v in shares]))
        parts.append(IndexPart(first, last, path=path))
    description = store.description if store else {}
    return Index(arguments, factors.arguments, bases, len(train), parts, description)


def part_vectors(
    model: nn.Module,
    task: Task,
    train: Sequence[Any],
    modules: Mapping[str, nn.Module],
    bases: Mapping[str, Mapping[str, torch.Tensor]],
    arguments: IndexArguments,
    start: int,
    stop: int,
    progress: bool | None = None,
) -> torch.Tensor:
    """The compressed loss gradients of ``train[start:stop]``, [stop - start, floats]."""
    chunks = compressed_batches(
        model, task, train, modules, bases, arguments, False, start, stop, progress
    )
    empty = torch.zeros(0, sum(map(_stored, bases.values())), dtype=arguments.torch_dtype)
    return torch.cat([empty, *(vectors.cpu() for vectors in chunks)])


def compressed_batches(
    model: nn.Module,
    task: Task,
    examples: Sequence[Any],
    modules: Mapping[str, nn.Module],
    bases: Mapping[str, Mapping[str, torch.Tensor]],
    arguments: IndexArguments,
    measurement: bool,
    start: int = 0,
    stop: int | None = None,
    progress: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Per batch of ``examples[start:stop]``: each example's compressed gradient [b, floats]
    of the loss (or, with ``measurement``, of the task's measurement: a query's)."""
    device = next(model.parameters()).device
    on_device = {n: {k: t.to(device) for k, t in b.items()} for n, b in bases.items()}
    desc = "queries" if measurement else "index"
    dtype = arguments.torch_dtype
    for _, _, batch in batches(
        model, task, examples, arguments.batch_size, desc, progress, start, stop
    ):
        records = module_io(model, task, batch, modules, measurement=measurement, dtype=dtype)
        yield torch.cat([_compress(records[n], on_device[n]) for n in bases], dim=1)


def index_scores(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    index: Index,
    damping: Damping | float | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """Influence of every indexed training example on every query, [n_query, n_train].

    ``damping``: None (the index's) or the damping asked for, refused unless it is the
    index's (it is baked into the stored vectors). At full dimension this equals
    :func:`attribution.influence.pairwise_scores` with the index's factors and damping.
    Vectors stored in 16 bits are upcast to ``dtype`` a chunk of rows at a time
    (``CHUNK_FLOATS``), never the whole [n_train, floats] matrix at once.
    """
    if damping is not None and Damping.of(damping) != index.arguments.damping:
        raise FactorMismatchError(
            f"the index was built with damping {index.arguments.damping.describe()}, not "
            f"{Damping.of(damping).describe()}; score with its damping or build another index"
        )
    parts = index.complete_parts()
    query = query_vectors(model, task, queries, index, batch_size, progress)  # [q, floats]
    scores = torch.empty(query.shape[0], index.n_train, dtype=query.dtype)
    rows = max(1, CHUNK_FLOATS // max(1, query.shape[1]))  # training examples per chunk
    for part in parts:
        vectors = part.load()  # [part, floats], as stored
        for low in range(0, len(vectors), rows):
            chunk = vectors[low : low + rows].to(query.device, query.dtype)  # [≤ rows, floats]
            start = part.start + low
            scores[:, start : start + len(chunk)] = (query @ chunk.T).cpu()
    return scores


def query_vectors(
    model: nn.Module,
    task: Task,
    queries: Sequence[Any],
    index: Index,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> torch.Tensor:
    """The queries' measurement gradients through the index's map, [n_query, floats]."""
    arguments = index.arguments
    if batch_size is not None:
        arguments = IndexArguments(**{**arguments.to_dict(), "batch_size": batch_size})
    modules = select_modules(model, index.modules)
    chunks = compressed_batches(
        model, task, queries, modules, index.bases, arguments, True, progress=progress
    )
    return torch.cat(list(chunks))


def _compress(record, basis: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One module's C(Q_Sᵀ G Q_A ⊘ √(Λ + λ)) per example of a batch, [b, stored]."""
    rotated = None
    for a, g in zip(record.inputs, record.output_grads, strict=True):
        if "gradient_eigenvectors" in basis:  # Q_Sᵀ G Q_A = Σₜ (Q_Sᵀ gₜ)(Q_Aᵀ aₜ)ᵀ
            g = g @ basis["gradient_eigenvectors"]
            a = a @ basis["activation_eigenvectors"]
        term = outer_sum(g, a)  # [b, out, in]
        rotated = term if rotated is None else rotated + term
    scaled = rotated * basis["scale"]
    if "keep" in basis:
        return scaled.flatten(1)[:, basis["keep"]]
    return (basis["p_s"] @ scaled @ basis["p_a"].T).flatten(1)  # [b, r_s·r_a]


def _stored_as(vectors: torch.Tensor, arguments: IndexArguments, start: int, stop: int):
    """``vectors`` (computed in ``dtype``) in the storage precision; refused if they
    overflow it."""
    stored = vectors.to(arguments.storage_dtype)
    if vectors.isfinite().all() and not stored.isfinite().all():
        raise NonFiniteError(
            f"the vectors of training examples [{start}, {stop}) overflow {arguments.storage}; "
            "store them in bfloat16 or float32"
        )
    return stored


def _stored(basis: Mapping[str, torch.Tensor]) -> int:
    if "keep" in basis:
        return basis["keep"].numel()
    return basis["p_s"].shape[0] * basis["p_a"].shape[0]


def _orthonormal_rows(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, columns] with orthonormal rows (rows ≤ columns), float64, from ``generator``."""
    gaussian = torch.randn(columns, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)  # [columns, rows]
    return (q * torch.sign(torch.diagonal(r))).T  # signs fixed: a unique, seeded draw


def _nested(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        module, quantity = key.rsplit("/", 1)
        nested.setdefault(module, {})[quantity] = tensor
    return nested


def _tiling(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]] | None:
    """Ranges from ``ranges`` that cover [0, n) end to end, or None if there are none."""
    previous: dict[int, tuple[int, int] | None] = {0: None}
    for a, b in sorted(set(ranges)):
        if a in previous and b not in previous:
            previous[b] = (a, b)
    if n not in previous:
        return None
    chosen, position = [], n
    while position:
        chosen.append(previous[position])
        position = previous[position][0]
    return chosen[::-1]


def _union(parts: Sequence[IndexPart]) -> list[IndexPart]:
    """Disjoint ranges covering the same examples as ``parts``."""
    merged: list[IndexPart] = []
    for part in sorted(parts, key=lambda p: p.start):
        if merged and part.start <= merged[-1].stop:
            last = merged[-1]
            merged[-1] = IndexPart(last.start, max(last.stop, part.stop))
        else:
            merged.append(IndexPart(part.start, part.stop))
    return merged
