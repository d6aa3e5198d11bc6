"""One module per step-cache policy; `step_cache.registry` imports every one of them."""
