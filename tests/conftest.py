import os
import tempfile

import pytest

# Triton kernels run in the interpreter on CPU-only hosts; this must precede their definition.
try:
    import torch
    _cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor's cache (~150 MB) goes to one temp dir per test run, reused within the run.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dga-inductor-"))


def _saved(builder: str, factory) -> "os.PathLike":
    """A tiny Hugging Face model + tokenizer saved once per run (tests/_eval_models.py)."""
    pytest.importorskip("transformers")
    import _eval_models

    return getattr(_eval_models, builder)(factory.mktemp(builder.replace("_", "-")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return _saved("tiny_llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return _saved("tiny_bert", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory):
    return _saved("tiny_gemma3", tmp_path_factory)
