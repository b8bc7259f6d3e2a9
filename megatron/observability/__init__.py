"""Observability: the log line, metrics, TensorBoard/W&B, timers, MFU, profiling, optimizer and weight statistics, the numerics guard."""
