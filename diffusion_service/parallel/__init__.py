"""Sequence parallelism for the diffusion ranks: topology, latent sharding, SP attention."""
