"""The PyTorch C++ extension (``csrc/torch/`` around the kernel in ``csrc/core/``): the
implementation ``impl="cpp"``, and its build.

`cpp_attention` runs the no-grad CPU forward in the C++ kernel; `dga_compile.dispatch` picks it
for CPU inference when the library is built (the set-up builds it: ``dga-compile build-ext``).
The library is built per torch version (``build/torch/``), because it links against torch's
C++ ABI. ``DGA_NATIVE=0`` turns it off. The build tooling (`_cxx`) is imported only to build
or find the library, never by ``import dga_compile``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import re
import sys
import warnings
from typing import Optional

import torch
from torch import Tensor

from ._validation import causal_like, dga_applies, mask_4d, validate_config
from .config import DGAConfig
from .errors import CLIError, NativeBuildError
from .reference import dense_attention

__all__ = ["DTYPES", "add_parser", "attention", "available", "build_extension", "cpp_attention", "library_path"]

#: The translation units of the library: the prefill op and the decode kernel, each with its binding.
_FILES = (("torch", "dga_torch.cc"), ("core", "dga_cpu.cc"), ("torch", "dga_decode_torch.cc"), ("core", "dga_decode.cc"))
#: Dtypes the kernel serves (it computes in float32, the working dtype of all three).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def library_path() -> pathlib.Path:
    """Where the library for this torch version lives (it may not exist yet)."""
    from ._cxx import REPO

    tag = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return REPO / "build" / "torch" / f"libdga_torch-{tag}.so"


def build_extension(force: bool = False) -> pathlib.Path:
    """Builds the library for the installed torch unless it is newer than every source.
    Raises `NativeBuildError` with the reason on failure."""
    from torch.utils.cpp_extension import include_paths, library_paths

    from ._cxx import CSRC, CXXFLAGS, compiler, run, staged, up_to_date

    library = library_path()
    if not force and up_to_date(library, (CSRC / "torch", CSRC / "core")):
        return library
    cxx = compiler()
    libs = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with staged(library) as target:
        run([cxx, "-std=c++20", *CXXFLAGS, "-shared", *(f"-I{p}" for p in include_paths()),
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(str(CSRC / d / f) for d, f in _FILES),
             f"-L{libs}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libs}", "-o", str(target)],
            f"{cxx} (PyTorch extension)")
    return library


@functools.cache
def available() -> bool:
    """Whether the extension is built for this torch and loaded (and not turned off by DGA_NATIVE=0)."""
    if os.environ.get("DGA_NATIVE") == "0" or not library_path().is_file():
        return False
    try:
        torch.ops.load_library(str(library_path()))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"dga-compile: the C++ extension {library_path()} does not load ({err}); the PyTorch CPU "
                      f"path runs instead. Rebuild it: dga-compile build-ext --force", RuntimeWarning, stacklevel=2)
        return False
    return True


def cpp_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                  scale: Optional[float] = None, config: Optional[DGAConfig] = None, dropout_p: float = 0.0) -> Tensor:
    """DGA in the C++ kernel. Same contract as `reference_attention` for CPU tensors in `DTYPES`
    that need no gradient (the result records no autograd graph), without dropout; outside DGA's
    domain, `dense_attention`. Needs the built library (`available`)."""
    cfg = validate_config(config)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not dga_applies(q.shape[2], k.shape[2], cfg.min_seq_len):
        return dense_attention(q, k, v, attn_mask, is_causal, scale, dropout_p)
    if dropout_p:
        raise NotImplementedError(f"NYI: dropout_p={dropout_p} in the C++ kernel; use impl='blocked'")
    mask = mask_4d(attn_mask)
    return attention(q, k, v, mask, is_causal, is_causal or causal_like(mask, False), scale, cfg).to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, local_window: bool,
              scale: float, cfg, out: Optional[Tensor] = None) -> Tensor:
    """DGA of one self-attention prefill in float32: q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv];
    mask None or bool broadcastable to [B, Hq, N, N] (from `_validation.mask_4d`) -> [B, Hq, N, Dv].

    ``local_window``: the spec's window rule applies (`_validation.causal_like`). ``out``, if
    given, is written whole (tests pass a poisoned one)."""
    if not available():
        raise RuntimeError(f"the C++ extension {library_path()} is not built or is turned off by DGA_NATIVE=0; "
                           f"build it with: dga-compile build-ext")
    q, k, v = (x.float().contiguous() for x in (q, k, v))
    if out is None:
        out = q.new_empty(q.shape[:3] + v.shape[3:])
    torch.ops.dga_native.attention_cpu(q, k, v, mask, out, is_causal, local_window, scale, float(cfg.focus_ratio),
                                       cfg.group_size, cfg.num_probe, cfg.window, float(cfg.group_bias), cfg.sinks,
                                       float(cfg.expand_mass), float(cfg.expand_bias), cfg.query_block,
                                       float(cfg.expand_max))
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``dga-compile build-ext`` (registered in `dga_compile.cli.SUBCOMMANDS`)."""
    about = "Build the PyTorch C++ extension (the fast CPU path of the DGA op) for the installed torch."
    p = subparsers.add_parser("build-ext", help=about, description=about)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--soft", action="store_true", help="on failure print the reason and exit 0 (the set-up's mode)")
    p.set_defaults(handler=_run_build)
    return p


def _run_build(args: argparse.Namespace) -> int:
    try:
        path = build_extension(args.force)
    except NativeBuildError as err:
        if not args.soft:
            raise CLIError(f"PyTorch extension not built: {err}") from err
        print(f"dga-compile: PyTorch extension not built (the PyTorch CPU path runs instead): {err}", file=sys.stderr)
        return 0
    print(f"built {path}")
    return 0
