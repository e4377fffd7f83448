"""fastbert's own kernels, one module per op: Triton for the row-wise ops and attention,
and the Python side of the C++/CUDA embedding extension. Imported only by ``fastbert.ops``."""
