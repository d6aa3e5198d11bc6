"""The fast paths of a forward, each with an eager equivalent it matches: Triton kernels for
the decoder's elementwise chains and the FP8 quantizers, CUDA-graph replay, and the marker
tokens' second CUDA stream. They know nothing of BAGEL's modules. `fp8_attention` (an FP8 flash
attention returning its LSE, with its plain-PyTorch reference) is measured by
`benchmarks.fp8_attention` and not called by the model."""
