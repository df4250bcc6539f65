"""One pipeline stage as the checkpoint's own forward, restricted to a range of its layers.

A stage must run exactly what the model's code runs (embedding scale, per-layer rotary tables,
layer types, final norm, logit soft-capping), or every architecture needs its own loop. So a stage
calls the model's own ``forward`` on a *shell*: a shallow copy of the loaded model whose decoder
layer list holds this stage's layers and pass-throughs elsewhere. Two hooks cut it to the range:

* a later stage feeds the previous stage's hidden state in through a pre-hook on its first layer
  (the model still runs its own input path on that tensor: rotary tables, masks, any scale, whose
  result the hook replaces);
* an earlier stage stops after its last layer: a hook raises `_Handoff` carrying the output.

The last stage runs to the end, LM head included, projecting only the sampled rows
(``logits_to_keep``). Small shared modules (norms, rotary) are copied per stage, so stage threads
never share mutable state (dynamic rotary updates its tables) and each stage has them on its device.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

# A shared child with more parameters than this fraction of the model is moved, not copied.
_COPY_FRACTION = 0.02


class _Handoff(Exception):
    """Raised after a non-last stage's last layer: carries its output out of the model forward."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _PassThrough(nn.Module):
    """Stands in for a layer another stage runs: returns its input (keeps the layer's type)."""

    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        for name in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(like, name):
                setattr(self, name, getattr(like, name))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Absent(nn.Module):
    """A module this stage never calls (another stage's embedding or LM head)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.what} belongs to another pipeline stage")


def decoder_layers(hf: nn.Module) -> tuple[str, nn.ModuleList]:
    """Dotted path (from `hf`) and module of the decoder layer list (`model.layers`,
    `transformer.h`, `model.decoder.layers`, ...): the module list holding every layer."""
    count = hf.config.get_text_config().num_hidden_layers
    for name, module in hf.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name:
            return name, module
    raise ValueError(
        f"{type(hf).__name__} has no list of {count} decoder layers: "
        "its layers cannot be split into pipeline stages"
    )


class StageShell:
    """The model's forward over layers `layers` of `hf`, on `device`."""

    def __init__(
        self, hf: nn.Module, layers: range, device: torch.device, *, first: bool, last: bool
    ) -> None:
        self.first, self.last, self.device = first, last, device
        self._total = sum(p.numel() for p in hf.parameters())
        self._embed = hf.get_input_embeddings()
        self._head = hf.get_output_embeddings()
        path, all_layers = decoder_layers(hf)
        own = nn.ModuleList(
            all_layers[i].to(device) if i in layers else _PassThrough(all_layers[i])
            for i in range(len(all_layers))
        )
        self.model = self._rebuild(hf, path.split("."), own)
        self._incoming: torch.Tensor | None = None
        self._hooks = []
        if not first:
            self._hooks.append(
                own[layers.start].register_forward_pre_hook(self._feed, with_kwargs=True)
            )
        if not last:
            self._hooks.append(own[layers.stop - 1].register_forward_hook(self._stop))
        keep = getattr(hf, "_supports_logits_to_keep", None)
        self._logits_to_keep = bool(keep and keep())

    def _rebuild(self, module: nn.Module, path: list[str], own: nn.ModuleList) -> nn.Module:
        """A shallow copy of `module` whose children on `path` lead to this stage's layer list;
        every other child is this stage's (see `_child`)."""
        new = copy.copy(module)
        new._modules = OrderedDict()
        for name, child in module.named_children():
            if name != path[0]:
                new._modules[name] = self._child(child)
            elif len(path) == 1:
                new._modules[name] = own
            else:
                new._modules[name] = self._rebuild(child, path[1:], own)
        return new

    def _child(self, child: nn.Module) -> nn.Module:
        if child is self._embed:
            return child.to(self.device) if self.first else _Absent("the embedding")
        if child is self._head:
            if not self.last:
                return _Absent("the LM head")
            tied = self._embed is not None and child.weight is self._embed.weight
            # A tied head on another device than the embedding needs its own weights.
            return (copy.deepcopy(child) if tied and not self.first else child).to(self.device)
        # Norms, rotary tables, dropouts: a private copy on this stage's device. A large child
        # (unusual, e.g. per-layer embeddings) is shared and moved instead of duplicated.
        size = sum(p.numel() for p in child.parameters())
        if size > _COPY_FRACTION * self._total:
            return child.to(self.device)
        return copy.deepcopy(child).to(self.device)

    def _feed(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self._incoming is not None
        if args:
            return (self._incoming, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._incoming}

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        raise _Handoff(output[0] if isinstance(output, tuple) else output)

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [T] long, first stage
        hidden: torch.Tensor | None,  # [1, T, H], later stages
        positions: torch.Tensor,  # [T] long
        rows: torch.Tensor,  # [n] long: rows whose logits the last stage returns
    ) -> torch.Tensor:
        """Hidden states [1, T, H] for the next stage, or logits [n, V] on the last."""
        kwargs: dict[str, Any] = {"position_ids": positions[None], "use_cache": False}
        if self.first:
            assert input_ids is not None
            kwargs["input_ids"] = input_ids[None]
        else:
            assert hidden is not None
            self._incoming = hidden
            kwargs["inputs_embeds"] = hidden  # its own input path runs on it; the hook replaces
        if self.last and self._logits_to_keep:
            kwargs["logits_to_keep"] = rows
        try:
            out = self.model(**kwargs)
        except _Handoff as handoff:
            return handoff.hidden
        finally:
            self._incoming = None
        if not self.last:
            raise RuntimeError("stage ran past its last layer without handing off")
        logits = out.logits[0]  # [n, V] with logits_to_keep, else [T, V]
        return logits if self._logits_to_keep else logits[rows]
