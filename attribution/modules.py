"""Which modules are tracked, and the one gradient layout every strategy uses.

A tracked module is an ``nn.Linear`` or a Hugging Face ``Conv1D`` (GPT-2's projection,
``y = x W + b`` with ``W`` of shape [in, out]). Whatever the module, its gradient is
held in one layout, ``[out, in + 1]``: the weight gradient as ``nn.Linear`` stores it,
with the bias gradient as the last column (the input gets a trailing constant 1); a
module without a bias has no such column (``[out, in]``). Then the gradient of one
sequence is Σₜ gₜ aₜᵀ, with aₜ the input (plus the 1) and gₜ the gradient of the loss
with respect to the module's output at token t.

The default selection is every tracked module inside the repeated transformer blocks
(a numeric component in its name, such as ``model.layers.3.mlp.up_proj``), which leaves
out the embeddings and the output head; :func:`default_attribution_modules` (what
``excise attribute`` tracks unless told) adds the output head when it is small enough.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> sorted(select_modules(net, ["0", "2"]))
['0', '2']
>>> sorted(select_modules(net, r"^2$"))
['2']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from torch import nn

from attribution.errors import ModuleSelectionError

try:  # Hugging Face's GPT-2-style projection
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

TRACKABLE = (nn.Linear, Conv1D)
BLOCK_PATTERN = re.compile(r"(^|\.)\d+(\.|$)")

ModuleSpec = str | Sequence[str] | type | tuple[type, ...] | None


def select_modules(model: nn.Module, modules: ModuleSpec = None) -> dict[str, nn.Module]:
    """Tracked modules by name.

    ``modules`` is ``None`` (every Linear/Conv1D inside the transformer blocks), a regex
    (matched with ``re.search`` against module names; only Linear/Conv1D are kept), a list
    of exact module names, or a module type (or tuple of types).
    """
    named = dict(model.named_modules())
    if modules is None:
        chosen = {n: m for n, m in named.items() if _trackable(m) and BLOCK_PATTERN.search(n)}
        what = "Linear/Conv1D modules inside numbered transformer blocks"
    elif isinstance(modules, str):
        pattern = _compile(modules)
        chosen = {n: m for n, m in named.items() if _trackable(m) and pattern.search(n)}
        what = f"Linear/Conv1D modules matching {modules!r}"
    elif isinstance(modules, type) or (
        isinstance(modules, tuple) and all(isinstance(t, type) for t in modules)
    ):
        chosen = {n: m for n, m in named.items() if isinstance(m, modules) and n}
        what = f"modules of type {modules}"
    else:
        chosen = {name: _named_module(named, name) for name in modules}
        what = "the named modules"
    if not chosen:
        raise ModuleSelectionError(f"the model has no {what}; choose modules by name or regex")
    for name, module in chosen.items():
        if not _trackable(module):
            raise ModuleSelectionError(
                f"module {name!r} is a {type(module).__name__}; only nn.Linear and Conv1D "
                "modules can be tracked"
            )
    return chosen


HEAD_LIMIT = 8192  # outputs up to which the head is tracked by default (its S is out × out)


def default_attribution_modules(model: nn.Module) -> tuple[str, ...]:
    """What ``excise attribute`` tracks by default: every Linear/Conv1D in the blocks, and
    the output head (``get_output_embeddings()``, the unembedding) when it is a Linear
    with at most :data:`HEAD_LIMIT` outputs. On the tiny world's LM the head raised
    EK-FAC's LDS from 0.294 to 0.336 (paired +0.042 ± 0.003 over 120 queries,
    ``benchmarks/results/fidelity_modules_world.md``); a 32k-256k vocabulary would make
    its K-FAC factor (vocabulary²) and eigendecomposition the cost of the whole fit, so
    larger heads are left out unless named.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> default_attribution_modules(net)  # no output-embedding accessor: the blocks only
    ('0', '2')
    """
    names = tuple(select_modules(model))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Linear) and head.out_features <= HEAD_LIMIT:
        found = [name for name, module in model.named_modules() if module is head]
        names += tuple(n for n in found[:1] if n not in names)
    return names


def layout_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in + 1)`` (``(out, in)`` without a bias): the module's gradient layout."""
    n_in, n_out = _in_out(module)
    return n_out, n_in + int(has_bias(module))


def has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def to_parameter_gradients(module: nn.Module, gradient: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split ``[..., out, in + 1]`` into the module's own ``weight`` (and ``bias``) layout."""
    bias = has_bias(module)
    weight = gradient[..., :-1] if bias else gradient
    if isinstance(module, Conv1D):
        weight = weight.transpose(-1, -2)
    return {"weight": weight, "bias": gradient[..., -1]} if bias else {"weight": weight}


def from_parameter_gradients(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The inverse of :func:`to_parameter_gradients`."""
    if isinstance(module, Conv1D):
        weight = weight.transpose(-1, -2)
    return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    n_in, n_out = module.weight.shape  # Conv1D stores [in, out]
    return n_in, n_out


def _trackable(module: nn.Module) -> bool:
    return isinstance(module, TRACKABLE)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ModuleSelectionError(f"modules: {pattern!r} is not a valid regex ({err})") from None


def _named_module(named: dict[str, nn.Module], name: str) -> nn.Module:
    if name in named and name:
        return named[name]
    close = difflib.get_close_matches(name, [n for n in named if n], n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModuleSelectionError(f"the model has no module named {name!r}{hint}")


LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The transformer block number in a parameter or module name, or None.

    Blocks are the numbered children of a ``layers``/``layer``/``h``/``blocks``/``block``
    container (Llama, BERT, GPT-2 ...); the manifest and the audit report both use this.

    >>> layer_index("model.layers.3.mlp.up_proj.weight"), layer_index("transformer.h.11.attn")
    (3, 11)
    >>> layer_index("lm_head.weight") is None
    True
    """
    found = LAYER_PATTERN.search(name)
    return int(found.group(1)) if found else None
