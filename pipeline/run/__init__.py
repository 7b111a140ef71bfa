"""Running the method: the Ray labelling job (the only Ray code), the in-process Python API, cluster submission."""
