"""Step 5's exploration scripts (docs/ABLATION-NOTEBOOK.md): `python -m benchmarks.explore.NAME` from the
repository root. They write and read runs/explore/."""
