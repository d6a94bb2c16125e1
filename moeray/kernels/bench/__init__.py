"""`moeray bench kernels`: every kernel timed on the GPU against ceilings measured in the same run.

common (timers, ceilings, the result record), fp8 / moe / mla (one module per kernel family),
records (the flat `results` records of every section) and runner (the sections, the command line,
the tables).
"""

from moeray.kernels.bench.records import flat_results
from moeray.kernels.bench.runner import SECTIONS, main

__all__ = ["SECTIONS", "flat_results", "main"]
