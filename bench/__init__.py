"""Stage 4: benchmarks. Each script here measures and prints a table, then one JSON line."""
