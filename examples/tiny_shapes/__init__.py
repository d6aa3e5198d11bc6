"""A tiny BAGEL trained from scratch on coloured shapes, so that the demo draws what it is asked.

`data` makes the images and captions, `architecture` the small configuration and starting
weights, `autoencoder` the autoencoder's loss and latent scale, `flow` the training forward and
BAGEL's rectified-flow objective, `check` judges a generated image by its pixels, and `train`
(`python -m examples.tiny_shapes.train`) writes a checkpoint in the published format.
"""
