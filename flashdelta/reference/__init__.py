"""Pure-PyTorch paths: the token loop (the definition and, in float64, the oracle) and the chunked form."""

from .chunk import CHUNK_SIZE, chunk_dense, chunk_gated_delta_rule
from .recurrent import recurrent_dense, recurrent_gated_delta_rule

__all__ = ["CHUNK_SIZE", "chunk_dense", "chunk_gated_delta_rule", "recurrent_dense", "recurrent_gated_delta_rule"]
