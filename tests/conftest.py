"""Shared pytest configuration: the repo root on sys.path, the `slow` marker."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-second end-to-end tests (still run in CI)")
