"""zoo: models, data and training entry points for kerasmgpu.

Public names:
    mlp, mnist_mlp, cifar10_mlp, cifar10_convnet, cifar10_recipe   (zoo.models)
    get(name, **kwargs), names()                                      (the model registry)
    datasets                                                          (zoo.datasets.load, ...)
    evolve, brute                                                     (zoo.evolve, genetic search)

Example:

```python
import zoo

model = zoo.get("mnist_mlp")
(x, y), (x_test, y_test) = zoo.datasets.load("digits", flatten=True)
```
"""

from zoo.models import cifar10_mlp, mlp, mnist_mlp

__all__ = ["cifar10_mlp", "mlp", "mnist_mlp"]
