"""The data stages, in the order rows meet them: sources, decode (CPU or device), sink; and the vocabulary read.

No Ray here: the run package drives these stages on its workers.
"""
