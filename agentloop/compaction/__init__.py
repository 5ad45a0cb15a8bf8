"""Attention Matching compaction: reference queries, the batched solver, and span compaction of a live cache."""

from agentloop.compaction.solver import (
                                         METHODS,
                                         CompactResult,
                                         Method,
                                         attend,
                                         attention_logits,
                                         compact,
                                         evaluate,
                                         fit_beta,
                                         fit_values,
                                         select_highest_attention,
                                         select_omp,
                                         shifted_exp,
)

__all__ = [
    "METHODS", "CompactResult", "Method", "attend", "attention_logits", "compact", "evaluate", "fit_beta",
    "fit_values", "select_highest_attention", "select_omp", "shifted_exp",
]
