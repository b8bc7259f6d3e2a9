"""Failure handling: exit codes, distributed faults (timeouts, killed ranks), the preflight checks."""
