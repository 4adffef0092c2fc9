"""The chat template: Stepwise's Alpaca-style default for tokenizers without one, and rendering.

Training (trainer.training.batching), generation (trainer.inference) and the front ends all render
conversations through the tokenizer's chat template, so an answer is generated in exactly the format
it was trained on.

System messages, one rule everywhere: Stepwise never adds or removes a system message itself. A
conversation is rendered as it is, so what the template does when there is none (SmolLM2's inserts
"You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Stepwise's Alpaca template
adds nothing) happens identically when training on a record, when scoring held-out prompts and in
the web app and the REPL (which send only user and assistant turns); a record's own system message,
even an empty one, replaces the default, as the template decides. A system prompt is never learned.

What is learned of an assistant turn (answer_end): its words and the template's end-of-turn token
(ChatML's `<|im_end|>`, Alpaca's EOS), the token the model must produce to stop; the whitespace a
template puts after that token (ChatML's newline) opens the next turn and is prompt, like the
`<|im_start|>assistant\\n` header before the answer.
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
    """The conversation as the chat template renders it (text; no system message added or removed)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_end(tokenizer, turn: str) -> int:
    """How much of a rendered assistant turn (its words, then the template's closing) is learned."""
    # Up to and including the last special token when only whitespace follows it: ChatML closes a
    # turn with "<|im_end|>\n", and the model stops at <|im_end|>, so it never produces the newline.
    # A template that closes turns with plain text has its closing learned whole (the model's stop).
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    end = max((turn.rfind(s) + len(s) for s in specials if s and s in turn), default=-1)
    return end if end >= 0 and not turn[end:].strip() else len(turn)


def prompt_text(instruction: str, input_text: str = "") -> str:
    """The user message of an Alpaca record: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction
