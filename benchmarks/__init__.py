"""Reproducible benchmarks. ``make bench`` (``python -m benchmarks``) runs them all and
writes ``docs/benchmarks.md``; ``python -m benchmarks NAME --quick`` runs one, small.

Each module here defines ``run(*, quick: bool, postgres_url: str | None) -> str``
returning a Markdown section (a ``## Title`` heading, what was measured, a table of
the numbers measured now, and the goal beside each number).
"""
