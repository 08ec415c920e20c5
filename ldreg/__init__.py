"""LDReg: local intrinsic dimensionality estimators, the LDReg regularizer, and an
SSL pretraining engine (Huang et al., "LDReg: Local Dimensionality Regularized
Self-Supervised Learning", ICLR 2024).

Importing the package imports nothing heavy: ``ldreg.spec`` is safe for the API,
which must never import torch.
"""

__version__ = "0.1.0"
