"""flashdelta: exact, fast inference kernels for the gated delta rule."""

from .api import (
    MODE_ENV,
    RECURRENT_MAX_TOKENS,
    RECURRENT_MAX_TOKENS_FP32,
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_sigmoid_gating_delta_rule_update,
    gated_delta_rule,
    recurrent_max_tokens,
    validate,
)

__version__ = "0.1.0"

__all__ = [
    "MODE_ENV",
    "RECURRENT_MAX_TOKENS",
    "RECURRENT_MAX_TOKENS_FP32",
    "chunk_gated_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_sigmoid_gating_delta_rule_update",
    "gated_delta_rule",
    "recurrent_max_tokens",
    "validate",
    "__version__",
]
