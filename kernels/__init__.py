"""Triton kernels of pyfast (imported as `pyfast.kernels`): the bottom layer; from pyfast it imports only
the leaf modules `pyfast._flags` and `pyfast._shapes`, which import nothing of pyfast."""
