"""fastprune: fast neural-network pruning for PyTorch.

Native kernels (C++, CUDA) registered as ``torch.ops.fastprune.*``, typed wrappers in
:mod:`fastprune.ops`, their plain-PyTorch twins in :mod:`fastprune.reference`.
"""

from fastprune import ops, reference
from fastprune.fisher import FisherInverse

__version__ = "0.1.0"

__all__ = ["FisherInverse", "ops", "reference", "__version__"]
