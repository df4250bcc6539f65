"""From a valid request to engine input: chat template, tokenization, token limits.

`prepare` is synchronous and has no I/O (the tokenizer is passed in), so the intake can run it off
the event loop for large prompts and tests can call it directly. Every problem with the request
itself is a `Rejection`; only a fault of the worker raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2

from streamer.egress.events import truncate
from streamer.engine.limits import LimitError, TokenLimits, resolve_max_tokens
from streamer.engine.sequence import SamplingParams
from streamer.protocol import ErrorCode, GenerationRequest
from streamer.validation import Rejection

OFF_LOOP_CHARS = 4_000
"""Prompts longer than this are tokenized in a thread, so heartbeats keep flowing."""


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams


def prepare(
    request: GenerationRequest, tokenizer: Any, limits: TokenLimits
) -> Prepared | Rejection:
    if request.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            return Rejection(
                request.id,
                ErrorCode.NO_CHAT_TEMPLATE,
                "this model has no chat template; send `prompt` instead",
            )
        try:
            text = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as exc:
            # Templates reject what they do not support (e.g. roles that do not alternate).
            return Rejection(
                request.id,
                ErrorCode.INVALID_REQUEST,
                truncate(f"the model's chat template refused the messages: {exc}"),
            )
        prompt_ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    else:
        prompt_ids = list(tokenizer(request.prompt).input_ids)
    try:
        max_tokens = resolve_max_tokens(len(prompt_ids), request.max_tokens, limits)
    except LimitError as exc:
        return Rejection(request.id, exc.code, str(exc))
    params = SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        max_tokens=max_tokens,
        stop=tuple(request.stop),
        ignore_eos=request.ignore_eos,
    )
    return Prepared(prompt_ids, params)

