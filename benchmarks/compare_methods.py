"""The method comparison: `qaa bench` as a script (same options, same code: `workers.bench`).

    python benchmarks/compare_methods.py                 # the published table, ~90 min on 2 CPU cores
    python benchmarks/compare_methods.py --quick --out /tmp/bench   # a few minutes, tiny model

Writes benchmarks/results/methods.json, methods_budget.json, methods.md and loss_curves.png.
"""

from __future__ import annotations

import typer

from workers.cli import bench

if __name__ == "__main__":
    typer.run(bench)
