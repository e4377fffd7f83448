"""fastbert's benchmark suites: one ``bench_<stem>.py`` per op and ``bench_model.py``.
Runnable with ``pytest benchmarks/ --benchmark-only`` and from ``fastbert bench``."""
