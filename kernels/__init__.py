"""Triton kernels for DGA on CUDA (installed as ``dga_compile.kernels``)."""

__all__ = ["available"]


def available() -> bool:
    """Whether the Triton kernels can run DGA on CUDA tensors here."""
    return False
