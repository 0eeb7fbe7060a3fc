"""flashdelta: exact, fast inference kernels for the gated delta rule."""

from .api import (
    MODE_ENV,
    RECURRENT_MAX_TOKENS,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_sigmoid_gating_delta_rule_update,
    gated_delta_rule,
    validate,
)

__version__ = "0.1.0"

__all__ = [
    "MODE_ENV",
    "RECURRENT_MAX_TOKENS",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_sigmoid_gating_delta_rule_update",
    "gated_delta_rule",
    "validate",
    "__version__",
]
