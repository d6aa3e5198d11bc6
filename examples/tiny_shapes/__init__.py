"""A tiny BAGEL trained from scratch on coloured shapes, so that the demo draws what it is asked
and edits it as told.

`data` makes the images, captions and edit pairs, `architecture` the small configuration and
starting weights, `autoencoder` the autoencoder's loss and latent scale, `flow` the training
forward and BAGEL's rectified-flow objective, `edit_flow` the same for an edit's three contexts,
`edit_inputs` how an input image reaches the model, `check` judges a generated or edited image by
its pixels, `train` (`python -m examples.tiny_shapes.train`) writes a checkpoint in the published
format, and `train_edit` teaches it to edit.
"""
