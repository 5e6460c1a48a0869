"""ddjax: dataset distillation in JAX.

Stages (each a module with plain functions on arrays, and a CLI command):

* :mod:`ddjax.data` -- datasets as in-memory records, normalisation, ZCA.
* :mod:`ddjax.models` -- ConvNet, ResNet-18, VGG-11, AlexNet (Flax Linen), PyTorch layout.
* :mod:`ddjax.augment` -- differentiable siamese augmentation (DSA), crop+flip.
* :mod:`ddjax.train` -- one pure train step, epochs, pools of models trained by ``vmap``.
* :mod:`ddjax.evaluate` -- the published evaluation protocols (MTT, DSA).
* :mod:`ddjax.select` -- coreset baselines (random, herding, k-center).
* :mod:`ddjax.synset` -- the synthetic-set format every method returns.
"""

from ddjax.errors import DDJaxError

__version__ = "0.1.0"
__all__ = ["DDJaxError", "__version__"]
