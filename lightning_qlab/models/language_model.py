"""Byte-level causal language modelling with QLABGrad (or, for comparison, any torch optimizer)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_qlab._checks import is_integer
from lightning_qlab._compat import attached_trainer
from lightning_qlab.mixin import QLABConfig
from lightning_qlab.models.base import QLABModel

__all__ = ["LanguageModel", "BYTE_VOCABULARY"]

#: Tokens are the bytes of UTF-8 text, so the vocabulary is every byte value.
BYTE_VOCABULARY = 256

Batch = tuple[Tensor, Tensor]


class LanguageModel(QLABModel):
    """Next-byte prediction on UTF-8 text, around any causal backbone; QLABGrad by default.

    The backbone maps ``(batch, length)`` byte values to ``(batch, length, 256)`` next-byte
    scores (:class:`~lightning_qlab.models.CausalTransformer` does); training minimises the mean
    cross-entropy over every position. Validation and test report, averaged over every predicted
    byte: ``<stage>_loss`` (nats per byte), ``<stage>_bpc`` (bits per byte: bits per character for
    ASCII text, the convention of character-level benchmarks such as enwik8) and ``<stage>_ppl``
    (perplexity, ``exp`` of the loss).

    ``predict`` samples a continuation of each prompt the datamodule yields (see
    :class:`~lightning_qlab.data.TextDataModule`'s ``prompts``) and returns it as text.

    Args:
        backbone: the network, byte values to next-byte scores; its vocabulary must be 256.
        qlab_config, optimizer, lr_scheduler: QLABGrad's settings, or a baseline optimizer and
            its schedule (see :class:`~lightning_qlab.models.base.QLABModel`).
        max_new_tokens: bytes to sample after each prompt in ``predict``.
        temperature: sampling temperature (> 0); lower is more conservative.
        top_k: sample among the ``top_k`` most likely bytes only (``None``: all 256).

    Example:
        >>> from lightning_qlab.models import CausalTransformer, LanguageModel
        >>> model = LanguageModel(CausalTransformer(block_size=32, n_layer=1, n_head=2, d_model=16))
        >>> model.generate("ab", max_new_tokens=5).startswith("ab")
        True
    """

    def __init__(
        self,
        backbone: nn.Module,
        qlab_config: Union[QLABConfig, Mapping[str, Any]] = QLABConfig(),
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
    ) -> None:
        super().__init__(qlab_config, optimizer, lr_scheduler)
        if not isinstance(backbone, nn.Module):
            raise TypeError(
                f"LanguageModel: backbone must be a torch.nn.Module, got {type(backbone).__name__}; "
                "in YAML give it as {class_path: lightning_qlab.models.CausalTransformer, init_args: {...}}."
            )
        vocabulary = getattr(backbone, "vocab_size", BYTE_VOCABULARY)
        if vocabulary != BYTE_VOCABULARY:
            raise ValueError(
                f"LanguageModel: the backbone's vocab_size is {vocabulary}, but the model reads UTF-8 "
                f"bytes: set the backbone's vocab_size to {BYTE_VOCABULARY}."
            )
        if not is_integer(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"LanguageModel: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"LanguageModel: temperature must be a positive number, got {temperature!r}")
        if top_k is not None and (not is_integer(top_k) or not 1 <= top_k <= BYTE_VOCABULARY):
            raise ValueError(f"LanguageModel: top_k must be None or an integer in 1..256, got {top_k!r}")
        self.backbone = backbone
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_k = top_k
        # Sampling settings are not part of the trained model: leaving them out of the checkpoint's
        # hyperparameters lets `lightning predict --ckpt_path ...` take them from the command line.
        self.save_hyperparameters(ignore=["backbone", "optimizer", "lr_scheduler", "max_new_tokens",
                                          "temperature", "top_k"])
        self.plain_hyperparameters()
        # Byte-weighted means, so that the last, shorter batch counts by its size (and DDP ranks
        # are combined the same way).
        self.val_nats = MeanMetric()
        self.test_nats = MeanMetric()

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        data_block = getattr(datamodule, "block_size", None)
        model_block = getattr(self.backbone, "block_size", None)
        if isinstance(data_block, int) and isinstance(model_block, int) and data_block > model_block:
            raise ValueError(
                f"LanguageModel: the data's windows have block_size={data_block} bytes but the backbone "
                f"reads at most block_size={model_block}; set the data's block_size to {model_block} or "
                f"below, or the backbone's to {data_block} or above."
            )

    @override
    def forward(self, tokens: Tensor) -> Tensor:
        """Next-byte scores (logits), shape ``(batch, length, 256)``."""
        return self.backbone(tokens)

    def _cross_entropy(self, batch: Batch) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @override
    def qlab_loss(self, batch: Batch) -> Tensor:
        """The mean next-byte cross-entropy of the batch (also the trial loss: no side effects)."""
        return self._cross_entropy(batch)

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, self.val_nats)

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self._evaluate(batch, self.test_nats)

    def _evaluate(self, batch: Batch, nats: MeanMetric) -> Tensor:
        loss = self._cross_entropy(batch)
        nats.update(loss, weight=batch[1].numel())
        return loss

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_nats)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_nats)

    def _log_epoch(self, stage: str, nats: MeanMetric) -> None:
        if nats.update_count == 0:
            return
        loss = nats.compute()  # synchronised across processes
        nats.reset()
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_bpc", loss / math.log(2))
        self.log(f"{stage}_ppl", torch.exp(loss))

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """A sampled continuation of each prompt in the batch (byte tensors of shape
        ``(1, length)`` from :class:`~lightning_qlab.data.TextDataModule`), prompt included."""
        prompts = batch[0] if isinstance(batch, (tuple, list)) else batch
        return [self.generate(bytes(prompt.tolist()).decode("utf-8", errors="replace")) for prompt in prompts]

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: Optional[int] = None) -> str:
        """The prompt followed by ``max_new_tokens`` sampled bytes, decoded as UTF-8 (a byte
        sequence cut inside a character shows as U+FFFD). Draws from the global random generator."""
        # An empty prompt starts from a line break, the most neutral context there is in text.
        context = list(prompt.encode("utf-8")) or [ord("\n")]
        tokens = torch.tensor([context], dtype=torch.long, device=self.device)
        window = getattr(self.backbone, "block_size", None)
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens or self.max_new_tokens):
                logits = self(tokens if window is None else tokens[:, -window:])[:, -1] / self.temperature
                if self.top_k is not None:
                    cutoff = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < cutoff, -math.inf)
                following = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)
                tokens = torch.cat([tokens, following], dim=1)
        finally:
            self.train(was_training)
        return prompt + bytes(tokens[0, len(context):].tolist()).decode("utf-8", errors="replace")
