"""BAGEL-7B-MoT in plain PyTorch, grouped by role; each layer imports only those above it.

- `bagel.kernels`: the fast paths of a forward (Triton kernels, CUDA graphs, a second stream);
- `bagel.network`: the modules (the MoT language model, its layers and attention seam, the ViT,
  the autoencoder, FP8 linear layers), their config and the tensors they take (`ContextKV`);
- `bagel.checkpoints`: reading, checking and describing the published checkpoint files;
- `bagel.text`: the tokenizer, autoregressive text decoding and streamed detokenizing;
- `bagel.diffusion`: the flow-matching sampler, the velocity model of a request, the step-cache
  seam, and latents back to pixels and previews;
- `bagel.prompting`: the CFG contexts (text, images, conversations) as segments, and their prefill;
- `bagel.pipeline`: the whole generation in one process, the reference the services match;
- `bagel.envs`, `bagel.devices`: the environment switches and the device facts every layer reads;
- `bagel.testing`: random checkpoints in the published format (`python -m bagel.testing.tiny`),
  for tests, examples and benchmarks; no product module imports it.

Nothing here knows about gRPC or parallelism; attention goes through `bagel.network.attention`.
"""
