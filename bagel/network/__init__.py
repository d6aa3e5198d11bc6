"""BAGEL's modules in plain PyTorch, with the checkpoint's key names: the Qwen2
Mixture-of-Transformers language model and its layers, the attention seam, the SigLIP-NaViT image
encoder, the FLUX autoencoder, the FP8 linear layers, the config read from the checkpoint, and
the tensors the model takes (a prefilled `ContextKV`, latent tokens)."""
