"""brats: grade gliomas (HGG vs LGG) from multi-modal MRI with a 3D ResNet.

The modules that the prediction path uses (cohort, preprocess, inference) import no torch.
"""

from brats.errors import BratsError

__all__ = ["BratsError"]
__version__ = "0.1.0"
