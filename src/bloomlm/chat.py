"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered to one prompt
string with a Jinja template, exactly as transformers 4.37 renders them.

One renderer for every caller: `BloomTokenizerFast.apply_chat_template`, the CLI's interactive
mode and the server. Jinja comes from the optional `chat` extra (`pip install 'bloomlm[chat]'`,
included by `serve`) and is imported on first use, so `import bloomlm` stays light.

As in transformers, templates run in Jinja's immutable sandbox with `trim_blocks` and
`lstrip_blocks`, get the messages as `messages`, `add_generation_prompt`, and the tokenizer's
special tokens by name (`eos_token`, `bos_token`, ...), and may call `raise_exception(message)`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

# transformers 4.37's BloomTokenizerFast.default_chat_template: each message's content followed
# by the eos token, roles ignored. BLOOM was not trained on a chat format.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message.content }}{{ eos_token }}{% endfor %}"
)

INSTALL_HINT = "chat templates need jinja2: pip install 'bloomlm[chat]'"


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    template: str = DEFAULT_CHAT_TEMPLATE,
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, Any] | None = None,
) -> str:
    """The prompt `template` makes of `messages`; `special_tokens` (name -> token string, such as
    a tokenizer's `special_tokens_map`) are visible to the template by name."""
    if not isinstance(template, str):
        raise TypeError(
            f"a chat template must be a str (Jinja source), got {type(template).__name__}"
        )
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError(
            "a conversation must be a list of {'role': ..., 'content': ...} dicts, got "
            f"{type(messages).__name__}"
        )
    bad = [i for i, message in enumerate(messages) if not isinstance(message, Mapping)]
    if bad:
        raise TypeError(f"conversation messages must be dicts; items {bad} are not")
    variables = dict(special_tokens or {})
    return _compiled(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
    )


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled once in transformers' Jinja environment."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template)
