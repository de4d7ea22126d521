"""lmbatch's benchmarks: ``make bench`` (``python -m tests.benchmarks [ID ...]``).

Every figure is a ratio against a baseline measured in the same run, so a noisy or busy machine moves both
sides together. Nothing here is collected by pytest (no ``test_*`` modules) and nothing fails on speed.
"""
