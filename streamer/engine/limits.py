"""The token-limit rule (DECISIONS 5), in one place: never clamp a value the user gave."""

from __future__ import annotations

from dataclasses import dataclass

from streamer.protocol import ErrorCode


@dataclass(frozen=True)
class TokenLimits:
    context: int
    """The model's usable context (max_model_len)."""
    default_max_tokens: int = 128
    max_tokens_cap: int | None = None
    """None: the context length."""
    max_prompt_tokens: int | None = None
    """None: context - 1."""


class LimitError(ValueError):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def resolve_max_tokens(prompt_tokens: int, requested: int | None, limits: TokenLimits) -> int:
    """max_tokens for a prompt of `prompt_tokens`, or LimitError naming the limit."""
    n, context = prompt_tokens, limits.context
    max_prompt = limits.max_prompt_tokens or context - 1
    if n == 0:
        raise LimitError(ErrorCode.INVALID_FIELD, "the prompt has no tokens")
    if n > max_prompt:
        raise LimitError(
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt is {n} tokens; the limit is {max_prompt} (max_prompt_tokens)",
        )
    cap = limits.max_tokens_cap or context
    if requested is None:
        return max(1, min(limits.default_max_tokens, context - n))
    if requested > cap:
        raise LimitError(
            ErrorCode.MAX_TOKENS_TOO_LARGE,
            f"max_tokens={requested} is above the cap {cap} (max_tokens_cap)",
        )
    if n + requested > context:
        raise LimitError(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"prompt ({n} tokens) + max_tokens ({requested}) = {n + requested} exceeds the "
            f"context length {context}",
        )
    return requested
