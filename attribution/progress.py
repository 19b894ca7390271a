"""How long loops run: one progress bar convention and one eval-mode guard.

Every loop of the libraries that may take more than a moment shows a tqdm bar through
:func:`progress_bar`. ``progress`` is tri-state: ``True`` shows it, ``False`` hides it,
``None`` shows it only on a terminal (tqdm's ``disable=None``). :func:`evaluating` puts
models in eval mode (no dropout) for a block and restores every module's own flag.

>>> list(progress_bar(range(3), "counting", progress=False))
[0, 1, 2]
>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Dropout(0.5))
>>> with evaluating(net):
...     net.training
False
>>> net.training
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from torch import nn
from tqdm.auto import tqdm

T = TypeVar("T")


def hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a tri-state ``progress`` (None: hidden when not a terminal)."""
    return None if progress is None else not progress


def progress_bar(iterable: Iterable[T], desc: str, progress: bool | None = None, **kwargs):
    """``iterable`` wrapped in the libraries' bar (transient, hidden per ``progress``)."""
    return tqdm(iterable, desc=desc, disable=hidden(progress), leave=False, **kwargs)


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the block; each module's own training flag is restored afterwards."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for pairs in flags:
            for module, training in pairs:
                module.training = training
