"""BAGEL-7B-MoT text-to-image in plain PyTorch: configs, checkpoint loading, the MoT language
model, the FLUX autoencoder, the flow-matching sampler and the in-process reference pipeline.

Nothing here knows about gRPC or parallelism; attention goes through `bagel.attention`.
"""
