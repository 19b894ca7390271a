"""Fingerprints of a model's weights: one hash per tensor and one for the whole model.

Artifacts record the fingerprint of the model they came from (factors refuse to be used
with another model), and an unlearning run proves that every out-of-scope tensor is
bit-identical by comparing per-tensor hashes.

>>> import torch
>>> net = torch.nn.Linear(2, 2)
>>> model_fingerprint(net) == model_fingerprint(net)
True
>>> with torch.no_grad():
...     net.weight[0, 0] += 1
>>> len(tensor_hashes(net)), len(model_fingerprint(net))
(2, 64)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from attribution.precision import as_hashed, stored_dtypes


def tensor_hash(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_hashes(model: nn.Module) -> dict[str, str]:
    """A hash per entry of the model's state dict (parameters and persistent buffers), of
    each tensor as it is stored (:mod:`attribution.precision`: a bfloat16 checkpoint held
    in float32 is hashed in bfloat16, so the hashes equal those of the file's tensors)."""
    dtypes = stored_dtypes(model)
    return {
        name: tensor_hash(as_hashed(name, tensor, dtypes))
        for name, tensor in model.state_dict().items()
    }


def model_fingerprint(model: nn.Module) -> str:
    """One hash of every tensor's name and hash: equal iff the weights are equal."""
    return fingerprint_of(tensor_hashes(model))


def fingerprint_of(hashes: Mapping[str, str]) -> str:
    """The model fingerprint from per-tensor hashes already computed (no second hashing)."""
    digest = hashlib.sha256()
    for name, value in sorted(hashes.items()):
        digest.update(f"{name}={value};".encode())
    return digest.hexdigest()
