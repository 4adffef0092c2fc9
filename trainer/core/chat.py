"""The chat template: Stepwise's Alpaca-style default for tokenizers without one, and rendering.

Training (trainer.training.batching), generation (trainer.inference) and the front ends all render
conversations through these functions, so an answer is generated in exactly the format it was trained on.
"""

from __future__ import annotations

# A documented default for tokenizers without a chat template: Alpaca's headings, one turn after
# another, EOS closing each answer. It is saved with the tokenizer so inference formats as training did.
ALPACA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{%- if message['role'] == 'system' %}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif -%}"
)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template the Alpaca-style one, and a pad token."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = ALPACA_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(instruction: str, input_text: str = "") -> str:
    """The user message of an Alpaca record: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction
