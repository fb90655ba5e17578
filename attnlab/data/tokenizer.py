"""The text tokenizer: a Hugging Face `tokenizers` model (word level for the built-in grammar, BPE for
the user's text) trained on the training split, saved as its JSON file, and fixed-length id batches
padded with [PAD] for the token backbone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from attnlab.errors import ConfigError, DataError
from attnlab.io import write_text

PAD, MASK, UNK, BOS = "[PAD]", "[MASK]", "[UNK]", "[BOS]"
SPECIALS = (PAD, MASK, UNK, BOS)  # ids 0, 1, 2, 3
KINDS = ("word", "bpe")


class TextTokenizer:
    """Fixed-length token ids for one text set.

    Args:
        tok: the `tokenizers.Tokenizer` (its first ids are SPECIALS, in order).
        length: ids per sequence; text shorter is padded with [PAD], longer is refused.
    """

    def __init__(self, tok: Tokenizer, length: int):
        self.tok, self.length = tok, int(length)
        ids = [tok.token_to_id(s) for s in SPECIALS]
        if ids != list(range(len(SPECIALS))):
            raise DataError(f"tokenizer: special tokens {SPECIALS} must be ids 0-3, got {ids}")
        self.pad_id, self.mask_id, self.unk_id, self.bos_id = ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, texts: Sequence[str], where: str = "text") -> Tensor:
        """(N, length) long ids, [PAD] after each text.

        Raises:
            DataError: a text longer than `length` tokens (naming it and `where` it came from).
        """
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(list(texts))):
            if len(enc.ids) > self.length:
                raise DataError(
                    f"{where} item {i}: {len(enc.ids)} tokens, more than the sequence length "
                    f"{self.length} ({texts[i][:60]!r})"
                )
            out[i, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
        return out

    def decode(self, ids: Tensor | Sequence[int]) -> tuple[str, bool]:
        """The text of one id sequence, and whether it is well formed: its content a prefix with only
        [PAD] after it, and no [MASK], [UNK] or [BOS] in it."""
        ids = [int(i) for i in ids]
        n = ids.index(self.pad_id) if self.pad_id in ids else len(ids)
        body, tail = ids[:n], ids[n:]
        ok = all(i == self.pad_id for i in tail) and not {self.mask_id, self.unk_id, self.bos_id} & set(body)
        return self.tok.decode([i for i in body if i >= len(SPECIALS)]), ok

    def to_dict(self) -> dict:
        return {"length": self.length, "vocab_size": self.vocab_size}

    def save(self, path: str | Path) -> Path:
        """The tokenizer as one JSON file (`tokenizers`' own format), written whole; the sequence
        length goes in the model config."""
        return write_text(path, self.tok.to_str(pretty=True))

    @staticmethod
    def load(path: str | Path, length: int) -> TextTokenizer:
        """Raises DataError when the file is missing or not a tokenizer JSON."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise DataError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None
        return TextTokenizer(tok, length)


def train_tokenizer(
    texts: Sequence[str], kind: str = "word", vocab_size: int = 1000, length: int = 0
) -> TextTokenizer:
    """Train a tokenizer on `texts`.

    Args:
        texts: the training split.
        kind: "word" (one id per word or punctuation mark; the grammar's words are all seen) or
            "bpe" (byte-pair merges up to `vocab_size`, for open text).
        vocab_size: BPE only: the vocabulary size, specials included.
        length: ids per sequence; 0 = the longest training text's.
    Raises:
        ConfigError: an unknown kind or no texts.
    """
    if kind not in KINDS:
        raise ConfigError(f"data.tokenizer={kind!r} is not allowed: expected one of {', '.join(KINDS)}")
    if not texts:
        raise ConfigError("data: no texts to train the tokenizer on")
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1)
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:  # byte-level BPE (GPT-2's): any text encodes, and decoding restores its spaces
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            special_tokens=list(SPECIALS),
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(texts), trainer=trainer)
    longest = max(len(e.ids) for e in tok.encode_batch(list(texts)))
    return TextTokenizer(tok, length or longest)
