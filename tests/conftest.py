import os
import tempfile

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
