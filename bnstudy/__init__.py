"""bnstudy: how does batch normalization help optimization? A faithful, fast reproduction."""
from bnstudy.models import VGG, DeepLinear
from bnstudy.norms import NoiseConfig, make_norm, resample_noise

__version__ = "0.1.0"
__all__ = ["VGG", "DeepLinear", "NoiseConfig", "make_norm", "resample_noise"]
