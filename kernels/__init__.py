"""Triton kernels and their launchers, one kernel per file. No autograd, no nn.Module here.

Installed as ``lumoe_engine.kernels``. Model code never imports this package: it goes through ``lumoe_engine.ops``.
"""
