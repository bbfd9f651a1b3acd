"""The benchmark: distlens against plain generation, the paper's naive baseline and its peers.

`python -m pipelines.bench` measures the CPU suite (Hydra, `conf/bench.yaml`);
`python -m pipelines.bench.gpu --out DIR` the GPU path. Both run the same runner per system."""
