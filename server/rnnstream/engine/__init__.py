"""The inference engine: batched model steps, per-model schedulers and session operations."""
