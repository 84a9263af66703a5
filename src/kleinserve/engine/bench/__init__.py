"""``kleinserve bench``: kleinserve against diffusers' pipelines on the same weights, case by case.

cases.py holds the workloads and how each side runs them, measure.py the clocks (stage hooks, FLOPs,
matmul peak, peak memory), runner.py the warm-up and alternating timed runs, report.py the table and
the JSON. The numbers are ratios on one machine; benchmarks/README.md keeps the latest table.
"""
