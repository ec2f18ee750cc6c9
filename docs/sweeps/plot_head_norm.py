"""Issue 25's figures: a committed sweep's full-budget curves (each family at its best lr), with
LET-Transformer's at its new head-norm gain (3 seeds, from <sweep>_head_norm/gain<g>/) in place of the
gain-1 ones. Written into docs/sweeps/<sweep>_head_norm/val_loss[_flops]_vs_families.png.

    PYTHONPATH=. python docs/sweeps/plot_head_norm.py char_tinyshakespeare 0.3 char_LETTransformer
    PYTHONPATH=. python docs/sweeps/plot_head_norm.py bpe_tinyshakespeare 0.1 tiny_LETTransformer
"""

import dataclasses
import sys
from pathlib import Path

from letngpt.compare.report import load_sweep, plot

sweep, gain, preset = sys.argv[1:4]
root = Path("docs/sweeps")
details, groups = load_sweep(root / sweep)
steps = max(g.steps for g in groups)
best = [g for g in groups if g.steps == steps and g.lr == details["best"][g.preset]["lr"] and g.preset != preset]
new_details, new_groups = load_sweep(root / f"{sweep}_head_norm" / f"gain{gain}")
label = f"{preset} gain {gain}"
(g,) = [g for g in new_groups if g.steps == steps and len(g.runs) == 3]
best.append(dataclasses.replace(g, preset=label))
costs = dict(details["costs"]) | {label: new_details["costs"][preset]}
out = root / f"{sweep}_head_norm"
plot(best, {}, costs, details["target_val_loss"], {"png": out / "val_loss_vs_families.png",
                                                    "flops_png": out / "val_loss_flops_vs_families.png"},
     f"{sweep}: {steps} steps, best lr per family, {preset} at head-norm gain {gain} (issue 25)")
print("wrote", out)
