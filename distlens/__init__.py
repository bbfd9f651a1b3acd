"""distlens from Python: `import distlens`, then `distlens.lens(prompts)` returns the run's lens
store as an xarray Dataset. The same runs as `python -m pipelines.lens|steer` and `distlens view`.

    lens(prompts, out, ...)                 generate and record the lens of every layer
    open(path)                              an existing store as a Dataset
    top1(ds, prompt)                        one row's top-1 lens tokens, [layer, position]
    steering_vector(positive, negative, layer, ...)   a vector from paired texts
    sweep(prompts, vector, coefficients, out, ...)    steered generation at each coefficient
    trace(pairs, out, ...)                  a causal trace: every cell of each pair, restored
    view(ds_or_path, out=None)              the self-contained viewer page
"""

from distlens.api import lens, open, steering_vector, sweep, top1, trace, view

__all__ = ["lens", "open", "steering_vector", "sweep", "top1", "trace", "view"]
