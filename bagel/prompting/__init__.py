"""What the model is prompted with: the CFG contexts of text-to-image, image editing and "think",
the conversation of an understanding request, input images prepared for the VAE and the ViT, all
as segments appended to the KV cache by a prefill."""
