"""The benchmark behind `bench.py` (see its docstring for what it measures and how to read it),
one module per job, and what scripts/gpu_check.sh adds around it: `ceilings`, the device's
measured limits, and `summary`, the one table of a check's stages."""
