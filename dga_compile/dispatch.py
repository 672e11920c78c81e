"""The one dispatch table of ``torch.ops.dga.attention``: which implementation runs a call.

`TABLE` lists the implementations in the order ``impl="auto"`` tries them; each entry says,
for one call, why it cannot take it (``applies`` returns the reason, or None when it can).
``"auto"`` runs the first entry that applies: Triton on CUDA, the C++ kernel for CPU
inference, else the blocked PyTorch path, which takes every call (so ``"reference"``, last,
runs only when named). A named implementation that does not apply falls back to what
``"auto"`` picks: the same result up to rounding, announced once per reason by a warning
that starts ``NYI:`` and says what to do (and logged each time on ``dga_compile.dispatch``).

Every implementation has the signature of `dga_compile.reference.reference_attention`:
``fn(q, k, v, attn_mask, is_causal, scale, config, dropout_p) -> Tensor``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from . import _extension
from .blocked import blocked_attention
from .reference import reference_attention

if TYPE_CHECKING:
    from .ops import OpCall

__all__ = ["TABLE", "Choice", "Entry", "choose", "recording", "run"]

logger = logging.getLogger(__name__)


class Entry(NamedTuple):
    """One implementation: its `DGAConfig.impl` name, when it applies, and the function."""

    name: str
    applies: Callable[["OpCall"], Optional[str]]   # None, or why not (the NYI reason and what to do)
    fn: Callable[..., Tensor]


def _needs_grad(call: "OpCall") -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (call.q, call.k, call.v))


def _triton_applies(call: "OpCall") -> Optional[str]:
    """CUDA (or the interpreter, when named), Triton installed, fp16/bf16/fp32, head dims ≤ 256, no dropout,
    a mask that is causal × key padding."""
    from . import kernels
    from .kernels.streams import plan_mask

    q, v = call.q, call.v
    # The interpreter (tests) runs CPU tensors, but only for calls that name impl="triton".
    if q.device.type != "cuda" and not (kernels.interpreting() and call.config.impl == "triton"):
        return f"tensors on {q.device} (the Triton kernels need CUDA)"
    if not kernels.has_triton():
        return "Triton is not installed (pip install triton)"
    if q.dtype not in kernels.DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16, float32)"
    if max(q.shape[-1], v.shape[-1]) > kernels.MAX_HEAD_DIM:
        return f"head dims D={q.shape[-1]}, Dv={v.shape[-1]} above {kernels.MAX_HEAD_DIM} in the Triton kernels"
    if call.dropout_p > 0:
        return f"dropout_p={call.dropout_p} (the Triton kernels have no dropout)"
    return plan_mask(call.attn_mask, call.is_causal, q.shape[0], q.shape[2], call.k.shape[2]).reason or None


def _cpp_applies(call: "OpCall") -> Optional[str]:
    """CPU, fp32/fp16/bf16, no dropout, no autograd graph to record, the library built."""
    q = call.q
    if q.device.type != "cpu":
        return f"tensors on {q.device} (the C++ kernel runs on the CPU)"
    if q.dtype not in _extension.DTYPES:
        return f"dtype {q.dtype} (the C++ kernel takes float32, float16, bfloat16)"
    if call.dropout_p > 0:
        return f"dropout_p={call.dropout_p} (the C++ kernel has no dropout)"
    if _needs_grad(call):
        return "inputs that need gradients (the C++ kernel has no backward)"
    if not _extension.available():
        return "the C++ extension is not built or is turned off by DGA_NATIVE=0 (build it: dga-compile build-ext)"
    return None


def _always(call: "OpCall") -> Optional[str]:
    return None


def _triton(*args, **kwargs) -> Tensor:
    from .kernels import triton_attention
    return triton_attention(*args, **kwargs)


#: The implementations, in the order ``impl="auto"`` tries them.
TABLE = (
    Entry("triton", _triton_applies, _triton),
    Entry("cpp", _cpp_applies, _extension.cpp_attention),
    Entry("blocked", _always, blocked_attention),
    Entry("reference", _always, reference_attention),
)
_BY_NAME = {e.name: e for e in TABLE}


class Choice(NamedTuple):
    """The entry that runs a call, and why the named one did not (None when it did, or for "auto")."""

    entry: Entry
    fallback_reason: Optional[str] = None


def choose(call: "OpCall") -> Choice:
    """The entry that runs ``call`` (``call.config.impl`` names one, or "auto")."""
    impl = call.config.impl
    if impl != "auto":
        reason = _BY_NAME[impl].applies(call)
        if reason is None:
            return Choice(_BY_NAME[impl])
    else:
        reason = None
    entry = next(e for e in TABLE if e.applies(call) is None)
    return Choice(entry, reason)


_warned: set[tuple[str, str]] = set()
_recorders: list[list[str]] = []


def run(call: "OpCall") -> Tensor:
    """Runs ``call`` with the entry `choose` picks (warning once per reason when it falls back)."""
    entry, reason = choose(call)
    if reason is not None:
        _announce_fallback(call.config.impl, reason, entry.name)
    for names in _recorders:
        names.append(entry.name)
    return entry.fn(call.q, call.k, call.v, call.attn_mask, call.is_causal, call.scale, call.config, call.dropout_p)


def _announce_fallback(impl: str, reason: str, ran: str) -> None:
    message = (f"dga_compile: NYI: impl={impl!r} cannot run this call: {reason}; running impl={ran!r} instead "
               f"(the same DGA, up to rounding). Pass impl='auto' to choose silently.")
    logger.info(message)
    if (impl, reason) not in _warned:
        _warned.add((impl, reason))
        warnings.warn(message + " Shown once per reason.", RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def recording() -> Iterator[list[str]]:
    """Collects the name of the entry each op call runs inside the block (tests assert on it).

    >>> with recording() as ran:
    ...     dynamic_group_attention(q, k, v, config=DGAConfig(impl="triton"))
    >>> ran
    ['triton']
    """
    names: list[str] = []
    _recorders.append(names)
    try:
        yield names
    finally:
        _recorders.remove(names)
