"""Triton implementations, one op per file: the kernels and their torch.autograd.Function (the public
dispatching functions are in kernels/dispatch.py)."""
