"""Sequence parallelism for the diffusion ranks: the layout config, topology, latent sharding, and
the SP attention variants by name."""
