"""Triton kernels of pyfast (imported as `pyfast.kernels`): the bottom layer, importing nothing from pyfast."""
