"""Training data on the device when it fits, streamed from host memory in batches when it does not.

Every family's ``fit`` takes ``stream="auto" | True | False`` (stored verbatim, scikit-learn style)
and hands its training and validation tensors to :class:`Rows`:

- resident (``stream=False``, or ``"auto"`` when the data fit): the tensors are moved to the device
  once, as before (no copy when they are there already); a mini-batch is indexed there.
- streamed (``stream=True``, or ``"auto"`` when the data exceed :func:`device_budget`): the tensors
  stay in host memory (a pinned copy when the device is CUDA) and every mini-batch or chunk is copied
  to the device with ``non_blocking=True``. Contiguous chunks of pinned memory copy asynchronously;
  shuffled mini-batches are gathered on the host first.

Either way a full pass (validation, full-batch solvers) goes in chunks of about ``CHUNK_BYTES`` of
input and adds up per-chunk sums, and :meth:`Rows.map` transforms each chunk or batch as it is used,
so a pass never holds a second copy of the data; streamed results equal the resident ones up to
float rounding.

On the CPU everything is resident under ``"auto"`` (there is nothing to stream to);
``stream=True`` still runs the streaming code (its copies are no-ops there), which is how the tests check it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Stream = bool | Literal["auto"]

DEVICE_FRACTION = 0.5  # share of the free device memory that resident training data may take
CHUNK_BYTES = 256 * 2**20  # input bytes per chunk of a full pass


def device_budget(device: torch.device) -> float:
    """Bytes of training data that may stay resident on ``device``: ``DEVICE_FRACTION`` of the free CUDA
    memory (the rest is for the model, activations and the optimiser); unlimited elsewhere."""
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return DEVICE_FRACTION * free


def should_stream(stream: Stream, tensors: Sequence[torch.Tensor], device: torch.device) -> bool:
    """Whether ``tensors`` (all the data a fit would move to ``device``) are streamed: ``stream`` itself when
    it is a bool, else (``"auto"``) whether they exceed :func:`device_budget`."""
    if not (isinstance(stream, bool) or stream == "auto"):
        raise ValueError(f"stream must be 'auto', True or False, got {stream!r}.")
    if stream != "auto":
        return stream
    needed, budget = sum(t.numel() * t.element_size() for t in tensors), device_budget(device)
    if needed <= budget:
        return False
    logger.info("training data (%.2f GiB) exceed the %.2f GiB budget on %s: streaming batches from host memory",
                needed / 2**30, budget / 2**30, device)
    return True


class Rows:
    """Tensors sharing their first dimension (features, labels, ...) used on ``device``, resident there or
    streamed from host memory (see the module docstring)."""

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device, stream: bool = False) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError("Rows needs tensors with the same number of rows.")
        self.device, self.streaming = device, stream
        if stream:
            pin = device.type == "cuda"
            self.tensors = tuple(t.cpu().pin_memory() if pin and not t.is_pinned() else t.cpu() for t in tensors)
        else:
            self.tensors = tuple(t.to(device) for t in tensors)
        row_bytes = sum(t[:1].numel() * t.element_size() for t in self.tensors)
        self.chunk_rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
        self._transforms: tuple[Callable[..., tuple[torch.Tensor, ...]], ...] = ()

    def __len__(self) -> int:
        return len(self.tensors[0])

    def _arrive(self, parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.streaming:
            parts = tuple(t.to(self.device, non_blocking=True) for t in parts)
        for transform in self._transforms:
            parts = tuple(transform(*parts))
        return parts

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rows ``index`` (a CPU index tensor) of every tensor, on the device."""
        index = index if self.streaming else index.to(self.device)
        return self._arrive(tuple(t[index] for t in self.tensors))

    def chunks(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Consecutive chunks of all rows (about ``CHUNK_BYTES`` each), on the device."""
        for start in range(0, len(self), self.chunk_rows):
            yield self._arrive(tuple(t[start:start + self.chunk_rows] for t in self.tensors))

    def sum(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """``fn(*chunk)`` summed over the chunks (``fn`` must be a sum over rows, e.g. a loss with
        ``reduction="sum"``): a full pass over the data."""
        total = None
        for chunk in self.chunks():
            value = fn(*chunk)
            total = value if total is None else total + value
        return total

    def map(self, fn: Callable[..., tuple[torch.Tensor, ...]]) -> Rows:
        """Rows of ``fn(*tensors)``, a row-wise transform applied to every batch or chunk as it is used (after
        its copy when streamed), so that only one copy of the data is kept."""
        mapped = copy.copy(self)
        mapped._transforms = (*self._transforms, fn)
        return mapped


def evaluate(rows: Rows, logits_of: Callable[..., torch.Tensor]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``logits_of(*inputs)`` against the labels, where the labels are the
    last of ``rows``' tensors and the inputs the others; one pass, chunk by chunk, without gradients."""
    correct, loss = 0, 0.0
    with torch.no_grad():
        for *inputs, labels in rows.chunks():
            logits = logits_of(*inputs)
            correct += int((logits.argmax(dim=1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    return correct / len(rows), loss / len(rows)
