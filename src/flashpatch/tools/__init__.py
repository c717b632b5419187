"""Tools around the product: `python -m flashpatch doctor`, the pytest plugin, and the command lines' helpers."""
