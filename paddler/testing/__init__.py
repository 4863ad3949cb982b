"""Test helpers: a deterministic fake engine and a harness for real processes.

The fake engine exists for tests and benchmarks of the broker and HTTP layers only;
``paddler agent`` never runs on it.
"""
