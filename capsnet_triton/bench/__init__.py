"""The benchmark behind `bench.py` (see its docstring for what it measures and how to read it),
one module per job, and `ceilings`, the device's measured limits for the GPU check."""
