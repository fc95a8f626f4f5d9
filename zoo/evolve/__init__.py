"""Genetic hyperparameter search over the zoo's MLPs, candidates trained one per device.

The search explores the MLP family of `zoo.mlp` (neurons per layer, number of layers,
activation, optimizer). A generation of networks is trained, each network's fitness is
its validation accuracy after training with early stopping, and the next generation is
bred from the fittest: the best `retain` fraction survive, a few others survive by luck
(`random_select`), and the rest are children whose every parameter comes from one of
two parents, sometimes mutated (`mutate_chance`). `brute` trains the whole grid instead.

Candidates train concurrently, one per device, each device with a worker process
(started with the "spawn" method) that sees only its own GPU, or on a machine without
GPUs stands for one simulated device and gets its share of the CPU cores. As with any
"spawn" program, a script that starts a search must do so under
`if __name__ == "__main__":`. With a fixed seed the search gives the same ranking
whether its candidates train concurrently or one after the other.

The package, one concept per module:

- `genome`: the search space and the genetic operators (pure functions of a seed);
- `data`: the dataset check and the flattened arrays with their validation split;
- `devices`: the devices searched on (from `kerasmgpu.visible_devices()`);
- `fitness`: training one candidate, its validation accuracy;
- `pool`: `CandidatePool`, candidates trained on `kerasmgpu.DevicePool`;
- `search`: `evolve` and `brute`; `bench`: `bench_generation`;
- `report`: progress lines, the ranking table, the fitness plot; `cli`: the command line.

```
python -m zoo.evolve --dataset digits --population 8 --generations 3 --devices 2
python -m zoo.evolve --dataset digits --mode brute --nb-neurons 64,128 --nb-layers 1,2
python -m zoo.evolve --dataset digits --bench-generation --population 8 --devices 2
```
"""

from zoo.evolve.bench import bench_generation
from zoo.evolve.cli import main
from zoo.evolve.devices import resolve_devices
from zoo.evolve.genome import (
    CHOICES,
    PARAMETERS,
    breed,
    candidate_seed,
    describe,
    mutate,
    next_generation,
    random_network,
    search_space,
)
from zoo.evolve.pool import CandidatePool
from zoo.evolve.report import format_ranking, format_result, plot_history
from zoo.evolve.search import brute, evolve

__all__ = [
    "CHOICES",
    "PARAMETERS",
    "CandidatePool",
    "bench_generation",
    "breed",
    "brute",
    "candidate_seed",
    "describe",
    "evolve",
    "format_ranking",
    "format_result",
    "main",
    "mutate",
    "next_generation",
    "plot_history",
    "random_network",
    "resolve_devices",
    "search_space",
]
