"""Triton kernels (NVIDIA GPUs; the CPU via TRITON_INTERPRET=1). Not implemented yet."""

import triton  # noqa: F401  -- ImportError here tells the registry the backend is unavailable

IMPLEMENTED = False
