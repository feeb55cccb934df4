"""Command-line tools (``python tools/<tool>.py`` or ``python -m tools.<tool>``).

A package so that tests and the benchmark's in-process runner import them as ``tools.<tool>``.
"""
