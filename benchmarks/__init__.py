"""Benchmarks of the project's own claims: ``python -m benchmarks [--quick]``.

Every number is a ratio of two things measured side by side in one run (see ``README.md``), so
that it carries over between machines better than a raw timing does.
"""
