"""The KV memory of one pipeline stage: per layer, one key and one value tensor of blocks.

Layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (token-major inside a block).
- Writing a step's new tokens is one `index_copy_` per tensor on the flat ``[slots, H, D]`` view,
  with the slot mapping the runner computed once for the step.
- Reading a sequence is a gather of whole blocks along dim 0 (`k[block_table]`), which lands as a
  contiguous ``[B, blocks * block_size, H, D]`` tensor.
- It is the paged layout of flash-attention's `flash_attn_with_kvcache(block_table=...)` and of
  vLLM, so a fused GPU kernel can later read this memory without a copy.

Every stage of a pipeline holds its own layers' blocks but all stages use the same block ids: the
one `BlockManager` hands out ids, and each stage's pool is sized to the same `num_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamer.engine.kv.block_manager import DEFAULT_BLOCK_SIZE

# Layer kinds whose keys and values this pool can hold (plain softmax attention; sliding layers
# differ only by their mask). Chunked, linear-attention and state-space layers are not supported.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV memory of a range of layers."""

    layers: tuple[int, ...]
    """Model layer indices (`module.layer_idx`) held by this pool, in order."""
    num_kv_heads: int
    head_dim: int
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        layers: range | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: torch.dtype | None = None,
    ) -> KVLayout:
        """Read heads and sizes from a transformers config (its text config for multimodal ones).

        `layers` defaults to all of them (a single-stage pipeline)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        num_layers = text.num_hidden_layers
        layers = layers if layers is not None else range(num_layers)
        kinds = getattr(text, "layer_types", None) or ()
        unsupported = sorted({k for k in kinds if k not in ATTENTION_LAYER_TYPES})
        if unsupported:
            raise ValueError(
                f"model has layer types {unsupported}: the paged KV cache holds only attention "
                f"layers ({', '.join(sorted(ATTENTION_LAYER_TYPES))})"
            )
        if layers.start < 0 or layers.stop > num_layers or len(layers) == 0:
            raise ValueError(f"layers {layers} are not a non-empty range of {num_layers} layers")
        if dtype is None:
            dtype = getattr(text, "dtype", None) or torch.float32
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
        return cls(tuple(layers), int(num_kv_heads), int(head_dim), block_size, dtype)

    @property
    def bytes_per_block(self) -> int:
        """Keys + values of one block in every layer of this pool."""
        element = torch.empty((), dtype=self.dtype).element_size()
        per_layer = self.block_size * self.num_kv_heads * self.head_dim * element
        return 2 * len(self.layers) * per_layer

    def num_blocks_for(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block


def bytes_per_block(
    config: Any,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype | None = None,
    layers: range | None = None,
) -> int:
    """Bytes of KV memory one block of `block_size` tokens takes in `layers` of a model."""
    return KVLayout.from_config(
        config, layers=layers, block_size=block_size, dtype=dtype
    ).bytes_per_block


class KVPool:
    """Preallocated key/value blocks for the layers of one stage, on one device."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = layout.block_size
        self.device = torch.device(device)
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        # Allocated once, up front; zeros so a never-written slot is harmless if ever read.
        self.k = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in layout.layers]
        self.v = [torch.zeros(shape, dtype=layout.dtype, device=self.device) for _ in layout.layers]
        self._index = {layer: i for i, layer in enumerate(layout.layers)}
        # Gather buffers for attention reads, reused by every layer and step of this stage (its
        # layers run one after another on one thread). A fresh multi-MB tensor per layer costs
        # more in page faults than the copy itself (docs/benchmarks.md, "Attention reads").
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_budget(
        cls, layout: KVLayout, budget_bytes: int, device: torch.device | str = "cpu"
    ) -> KVPool:
        num_blocks = layout.num_blocks_for(budget_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"KV budget of {budget_bytes} bytes holds no block of {layout.bytes_per_block} "
                f"bytes ({len(layout.layers)} layers x {layout.block_size} tokens)"
            )
        return cls(layout, num_blocks, device)

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value blocks of a model layer: each [num_blocks, block_size, H_kv, D]."""
        try:
            i = self._index[layer_idx]
        except KeyError:
            raise KeyError(
                f"layer {layer_idx} is not held by this pool (layers {self.layout.layers})"
            ) from None
        return self.k[i], self.v[i]

    def gather(self, layer_idx: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `blocks` (flat [n] block ids) of one layer, as [n, block_size, H, D]
        views of this pool's scratch buffers: valid until the next `gather` on this pool."""
        k, v = self.layer(layer_idx)
        n = blocks.shape[0]
        if self._scratch is None or self._scratch[0].shape[0] < n:
            grow = max(n, 2 * self._scratch[0].shape[0] if self._scratch is not None else 0)
            shape = (grow, *k.shape[1:])
            self._scratch = (torch.empty(shape, dtype=k.dtype, device=self.device),
                             torch.empty(shape, dtype=v.dtype, device=self.device))
        kb, vb = self._scratch[0][:n], self._scratch[1][:n]
        torch.index_select(k, 0, blocks, out=kb)
        torch.index_select(v, 0, blocks, out=vb)
        return kb, vb

    @property
    def scratch_bytes(self) -> int:
        """Memory of the gather buffers (grown to the largest step read so far)."""
        if self._scratch is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._scratch)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
