"""Performance measurements, each against a baseline measured in the same run: ``python -m benchmarks``
runs them all and prints one table; ``python benchmarks/bench_NAME.py`` runs one at its full sizes."""
