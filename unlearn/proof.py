"""Evidence that an edit stayed in its scope: a hash per tensor, before and after.

Every entry of the model's state dict is listed with its SHA-256 before and after the
edit and how many of its elements were in scope. The claim "everything outside the scope
is bit-identical" holds iff every tensor with no in-scope element has equal hashes. Tied
tensors (an output head sharing the embedding's storage) count as in scope when the
parameter they share is.

>>> import torch
>>> from unlearn.scope import Scope
>>> net = torch.nn.Linear(2, 1)
>>> before = state_hashes(net)
>>> scope = Scope({"weight": torch.tensor([[True, False]]), "bias": torch.tensor([False])})
>>> with torch.no_grad():
...     net.weight[0, 0] += 1
>>> proof = scope_proof(before, state_hashes(net), scope, net)
>>> proof["holds"], proof["out_of_scope_tensors"], proof["changed_tensors"]
(True, 1, 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from attribution.fingerprint import tensor_hashes
from unlearn.scope import Scope


class ScopeViolation(RuntimeError):
    """An out-of-scope tensor changed: a bug, never the user's input."""


def state_hashes(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every state-dict tensor (see :func:`attribution.tensor_hashes`)."""
    return tensor_hashes(model)


def scope_proof(
    before: Mapping[str, str], after: Mapping[str, str], scope: Scope, model: nn.Module
) -> dict[str, Any]:
    """Per-tensor hashes and the verdict; see the module docstring."""
    owner = parameter_owners(model)
    rows, out_of_scope, identical_outside = [], 0, 0
    for name in before:
        in_scope = scope.in_scope(owner.get(name, name))
        same = before[name] == after.get(name)
        rows.append(
            {
                "name": name,
                "in_scope": in_scope,
                "sha256_before": before[name],
                "sha256_after": after.get(name),
                "identical": same,
            }
        )
        if in_scope == 0:
            out_of_scope += 1
            identical_outside += int(same)
    return {
        "holds": out_of_scope == identical_outside and set(before) == set(after),
        "tensors": len(rows),
        "out_of_scope_tensors": out_of_scope,
        "out_of_scope_identical": identical_outside,
        "changed_tensors": sum(not r["identical"] for r in rows),
        "per_tensor": rows,
    }


def check_proof(proof: Mapping[str, Any]) -> None:
    """Raise :class:`ScopeViolation` naming the tensors that changed outside the scope."""
    if proof["holds"]:
        return
    bad = [r["name"] for r in proof["per_tensor"] if r["in_scope"] == 0 and not r["identical"]]
    missing = [r["name"] for r in proof["per_tensor"] if r["sha256_after"] is None]
    if bad:
        raise ScopeViolation(f"tensors outside the scope changed: {', '.join(bad[:10])}")
    raise ScopeViolation(
        "the edited model's tensors are not the original's: "
        + (f"missing {', '.join(missing[:10])}" if missing else "it has tensors the original lacks")
    )


def parameter_owners(model: nn.Module) -> dict[str, str]:
    """State-dict name → the parameter name that owns its storage (for tied weights)."""
    by_pointer = {p.data_ptr(): n for n, p in model.named_parameters()}
    return {name: by_pointer.get(t.data_ptr(), name) for name, t in model.state_dict().items()}
