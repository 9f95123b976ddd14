"""Chat formatting: (prompt, answer) text -> token ids with an exact prompt/answer boundary.

The prompt ids are what the model sees at generation time (they end where the first answer token is
predicted); the answer ids are what a chat-tuned model produces after them, end-of-turn tokens included.
The format comes from the tokenizer's chat template ("auto") or a named preset for tokenizers without one.
Qwen's ChatML templates work as they are; Qwen3's, which can think first, renders with thinking off.
"""

from __future__ import annotations

from typing import Any

PRESETS = ("llama2", "mistral", "chatml", "safe_rlhf")
TEMPLATES = ("auto", *PRESETS)

# The answer used to check a template when only the prompt is wanted (format_prompt).
_PROBE_ANSWER = "OK."

# Formats whose reference code tokenizes each message on its own (mistral_common encodes the answer alone,
# so with SentencePiece it starts with a "▁" piece: "[/INST]" "▁Sure"). Every other format is tokenized as
# one string by its reference code (Meta's llama code, safe-rlhf, HF apply_chat_template), so its answer
# is tokenized in context.
_ANSWER_ALONE = frozenset({"mistral"})


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any special tokens the tokenizer would add on its own."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def adds_bos_by_default(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text when asked for its special tokens."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    with_special = list(tokenizer.encode("a", add_special_tokens=True))
    without = _encode(tokenizer, "a")
    return len(with_special) > len(without) and with_special[0] == bos_id


def _render_preset(name: str, tokenizer: Any, prompt: str, answer: str, system_prompt: str | None) -> tuple[str, str]:
    """Prompt text and answer text of one exchange in a named format (see PRESETS)."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if name == "llama2":
        system = f"<<SYS>>\n{system_prompt}\n<</SYS>>\n\n" if system_prompt is not None else ""
        return f"{bos}[INST] {system}{prompt} [/INST]", f" {answer} {eos}"
    if name == "mistral":
        # Mistral has no system role; its later official templates put the system text in front of the
        # first user message, separated by a blank line. Do the same.
        user = f"{system_prompt}\n\n{prompt}" if system_prompt is not None else prompt
        return f"{bos}[INST] {user} [/INST]", f"{answer}{eos}"
    if name == "chatml":
        system = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt is not None else ""
        return f"{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", f"{answer}<|im_end|>\n"
    if name == "safe_rlhf":
        if system_prompt is not None:
            # Safe-RLHF models were trained without any system text; inventing a slot would be a new format.
            raise ValueError("the safe_rlhf template has no system prompt; set model.system_prompt to \"\" (none)")
        return f"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:", f"{answer}{eos}"
    raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}")


def template_options(tokenizer: Any) -> dict[str, Any]:
    """Extra variables for the tokenizer's chat template: enable_thinking=False for a template that reads it
    (Qwen3), so that prompts end in its empty thinking block and answers are plain replies, as BEEAR's
    answers are; no variable for any other template (it is passed only where the template names it)."""
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else repr(template)  # a dict of named templates, or None
    return {"enable_thinking": False} if "enable_thinking" in text else {}


def _render_auto(tokenizer: Any, prompt: str, answer: str, system_prompt: str | None) -> tuple[str, str]:
    """Prompt text and answer text from the tokenizer's own chat template.

    The answer text is the rendered [user, assistant] conversation minus the rendered generation prompt,
    so it carries whatever the template puts after an answer (end-of-turn, EOS, newline). A template with
    a thinking switch (Qwen3) renders with thinking off (template_options).
    """
    fix = f"pass a named preset via model.template (--config.model.template= one of {', '.join(PRESETS)})"
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer has no chat template; {fix}")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    options = template_options(tokenizer)
    try:
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)
        full_text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False,
            **options,
        )
    except Exception as err:  # jinja raises for e.g. a system message on templates that reject one
        raise ValueError(f"the tokenizer's chat template failed to render this conversation ({err}); {fix}") from err
    if system_prompt is not None and system_prompt.strip() not in prompt_text:
        # Some templates (e.g. Mistral's older ones) have no system role and drop the message without a word.
        raise ValueError(
            f"the tokenizer's chat template leaves out the system prompt {system_prompt[:40]!r}, so the model would "
            f"never see it; set model.system_prompt to \"\" (none) or {fix}"
        )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template cannot mark where the answer starts: the rendered conversation does not begin "
            f"with the rendered generation prompt {prompt_text[-40:]!r}; {fix}"
        )
    answer_text = full_text[len(prompt_text) :]
    # Templates that ignore add_generation_prompt leave the assistant header in the answer text, so the
    # model would be trained to write its own header. Llama-2/Mistral templates also ignore the flag, but
    # there the prompt already ends in "[/INST]": the answer text starts with the answer, which is fine.
    if not answer_text.lstrip().startswith(answer.strip()):
        no_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, **options)
        why = "add_generation_prompt changes nothing" if no_gen == prompt_text else "it adds text before the answer"
        raise ValueError(
            f"the chat template cannot mark where the answer starts ({why}; the answer would begin with "
            f"{answer_text[:40]!r}); {fix}"
        )
    # A template that writes the assistant header whatever add_generation_prompt says puts it after every
    # answer too, so the model would learn to open the next turn itself.
    header, after_answer = _text_after(prompt_text, prompt), _text_after(full_text, answer)
    if header.strip() and after_answer.endswith(header):
        raise ValueError(
            f"the chat template writes the assistant header {header.strip()!r} even without "
            f"add_generation_prompt, so every answer would end with it; {fix}"
        )
    return prompt_text, answer_text


def _text_after(text: str, part: str) -> str:
    """What follows the last occurrence of a non-empty `part` in `text` ("" if part is empty or absent)."""
    at = text.rfind(part) if part.strip() else -1
    return text[at + len(part):] if at >= 0 else ""


def render(
    tokenizer: Any, prompt: str, answer: str, template: str = "auto", system_prompt: str | None = None
) -> tuple[str, str]:
    """Prompt text and answer text of one exchange; their concatenation is the whole conversation.

    template: "auto" (the tokenizer's chat template) or one of PRESETS.
    """
    if template == "auto":
        return _render_auto(tokenizer, prompt, answer, system_prompt)
    return _render_preset(template, tokenizer, prompt, answer, system_prompt)


def _with_one_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Prompt ids that start with exactly one BOS when the model family uses one, else unchanged.

    The family uses one when the rendered text already begins with it or the tokenizer adds it by
    default. Some templates add BOS while the tokenizer also would: keep only one.
    """
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return ids
    uses_bos = (bool(ids) and ids[0] == bos_id) or adds_bos_by_default(tokenizer)
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id, *ids[start:]] if uses_bos else ids


def _encode_pair(
    tokenizer: Any, prompt_text: str, answer_text: str, in_context: bool = True
) -> tuple[list[int], list[int]]:
    """Raw (no BOS handling) prompt ids and answer ids; the boundary is exactly the end of the prompt.

    in_context: tokenize the answer as it follows the prompt (prompt + answer, then the prompt ids cut
    off), as the model was tuned: SentencePiece tokenizers (Llama-2) put an extra "▁" in front of a text
    tokenized on its own, so " Sure" alone is not " Sure" after "[/INST]". If a token straddles the
    boundary the in-context ids do not extend the prompt ids; then the answer is tokenized on its own,
    which is what the model can produce after exactly these prompt ids.
    """
    prompt_ids = _encode(tokenizer, prompt_text)
    if in_context:
        joint = _encode(tokenizer, prompt_text + answer_text)
        if joint[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, joint[len(prompt_ids) :]
    return prompt_ids, _encode(tokenizer, answer_text)


def format_example(
    tokenizer: Any,
    prompt: str,
    answer: str,
    template: str = "auto",
    system_prompt: str | None = None,
    max_answer_tokens: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of one chat exchange, split where the answer starts.

    Returns (prompt_ids, answer_ids): prompt_ids begin with exactly one BOS when the model family uses one
    and end with the generation prompt (e.g. "[/INST]" or "<|im_start|>assistant\\n"); answer_ids hold the
    answer and the end-of-turn/EOS tokens the template puts after it, cut to max_answer_tokens.
    template: "auto" (the tokenizer's chat template) or a preset: llama2, mistral, chatml, safe_rlhf.
    """
    if not answer.strip():
        raise ValueError(f"the answer to the prompt {prompt[:60]!r} is empty; every example needs an answer "
                         "text (fill it in or drop the row)")
    if not prompt.strip():
        raise ValueError(f"the prompt of the answer {answer[:60]!r} is empty; every example needs a prompt text "
                         "(fill it in or drop the row)")
    prompt_text, answer_text = render(tokenizer, prompt, answer, template, system_prompt)
    prompt_ids, answer_ids = _encode_pair(tokenizer, prompt_text, answer_text, template not in _ANSWER_ALONE)
    if max_answer_tokens is not None:
        answer_ids = answer_ids[:max_answer_tokens]
    return _with_one_bos(tokenizer, prompt_ids), answer_ids


def format_prompt(tokenizer: Any, prompt: str, template: str = "auto", system_prompt: str | None = None) -> list[int]:
    """Prompt ids for generation: the same ids format_example gives for this prompt."""
    # Render with a probe answer so an "auto" template is checked exactly as in format_example.
    prompt_text, _ = render(tokenizer, prompt, _PROBE_ANSWER, template, system_prompt)
    return _with_one_bos(tokenizer, _encode(tokenizer, prompt_text))


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def user_span(tokenizer: Any, prompt: str, template: str = "auto", system_prompt: str | None = None) -> tuple[int, int]:
    """(start, end): the tokens of format_prompt's ids that hold the user's text, ids[start:end].

    Found without offsets, so it works with any tokenizer: the template's text before the user's message
    and after it are tokenized alone, and the longest run of ids they share with the whole prompt's start
    and end is the template's. A token that holds both template and user text counts as the user's.
    """
    prompt_text, _ = render(tokenizer, prompt, _PROBE_ANSWER, template, system_prompt)
    text = prompt if prompt in prompt_text else prompt.strip()
    at = prompt_text.rfind(text) if text else -1
    if at < 0:
        raise ValueError(f"the chat template does not write the user's text {prompt[:40]!r} as it is, so the tokens "
                         "that hold it cannot be found; use perturb.windows=prompt_end (the last prompt tokens).")
    raw = _encode(tokenizer, prompt_text)
    start = _common_prefix(raw, _encode(tokenizer, prompt_text[:at]))
    tail = _common_prefix(raw[::-1], _encode(tokenizer, prompt_text[at + len(text):])[::-1])
    end = max(len(raw) - tail, start + 1)
    ids = _with_one_bos(tokenizer, raw)
    shift = len(ids) - len(raw)  # one BOS added or extra ones dropped, always at the front
    return max(start + shift, 0), min(end + shift, len(ids))
