"""Code that runs inside Ray worker processes (or in-process with the `local` executor):
model slicing, stage workers, the lens, the coordinator and the Zarr store."""
