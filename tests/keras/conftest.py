"""Load Triton before TensorFlow when both are installed.

Both bundle LLVM: importing Triton after TensorFlow aborts the process ("Option
'bitcode-mdindex-threshold' registered more than once"), and torch imports Triton lazily (custom
ops, torch.compile) while other tests run. Loaded first, both work in one process.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401
