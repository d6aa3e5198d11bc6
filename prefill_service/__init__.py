"""The prefill service: tokenizes a prompt, prefills its CFG contexts with BAGEL's und expert,
streams the KV cache layer by layer to the diffusion service and relays its events to the caller.
`prefill_service.mock` serves the same API with synthetic KV and no language model."""
