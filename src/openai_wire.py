"""The OpenAI wire format of `/v1/completions` and `/v1/chat/completions`: request models, and the
text, logprobs and error JSON of the answers.

Requests are validated here once (a bad field is a 400 naming it, in OpenAI's error shape); the
routes in `src/api/openai_compat.py` turn them into `SampleJob`s for the worker's sampler.
`ChoiceText` is where sampled tokens become OpenAI text: cut before the first stop string (the
sampler stops after it), and, while streaming, released only once it can no longer change.

    >>> req = parse_json(CompletionRequest, {"model": "tiny", "prompt": "The cat", "max_tokens": 8})
    >>> req.sampling_params(default_max_tokens=16)
    SamplingParams(max_tokens=8, temperature=1.0, top_p=1.0, top_k=-1, seed=None, stop_strings=(), ...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import Field, field_validator

from .backends import SampledSequence, SamplingParams, TopK, UserInputError

FINISH_REASONS = {"stop": "stop", "length": "length"}  # the sampler's stop_reason -> OpenAI's finish_reason


def error_json(message: str, param: str | None, status: int, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- requests


class _Strict(pydantic.BaseModel):
    # strict: "1" is not a number, 1 is not true; unknown fields are refused by name, not ignored.
    model_config = pydantic.ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """What both endpoints share: the model, OpenAI's sampling parameters and streaming."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)  # None: 1.0, as OpenAI
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None  # vLLM's extension; -1 or None: off
    n: int = Field(1, ge=1)
    stop: Any = Field(None, validate_default=True)  # a string or a list of strings; validated into a tuple
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as a self-hosted server has no abuse monitoring
    return_token_ids: bool = False  # vLLM's extension: the prompt's and each choice's token ids
    # Tink's extensions, as on /api/v1/sample: checked there by the same parser (`request_look`), which
    # needs the model's shape and the caller's named vectors, so they pass through here unchecked.
    capture: Any = None
    steer: Any = None
    capture_format: Any = "json"

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        return tuple(items)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("top_k must be -1 (off) or >= 1")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported by this server; leave it 0 or unset")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server; leave it empty or unset")
        return value

    def check(self) -> None:
        """Rules that span fields (a `UserInputError` naming the field)."""
        if self.stream_options is not None and not self.stream:
            raise UserInputError("stream_options is only allowed when stream is true", "stream_options")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def look_fields(self) -> dict[str, Any]:
        """`capture`, `steer` and `capture_format` as /api/v1/sample's body carries them."""
        return {"capture": self.capture, "steer": self.steer, "capture_format": self.capture_format}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=default_max_tokens if self.requested_max_tokens is None else self.requested_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop_strings=self.stop,  # OpenAI's stop=[] means no stop strings, EOS still ends a choice
        )


class CompletionRequest(_SamplingRequest):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of those
    logprobs: int | None = Field(None, ge=0)  # how many most likely tokens to list at each position
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> list[str | list[int]]:
        """One or more prompts, each a non-empty string or a non-empty list of token ids."""
        def is_ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(value, str) and value or is_ids(value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) and p or is_ids(p) for p in value):
            return value
        raise ValueError("prompt must be a non-empty string, a list of token ids, or a non-empty list of those")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server; leave it false")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("suffix (insertion) is not supported by this server; leave it unset")
        return value

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise UserInputError("best_of is not supported beyond best_of == n; leave it unset", "best_of")

    @property
    def top_logprob_count(self) -> int | None:
        """How many alternatives to list per token; None: no logprobs asked."""
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: text content; OpenAI's `developer` is the `system` role."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        return message | ({"name": self.name} if self.name else {})


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise UserInputError("top_logprobs requires logprobs: true", "top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise UserInputError("give max_completion_tokens or max_tokens, not both", "max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprob_count(self) -> int | None:
        """How many alternatives to list per token; None: no logprobs asked."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ----------------------------------------------------------------------------- answers


@dataclass
class Piece:
    """A run of a choice's text and the tokens that make it up (what one streamed chunk carries)."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    topk: list[TopK] | None  # per token, only in the finished choice (the sampler reports top-k at the end)
    offset: int  # where `text` starts in the choice's text


class ChoiceText:
    """One choice's text as its tokens arrive.

    Text is released only once it cannot change: never a trailing partial UTF-8 character, never the
    last len(longest stop string) - 1 characters (they could still become a stop string), and never
    anything from the first stop string on. What `add` releases is therefore always a prefix of what
    `finish` ends with, so a streamed choice concatenates to exactly the non-streamed text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self._decode, self._stop = decode, stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self.text = ""  # released so far
        self.released = 0  # tokens released so far
        self.stopped = False  # a stop string ended the text

    def add(self, tokens: list[int], logprobs: list[float]) -> Piece | None:
        """Take newly sampled tokens; the text (and its tokens) that became final, if any."""
        if self.stopped:
            return None
        self._tokens += tokens
        self._logprobs += logprobs
        text = self._decode(self._tokens)
        cut = first_stop(text, self._stop)
        if cut is not None:
            self.stopped = True
            return self._release(self._tokens_through(cut), text[:cut], None)
        limit = len(text) - self._hold
        for n in range(len(self._tokens), self.released, -1):
            prefix = text if n == len(self._tokens) else self._decode(self._tokens[:n])
            if len(prefix) <= limit and not prefix.endswith("\ufffd"):
                return self._release(n, prefix, None)
        return None

    def finish(self, seq: SampledSequence) -> Piece:
        """The rest of the choice from the sampler's finished sequence (of which streamed tokens are a prefix)."""
        self._tokens, self._logprobs = list(seq.tokens), list(seq.logprobs)
        text = self._decode(self._tokens)
        cut = first_stop(text, self._stop)
        self.stopped = cut is not None
        end = len(self._tokens) if cut is None else self._tokens_through(cut)
        return self._release(max(end, self.released), text if cut is None else text[:cut], seq.topk_logprobs)

    def finish_reason(self, seq: SampledSequence) -> str:
        return "stop" if self.stopped else FINISH_REASONS.get(seq.stop_reason, seq.stop_reason)

    def _release(self, n: int, text: str, topk: list[TopK] | None) -> Piece:
        piece = Piece(text[len(self.text):], self._tokens[self.released:n], self._logprobs[self.released:n],
                      topk[self.released:n] if topk is not None else None, len(self.text))
        self.text, self.released = text, n
        return piece

    def _tokens_through(self, cut: int) -> int:
        """The fewest tokens whose text reaches `cut` characters (binary search over prefix lengths)."""
        low, high = self.released, len(self._tokens)
        while low < high:
            mid = (low + high) // 2
            if len(self._decode(self._tokens[:mid])) >= cut:
                high = mid
            else:
                low = mid + 1
        return low


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the stop string that completes first in `text` starts (the one the sampler stopped on), or None."""
    ends = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return min(ends)[1] if ends else None


def completion_logprobs(piece: Piece, token_text: Callable[[int], str], top: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    strings = [token_text(t) for t in piece.tokens]
    offsets, at = [], piece.offset
    for s in strings:
        offsets.append(at)
        at += len(s)
    tops = None
    if top and piece.topk is not None:
        tops = [{token_text(t): lp for t, lp in row[:top]} for row in piece.topk]
    return {"tokens": strings, "token_logprobs": piece.logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(piece: Piece, token_text: Callable[[int], str], top: int) -> dict[str, Any]:
    """The chat `logprobs` object: one entry per token with its bytes and its top alternatives."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    rows = piece.topk if piece.topk is not None else [[] for _ in piece.tokens]
    content = [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in row[:top]]}
               for t, lp, row in zip(piece.tokens, piece.logprobs, rows)]
    return {"content": content, "refusal": None}


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
