"""The training run behind `python -m capsnet_triton.train`, one job per module:

- `config`: the command line, the run configuration it resolves to, and its checks;
- `distributed`: this process's rank and device, and the process group under torchrun;
- `checkpoint`: the checkpoint format, atomic writes, the run folder's lock and the global RNG states;
- `log`: the JSON-lines log of a run;
- `errors`: how the commands report what went wrong (one line, exit status 1 or 2);
- `starting`: a Ctrl-C before a command's work begins (torch still loading) said in one line;
- `allocator`: on Linux, the C allocator told to keep freed memory (faster steps on a CPU);
- `loop`: the training loop itself.
"""
