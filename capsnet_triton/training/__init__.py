"""The training run behind `python -m capsnet_triton.train`, one job per module:

- `config`: the command line, the run configuration it resolves to, and its checks;
- `distributed`: this process's rank and device, and the process group under torchrun;
- `checkpoint`: the checkpoint format, atomic writes and the global RNG states;
- `log`: the JSON-lines log of a run;
- `loop`: the training loop itself.
"""
