"""Denoising an image: the flow-matching sampler, the velocity model of one request over its CFG
branches, the step-cache seam a policy plugs into, what the model reads of a request, and the
final latents decoded to pixels or previewed cheaply."""
