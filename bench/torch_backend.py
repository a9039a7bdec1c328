"""The PyTorch reference backend for a Hugging Face checkpoint directory, with the runtime's evaluation primitives.

Only the bench uses it, and only when torch and transformers are installed: it gives the checkpoint that an
artifact was exported from a row of its own (float32, eager, CPU). It offers the subset of
:class:`~edgedistill.runtime.model.LanguageModel` the harness calls: ``info``, ``tokenize``, ``evaluate``,
``reset_cache``, ``logits``, ``close``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.deps import require
from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.model import ModelInfo, resolve_context, resolve_threads


class TorchModel:
    """A checkpoint in PyTorch (float32, CPU), decoding through its own key/value cache.

    Args:
        path: the checkpoint directory (config.json, weights, tokenizer files).
        threads: torch intra-op threads (None: every CPU this process may use).
        context: positions to allow (None: the model's, at most the runtime's default).

    Raises:
        EdgeDistillError: torch or transformers missing, or a checkpoint transformers cannot load.
    """

    def __init__(self, path: Path, threads: int | None = None, context: int | None = None) -> None:
        torch = require("torch")
        transformers = require("transformers")
        threads = resolve_threads(threads)
        torch.set_num_threads(threads)
        path = Path(path)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except (OSError, ValueError) as err:
            raise EdgeDistillError(f"{path}: transformers cannot load this checkpoint ({err})") from None
        self._torch = torch
        self._cache: Any = None
        self._keep_last = True  # ask for the last position's logits only (transformers' logits_to_keep)
        config = self.model.config
        trained = getattr(config, "max_position_embeddings", None)
        self.info = ModelInfo(
            backend="pytorch",
            format="checkpoint",
            path=str(path),
            name=path.name,
            architecture=str(getattr(config, "model_type", "unknown")),
            parameters=int(sum(p.numel() for p in self.model.parameters())),
            quantization="fp32",
            file_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors"))
            or sum(p.stat().st_size for p in path.glob("*.bin")),
            context=resolve_context(context, trained),
            trained_context=int(trained or 0),
            vocab_size=int(config.vocab_size),
            threads=threads,
        )

    @property
    def context(self) -> int:
        return self.info.context

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        torch = self._torch
        if start == 0 or self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache()
        elif self._cache.get_seq_length() != start:
            self._cache.crop(start)
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        positions = torch.arange(start, start + len(token_ids)).unsqueeze(0)
        options = {"logits_to_keep": 1} if self._keep_last else {}
        with torch.inference_mode():
            try:
                out = self.model(
                    input_ids=ids, position_ids=positions, past_key_values=self._cache, use_cache=True, **options
                )
            except TypeError:  # a transformers release before ``logits_to_keep``: compute every position's logits
                if not options:
                    raise
                self._keep_last = False
                out = self.model(input_ids=ids, position_ids=positions, past_key_values=self._cache, use_cache=True)
        self._cache = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def reset_cache(self) -> None:
        self._cache = None

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([list(token_ids)], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy()

    def close(self) -> None:
        self.model = None
        self._cache = None
