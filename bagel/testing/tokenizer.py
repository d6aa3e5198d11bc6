"""A tiny Qwen2-compatible tokenizer for the random checkpoints: a byte-level BPE trained
locally on a fixed corpus, written as the files `bagel.text.tokenizer.load_tokenizer` reads."""

from __future__ import annotations

import json
from pathlib import Path

from bagel.text.tokenizer import PROMPT_END_TOKEN, SPECIAL_TOKENS

# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer builds).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# A small English corpus for the tiny tokenizer: prompt-like sentences so that common words
# become single tokens. Fixed text, so the trained vocabulary is the same on every machine.
TINY_CORPUS: tuple[str, ...] = (
    "A photo of a red apple on a wooden table next to a glass of water.",
    "A small cat sleeping on a blue sofa in a bright living room.",
    "A dog running across a green field under a clear summer sky.",
    "An old lighthouse standing on a rocky coast at sunset, with waves crashing below.",
    "A bowl of hot soup with bread on the side, photographed from above.",
    "A futuristic city at night with neon lights reflected in the wet streets.",
    "A watercolor painting of mountains covered in snow and a quiet lake.",
    "Two children playing with a yellow kite on the beach in the afternoon.",
    "A close-up portrait of an elderly man with a gray beard and kind eyes.",
    "A bicycle leaning against a brick wall beside a door painted green.",
    "A cup of coffee and an open book on a desk by the window.",
    "A forest path in autumn, the ground covered in orange and brown leaves.",
    "A white horse standing in a meadow full of purple flowers.",
    "A robot reading a newspaper in a cafe, digital art, highly detailed.",
    "The moon rising over a desert with tall cactus plants in the foreground.",
    "A sailing boat on a calm sea, soft morning light, oil painting.",
    "A bird with bright feathers sitting on a branch in the rain.",
    "A plate of fresh fruit: oranges, grapes, bananas and strawberries.",
    "A train crossing a stone bridge over a deep valley in the mountains.",
    "A cozy cabin in the woods with smoke rising from the chimney in winter.",
    "An astronaut riding a horse on the surface of Mars, cinematic lighting.",
    "A vase of sunflowers on a kitchen table, simple and clean composition.",
    "Three friends laughing together around a fire at the camp under the stars.",
    "A street market full of people, colorful umbrellas and baskets of vegetables.",
    "A black and white photograph of a quiet street in an old European town.",
    "A giant tree with glowing leaves in a magical forest, fantasy illustration.",
    "A small wooden house by the river, with a garden of roses and tulips.",
    "A fox looking at the camera in the snow, wildlife photography.",
    "An empty road through the hills toward the horizon, golden hour.",
    "A chef cooking pasta in a busy restaurant kitchen with steam in the air.",
    "It's a sunny day; we're going to the park, and they'll bring the ball.",
    "The quick brown fox jumps over the lazy dog 12 times, then 345 more!",
    "Draw a simple logo: a circle, a square and a triangle in black ink.",
    'She said: "Look at the sky!" and he pointed at the rainbow (very bright).',
    "High resolution, sharp focus, studio lighting, 4k, trending on art sites.",
)


def write_tiny_tokenizer(directory: str | Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE on `TINY_CORPUS` and write Qwen2-compatible tokenizer files
    (`tokenizer.json`, `tokenizer_config.json`, `vocab.json`, `merges.txt`) into `directory`.

    `vocab_size` includes the special tokens, which get the last ids. Returns the number of
    tokens actually written (smaller than asked if the corpus runs out of merges)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(byte_alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is below the byte alphabet plus specials ({minimum})"
        )

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # The same pipeline as Qwen2's tokenizer.json, so transformers treats it like the real one.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=1,
        show_progress=False,
        initial_alphabet=sorted(byte_alphabet),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(TINY_CORPUS, trainer=trainer, length=len(TINY_CORPUS))
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for t in SPECIAL_TOKENS
        ]
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"), pretty=True)
    tokenizer.model.save(str(directory / "."))  # vocab.json and merges.txt, as Qwen2 ships them
    special_ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(special_ids[t]): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [
            t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", PROMPT_END_TOKEN)
        ],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": PROMPT_END_TOKEN,
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size(with_added_tokens=True)
