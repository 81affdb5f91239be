"""No duplicate generation: idempotency keys and single-flight coalescing."""
