"""Feature math: pure polars functions, declared once in the registry."""
