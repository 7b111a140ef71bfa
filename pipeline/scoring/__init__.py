"""The scoring core: regions, views, text vectors and the five methods on encoder callables (torch only, no I/O)."""
