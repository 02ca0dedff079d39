"""A small GPT-style causal transformer: tokens in, next-token scores out. Plain ``nn.Module``.

Pre-norm blocks (LayerNorm, causal self-attention, LayerNorm, a GELU MLP, each with a residual
connection), learned position embeddings, dropout, and an output layer tied to the token
embedding (Press & Wolf, 2017). The initialisation follows GPT-2 (Radford et al., 2019): weights
from N(0, 0.02), with the projections that feed the residual stream scaled by ``1/sqrt(2 n_layer)``
so that the residual stream's variance does not grow with depth.
:class:`~lightning_qlab.models.LanguageModel` trains it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_qlab.models.backbones import _dropout_rate, _positive

__all__ = ["CausalTransformer"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before it."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (batch, heads, length, head width)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        # No dropout on the attention weights: it would force the slow reference kernel of
        # scaled_dot_product_attention, and dropout on the residual branches regularises enough.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class Block(nn.Module):
    """One pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_head, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """A decoder-only transformer language model: ``(batch, length)`` token ids in,
    ``(batch, length, vocab_size)`` next-token scores (logits) out.

    Args:
        vocab_size: the number of distinct tokens (256 for bytes).
        block_size: the longest sequence it reads (the size of the position embedding).
        n_layer: transformer blocks.
        n_head: attention heads per block; must divide ``d_model``.
        d_model: width of the residual stream.
        dropout: dropout rate on the embeddings and on each residual branch.
        tie_weights: share the token embedding with the output layer.

    Example:
        >>> import torch
        >>> net = CausalTransformer(vocab_size=256, block_size=64, n_layer=2, n_head=2, d_model=32)
        >>> net(torch.zeros(3, 10, dtype=torch.long)).shape
        torch.Size([3, 10, 256])
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.1,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        owner = "CausalTransformer"
        _positive(owner, vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                  d_model=d_model)
        if d_model % n_head != 0:
            raise ValueError(f"{owner}: n_head={n_head} must divide d_model={d_model}; e.g. d_model={n_head * 32}.")
        dropout = _dropout_rate(owner, dropout)
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(block_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.token_embedding.weight
        self._initialise(n_layer)

    def _initialise(self, n_layer: int) -> None:
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("attention.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(
                f"CausalTransformer: a sequence of {length} tokens is longer than block_size="
                f"{self.block_size}; crop it to the last {self.block_size} tokens."
            )
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
