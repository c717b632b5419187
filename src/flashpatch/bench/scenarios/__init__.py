"""The benchmark scenarios; each `run(harness)` adds its records to the harness."""
