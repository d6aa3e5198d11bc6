"""Text in and out: the Qwen2 tokenizer as BAGEL frames prompts, autoregressive decoding with the
und expert and the LM head (continuous batching), and decoded tokens back to text as it grows."""
