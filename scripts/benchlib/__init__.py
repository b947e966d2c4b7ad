"""The bench of scripts/bench.py (its command line), in modules that import one another this way:

- workloads: the preloaded images of each model family, and our engine on them;
- references: the seed-style TTA loop, ttach's d4 and torch.func-stacked ensembles;
- rows: the rows compared (workloads, references);
- measure: interleaved timing, the other load, the batch-size sweep (workloads, rows);
- output: machine summary, table, targets, CSV and plot (workloads, rows).
"""
