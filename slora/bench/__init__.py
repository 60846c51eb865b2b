"""Benchmarks: S-LoRA's workloads against slora and its baselines, with reports and plots.

`workload` makes the requests, `session` runs them on each system (`driver` for slora engines,
`peft_baseline`, `merged_swap`), `metrics` and `roofline` measure, `report` writes the results;
`cli` is `slora bench run | trace`, and `kernels` is `slora bench kernels`. Nothing heavy is
imported here, so that the command line starts fast.
"""

# Every system `slora bench run --systems` knows (see `systems.py` for what each one is).
SYSTEMS = ("slora", "base-only", "slora-split-pool", "slora-bmm", "slora-padded", "peft", "merged-swap")
