"""Streamers: receive token ids from `generate` as they are produced and turn them into text.

`generate` calls `put(ids)` once with the prompt ([1, L]) and then once per new token ([1]), and
`end()` when it finishes. Text is released only once it is final: at a newline, after a CJK
character, or up to the last space (a word may still change with the next token). These are
transformers 4.37's rules, so both libraries stream the same chunks.
"""

from __future__ import annotations

from queue import Queue
from typing import Any

# Unicode blocks of CJK ideographs (not Hangul or kana, which separate words with spaces).
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


class BaseStreamer:
    """What `generate` needs of a streamer."""

    def put(self, value: Any) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class TextStreamer(BaseStreamer):
    """Prints decoded text to stdout as soon as whole words are formed.

    `skip_prompt=True` leaves out the prompt; `decode_kwargs` go to `tokenizer.decode`
    (e.g. `skip_special_tokens=True`). Batch size 1 only.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of decode(token_cache) already released
        self.next_tokens_are_prompt = True

    def put(self, value: Any) -> None:
        """Take ids ([L] or [1, L]); release the text that can no longer change."""
        shape = tuple(value.shape)
        if len(shape) > 1 and shape[0] > 1:
            raise ValueError(
                f"TextStreamer only supports batch size 1, got ids of shape {list(shape)}"
            )
        if len(shape) > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):  # a line is final: release it and start afresh
            printable = text[self.print_len :]
            self.token_cache = []
            self.print_len = 0
        elif len(text) > 0 and _is_cjk(
            text[-1]
        ):  # no spaces between CJK words: release every character
            printable = text[self.print_len :]
            self.print_len += len(printable)
        else:  # release up to the last space; the word after it may still grow
            printable = text[self.print_len : text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self) -> None:
        """Release whatever is left and mark the end of the stream."""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len :]
            self.token_cache = []
            self.print_len = 0
        else:
            printable = ""
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print the released text; a newline ends the stream."""
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """Queues the released text; iterate over it from another thread while `generate` runs.

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer)).start()
        for chunk in streamer:
            ...

    `timeout` (seconds) bounds each wait on the queue; `queue.Empty` is raised when it runs out.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_prompt: bool = False,
        timeout: float | None = None,
        **decode_kwargs: Any,
    ):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        return value
