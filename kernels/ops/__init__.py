"""Triton implementations, one op per file: the kernels and their torch.autograd.Function (the public
dispatching functions are in kernels/__init__.py; a submodule named like a public function would shadow it)."""
