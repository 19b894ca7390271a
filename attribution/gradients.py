"""Per-example gradients of tracked modules: a vectorized hook path and a reference.

Hook path. A forward hook keeps each tracked module's input a (with a trailing 1 when it
has a bias) and its output; one ``autograd.grad`` of the summed loss gives g = ∂L/∂output at
every token. Because L = Σₙ ℓ(zₙ) and examples do not interact, the gradient of example
n is Gₙ = Σₜ gₙₜ aₙₜᵀ (one batched matrix product), for every example at once. The
model's ``.grad`` fields are never touched and the hooks are always removed.

Reference path (:func:`per_example_gradients_func`): ``torch.func.vmap`` of
``torch.func.grad`` of the task's loss on one example through ``functional_call``. It
works for any differentiable model and is what the hook path is tested against. Each
example runs alone and without its attention mask: with right padding and causal
attention, padding never changes the outputs at real tokens. Empirical Fisher only
(labels are not sampled inside ``vmap``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from attribution.errors import NonFiniteError
from attribution.modules import from_parameter_gradients, has_bias
from attribution.precision import autocast
from attribution.task import Generators, Task


@dataclass
class ModuleIO:
    """What one tracked module saw in one forward pass (one entry per call)."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # [batch, seq, in (+ 1)]
    outputs: list[torch.Tensor] = field(default_factory=list)  # [batch, seq, out]
    output_grads: list[torch.Tensor] = field(default_factory=list)  # [batch, seq, out]


@contextlib.contextmanager
def capture(
    modules: Mapping[str, nn.Module], dtype: torch.dtype | None = None
) -> Iterator[dict[str, ModuleIO]]:
    """Record tracked modules' inputs and outputs during the forward passes in the block.

    Inside the block the tracked parameters do not require grad (restored after): only
    gradients with respect to module outputs are needed, so autograd neither keeps a
    second copy of each module's input nor computes weight gradients. A tracked module
    whose input does not require grad (the first one of a frozen model) gets a leaf copy
    that does, so its output can still be differentiated.
    """
    records = {name: ModuleIO() for name in modules}
    handles, flags = [], []
    try:
        for name, module in modules.items():
            for p in module.parameters(recurse=False):
                flags.append((p, p.requires_grad))
                p.requires_grad_(False)
            handles.append(module.register_forward_pre_hook(_differentiable_input))
            hook = _recorder(records[name], dtype, has_bias(module))
            handles.append(module.register_forward_hook(hook))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _differentiable_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and torch.is_grad_enabled() and not x.requires_grad:
        return (x.detach().requires_grad_(True), *args[1:])
    return None


def _recorder(record: ModuleIO, dtype: torch.dtype | None, bias: bool):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        a = inputs[0].detach()
        a = a if a.dim() == 3 else a.reshape(a.shape[0], -1, a.shape[-1])
        a = a.to(dtype) if dtype is not None else a
        if bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        record.inputs.append(a)
        record.outputs.append(output)

    return hook


def backward_to_outputs(
    loss: torch.Tensor, records: Mapping[str, ModuleIO], dtype: torch.dtype | None = None
) -> None:
    """Fill ``output_grads`` of every record with ∂(Σ loss)/∂output."""
    _check_finite(loss, "the loss")
    outputs = [out for record in records.values() for out in record.outputs]
    grads = torch.autograd.grad(loss.sum(), outputs, allow_unused=True)
    position = 0
    for record in records.values():
        for out in record.outputs:
            g = grads[position]
            position += 1
            g = torch.zeros_like(out) if g is None else g
            g = g if g.dim() == 3 else g.reshape(g.shape[0], -1, g.shape[-1])
            record.output_grads.append(g.to(dtype) if dtype is not None else g)
        record.outputs.clear()  # free the graph


def example_gradients(record: ModuleIO) -> torch.Tensor:
    """Gₙ = Σₜ gₙₜ aₙₜᵀ summed over the module's calls, shape [batch, out, in + 1]."""
    total = None
    for a, g in zip(record.inputs, record.output_grads, strict=True):
        term = outer_sum(g, a)
        total = term if total is None else total + term
    return total


def outer_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Σₜ gₜ aₜᵀ per example: [batch, seq, out] × [batch, seq, in] → [batch, out, in].

    A batched matrix product (faster than the equivalent einsum on the CPU).
    """
    return torch.bmm(g.transpose(1, 2), a)


def module_io(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    measurement: bool = False,
    sample: bool = False,
    generator: Generators = None,
    dtype: torch.dtype | None = None,
    autocast_to: str = "none",
) -> dict[str, ModuleIO]:
    """One forward and backward pass: each tracked module's inputs a and output grads g.

    The objective is the task's loss (labels sampled when ``sample``) or, with
    ``measurement``, the task's measurement (what a query's influence is measured on);
    ``autocast_to``: the forward's autocast (:func:`attribution.precision.autocast`).
    """
    with capture(modules, dtype) as records, torch.enable_grad():
        with autocast(_device_of(batch), autocast_to) as scale:
            if measurement:
                objective = task.measurement(model, batch)
            else:
                objective = task.loss(model, batch, sample=sample, generator=generator)
        backward_to_outputs(objective * scale, records, dtype)
        if scale != 1:
            for record in records.values():
                record.output_grads[:] = [g / scale for g in record.output_grads]
    return records


class Visitor:
    """What :func:`stream_io` does with each call of a tracked module (subclass it).

    ``on_input(name, a, bias)`` sees the input a ``[batch, seq, in]`` during the forward
    pass — without the trailing 1 of a module with a bias (``bias`` True), which the
    visitor accounts for without copying a — and returns what must be kept until the
    backward (None: nothing);
    ``on_grad(name, kept, g, last)`` sees g = ∂L/∂output ``[batch, seq, out]`` as soon as
    autograd has it; ``last`` is True for the module's last call to be differentiated.
    """

    def on_input(self, name: str, a: torch.Tensor, bias: bool) -> object:
        return None

    def on_grad(self, name: str, kept: object, g: torch.Tensor, last: bool) -> None:
        pass

    def flush(self) -> None:
        """After the backward: finish what calls that never got a gradient left open."""


def stream_io(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    visitor: Visitor,
    sample: bool = False,
    generator: Generators = None,
    dtype: torch.dtype | None = None,
    autocast_to: str = "none",
) -> None:
    """One forward and backward pass of the task's loss that hands each module's a and g
    to ``visitor`` as soon as they exist and keeps neither (unlike :func:`module_io`,
    which holds every module's a and g for the whole batch).

    Every parameter of the model is frozen for the pass, so the tracked modules' inputs
    that do not require grad (the first layer's) become leaves that do; autograd
    differentiates the loss with respect to those leaves alone, and each tracked output's
    gradient passes through a tensor hook on the way, is visited and freed as the
    backward moves on. No weight gradient is computed. ``autocast_to``: the forward's
    autocast (:func:`attribution.precision.autocast`); a and g are visited in ``dtype``.
    """
    pending = dict.fromkeys(modules, 0)  # calls whose gradient has not arrived yet
    leaves: list[torch.Tensor] = []
    scale = [1.0]  # the loss scale of the forward's precision
    handles, flags = [], []

    def leaf_input(module: nn.Module, args: tuple) -> tuple | None:
        replaced = _differentiable_input(module, args)
        if replaced is not None:
            leaves.append(replaced[0])
        return replaced

    def forward_hook(name, bias):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            a = _as_sequence(inputs[0].detach(), dtype)
            with torch.autocast(a.device.type, enabled=False):  # the visitor's sums: in dtype
                kept = [visitor.on_input(name, a, bias)]
            pending[name] += 1

            def grad_hook(g: torch.Tensor) -> None:
                pending[name] -= 1
                g = _as_sequence(g, dtype) / scale[0] if scale[0] != 1 else _as_sequence(g, dtype)
                visitor.on_grad(name, kept.pop(), g, pending[name] == 0)

            output.register_hook(grad_hook)

        return hook

    try:
        for p in model.parameters():
            flags.append((p, p.requires_grad))
            p.requires_grad_(False)
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(leaf_input))
            handles.append(module.register_forward_hook(forward_hook(name, has_bias(module))))
        with torch.enable_grad():
            with autocast(_device_of(batch), autocast_to) as scale[0]:
                loss = task.loss(model, batch, sample=sample, generator=generator)
            _check_finite(loss, "the loss")
            if loss.requires_grad:
                torch.autograd.grad(loss.sum() * scale[0], leaves, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def _device_of(batch: Mapping[str, torch.Tensor]) -> torch.device:
    return batch["input_ids"].device


def _as_sequence(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``x`` as [batch, seq, features] in ``dtype``."""
    x = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
    return x.to(dtype) if dtype is not None else x


def per_example_gradients(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    measurement: bool = False,
    sample: bool = False,
    generator: Generators = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient of each example's loss (or measurement) per module, ``[batch, out, in + 1]``."""
    records = module_io(model, task, batch, modules, measurement, sample, generator, dtype)
    grads = {name: example_gradients(record) for name, record in records.items()}
    for name, grad in grads.items():
        _check_finite(grad, f"the gradient of module {name!r}")
    return grads


def per_example_gradients_func(
    model: nn.Module,
    task: Task,
    batch: Mapping[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    vectorize: bool = True,
) -> dict[str, torch.Tensor]:
    """The ``torch.func`` reference for :func:`per_example_gradients` (empirical Fisher)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    params.update({n: b.detach() for n, b in model.named_buffers()})
    tracked = {
        f"{name}.{kind}": getattr(module, kind).detach()
        for name, module in modules.items()
        for kind in ("weight", "bias")
        if getattr(module, kind, None) is not None
    }
    examples = {k: v for k, v in batch.items() if k != "attention_mask"}

    def loss_of_one(tracked_params, example):
        merged = {**params, **tracked_params}

        def functional_model(**kwargs):
            return functional_call(model, merged, args=(), kwargs=kwargs)

        single = {k: v.unsqueeze(0) for k, v in example.items()}
        return task.loss(functional_model, single).sum()

    gradient = grad(loss_of_one)
    if vectorize:
        per_param = vmap(gradient, in_dims=(None, 0))(tracked, examples)
    else:
        rows = [
            gradient(tracked, {k: v[i] for k, v in examples.items()})
            for i in range(batch["input_ids"].shape[0])
        ]
        per_param = {k: torch.stack([r[k] for r in rows]) for k in tracked}
    return {
        name: from_parameter_gradients(
            module,
            per_param[f"{name}.weight"],
            per_param.get(f"{name}.bias") if has_bias(module) else None,
        )
        for name, module in modules.items()
    }


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(
            f"{what} is NaN or infinite; check the data and the model's weights "
            "(a learning rate too high, an fp16 overflow)"
        )
