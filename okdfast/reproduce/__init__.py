"""Reproduce the paper's tables: ``python -m okdfast.reproduce --table NAME`` (see :mod:`okdfast.reproduce.cli`).

One responsibility per file: ``tables`` (the data file of the paper's tables), ``plan`` (the runs, their order,
commands and status), ``estimate`` (measured speed -> time), ``runner`` (the training processes, the time budget),
``results`` (results.md / results.csv / the README section), ``cli`` (the command line).
"""

from okdfast.reproduce.cli import main
from okdfast.reproduce.tables import Catalog, Table, load_catalog

__all__ = ["Catalog", "Table", "load_catalog", "main"]
