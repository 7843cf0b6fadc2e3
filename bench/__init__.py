"""vmop's benchmarks: `make bench` (`python -m bench`) runs them all on the real test bed; see bench/README.md.

Benchmarks, not tests: nothing under tests/ imports them and no figure fails a build, because timings on a
shared 2-core machine vary from run to run.
"""
