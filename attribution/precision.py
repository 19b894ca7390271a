"""Models computed in float32 and stored in 16-bit floats.

A checkpoint saved in bfloat16 or float16 is loaded in float32 — exactly: every 16-bit
value is a float32 value — so that losses, gradients and curvature accumulate in full
precision. The dtype each tensor had on disk is kept on the model (:func:`mark_stored`), and
three things follow from it:

- hashes are of what is on disk: :func:`attribution.fingerprint.tensor_hashes` hashes a
  marked tensor cast back to its stored dtype, a round trip that is exact for any value
  that came from the file, so a manifest's hashes can be checked against the user's files;
- an edit is rounded to what will be saved (:func:`round_to_stored`), so that the model
  an audit measures is the model written, and an untouched tensor stays bit-identical;
- the model is saved in its own dtype (:func:`as_stored`), not at twice the size.

>>> import torch
>>> net = torch.nn.Linear(2, 1)
>>> mark_stored(net, {"weight": torch.bfloat16})
>>> stored_dtypes(net)
{'weight': torch.bfloat16}
>>> with torch.no_grad():
...     _ = net.weight.fill_(1 + 2**-12)  # not a bfloat16 value
>>> round_to_stored(net)
>>> net.weight.dtype, net.weight[0, 0].item()
(torch.float32, 1.0)
>>> with as_stored(net):
...     net.weight.dtype, net.bias.dtype
(torch.bfloat16, torch.float32)
>>> net.weight.dtype
torch.float32
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

ATTRIBUTE = "excise_stored_dtypes"  # the model attribute that holds the map


def mark_stored(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Record that the state-dict entries ``dtypes`` names are stored in those dtypes.

    Only floating tensors held in a wider dtype than their stored one are recorded (a
    float32 tensor stored in float32 needs no note).
    """
    state = model.state_dict()
    marks = {}
    for name, dtype in dtypes.items():
        tensor = state.get(name)
        if tensor is None or not tensor.is_floating_point() or not dtype.is_floating_point:
            continue
        if torch.finfo(dtype).bits < torch.finfo(tensor.dtype).bits:
            marks[name] = dtype
    setattr(model, ATTRIBUTE, marks)


def stored_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """State-dict name → stored dtype, for the tensors held wider than stored ({} if none)."""
    return dict(getattr(model, ATTRIBUTE, None) or {})


def as_hashed(name: str, tensor: torch.Tensor, dtypes: Mapping[str, torch.dtype]) -> torch.Tensor:
    """The tensor as it is stored (cast back when marked), for hashing."""
    dtype = dtypes.get(name)
    return tensor if dtype is None else tensor.detach().to(dtype)


def round_to_stored(model: nn.Module) -> None:
    """Round every marked tensor, in place, to the nearest value of its stored dtype.

    Exact (no change at all) for a tensor whose values came from the stored file.
    """
    with torch.no_grad():
        for tensor, dtype in _marked_tensors(model):
            tensor.data = tensor.data.to(dtype).to(tensor.dtype)


@contextlib.contextmanager
def as_stored(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its marked tensors in their stored dtypes (to save it); back after.

    Round first (:func:`round_to_stored`) for the way back to be exact.
    """
    marked = list(_marked_tensors(model))
    wide = [tensor.dtype for tensor, _ in marked]
    with torch.no_grad():
        for tensor, dtype in marked:
            tensor.data = tensor.data.to(dtype)
    try:
        yield model
    finally:
        with torch.no_grad():
            for (tensor, _), dtype in zip(marked, wide, strict=True):
                tensor.data = tensor.data.to(dtype)


def _marked_tensors(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.dtype]]:
    """Each marked parameter or buffer once (tied weights share one), with its dtype."""
    dtypes = stored_dtypes(model)
    seen: set[int] = set()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    for name, tensor in named:
        if name in dtypes and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor, dtypes[name]


AUTOCAST = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
FLOAT16_LOSS_SCALE = 2.0**12  # float16 gradients of small losses underflow without it


@contextlib.contextmanager
def autocast(device: torch.device, name: str = "none") -> Iterator[float]:
    """Forward passes in ``name`` (``bfloat16``/``float16``; ``none``: as the model is) on
    ``device`` for the block; yields the loss scale the backward must use (and undo):
    2¹² for float16, whose small gradients would underflow, 1 otherwise. The hooks cast
    every a and g back to the accumulation dtype (float32 or float64), so factors and
    scores are summed in full precision whatever the forward ran in.

    >>> with autocast(torch.device("cpu"), "bfloat16") as scale:
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype, scale
    (torch.bfloat16, 1.0)
    """
    if name not in AUTOCAST:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST)}, got {name!r}")
    if AUTOCAST[name] is None:
        yield 1.0
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST[name]):
        yield FLOAT16_LOSS_SCALE if name == "float16" else 1.0
