"""Tokenizers: load one from a directory, or train a small Gemma-style one offline.

The real Gemma tokenizer cannot be downloaded here, so small models use a byte-level BPE
trained with the ``tokenizers`` library. It carries Gemma's special tokens at Gemma's ids for
pad/eos/bos/unk (0/1/2/3) and the same chat markers, so the text side runs the same code path
as real Gemma. Byte-level BPE round-trips any Unicode text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

# A few sentences so a demo tokenizer knows common words; real recipes train on their data.
DEMO_CORPUS = [
    "What happens in this video?",
    "Describe the video in detail.",
    "Which ball went into the pocket?",
    "The red ball went into the top-left pocket.",
    "How many balls are left on the table?",
    "There are three balls left on the table.",
    "Did the cue ball hit a cushion? Yes, it hit two cushions.",
    "A white ball moves to the right and stops near the blue ball.",
    "In which of the two clips was a ball pocketed? In the first clip.",
]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Gemma's special tokens (ids 0-5)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )


def load_tokenizer(path: str | Path):
    """Load a tokenizer saved in a local directory (never reaches for a hub)."""
    options = {}
    config = Path(path) / "config.json"
    try:
        if json.loads(config.read_text()).get("format") == "hilight":
            # a HiLight checkpoint: its tokenizer files name their class, and the model_type
            # "hilight" there (for vLLM) is one transformers does not know and would warn about
            options["config"] = PretrainedConfig()
    except (OSError, ValueError, AttributeError):
        pass
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **options)
