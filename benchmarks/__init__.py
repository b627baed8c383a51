"""The benchmarks and ablations behind docs/ (not part of the installed moeprune package).

Run each as a module from the repository root, with moeprune installed (`make install`), e.g.

    .venv/bin/python -m benchmarks.compare --help
    .venv/bin/python -m benchmarks.explore.probe demo-fine

docs/data/README.md lists every file they wrote and the command that wrote it.
"""
