"""Examples of a model and a data loader of the user's own (examples/README.md)."""
