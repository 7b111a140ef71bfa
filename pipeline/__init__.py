"""lgca-label: batch zero-shot image labelling with LGCA on Ray Data.

Importing the package does nothing but define its version; the Python API lives in `pipeline.run.labeler`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lgca-label")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
