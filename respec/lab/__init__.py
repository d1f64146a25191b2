"""The lab: tools that run and measure respec, apart from the system they measure.

  experiment.py  python -m respec.lab.experiment: the side-by-side GRPO runs (baseline, naive SD, ReSpec ladder)
  report.py      python -m respec.lab.report: an experiment's tables and plots
  plot.py        python -m respec.lab.plot: one run's (or several runs') plots
  sweep.py       generate.py --sweep: fixed k against the adaptive policy and the cost model
  gpu_check.py   python -m respec.lab.gpu_check: the prepared check of the CUDA path
  host_overhead.py  python -m respec.lab.host_overhead: the engine's host work and host reads per step
  fake_cuda.py   fake CUDA on a CPU-only machine (the CUDA path's devices, shapes and host reads)
"""
