"""`moeray bench kernels`: every kernel timed on the GPU against ceilings measured in the same run.

common (timers, ceilings, the result record), fp8 / moe / mla (one module per kernel family), and
runner (the sections, the command line, the tables and the flat `results` records).
"""

from moeray.kernels.bench.runner import SECTIONS, flat_results, main

__all__ = ["SECTIONS", "flat_results", "main"]
