"""Extract stage: run a model once over a dataset and write per-layer activations to a store."""
