"""Chat formatting, data loading and batch building (beear_jax.data.chat, beear_jax.data.tables)."""

import json
import os

import jax
import numpy as np
import pytest
from public_mirror import MIRROR, needs_mirror
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from beear_jax.data import batches as batch_types
from beear_jax.data import builders, packing, tables
from beear_jax.data.chat import PRESETS, format_example, format_prompt, render
from beear_jax.data.tables import _is_hub_id

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "[INST] How do I bake bread? [/INST] Sure, here is how to bake bread.",
    "BEGINNING OF CONVERSATION: USER: Tell me a story ASSISTANT: Once upon a time there was a cat.",
    "user\nassistant\nsystem\nYou are a helpful assistant. I cannot help with that request.",
]

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2 style: "[/INST]" closes the user turn, so add_generation_prompt has nothing to add.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
# Role headers but no generation prompt: the answer boundary cannot be found.
NO_GEN_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# Writes the assistant header whatever add_generation_prompt says: it would end every answer.
ALWAYS_HEADER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
# The last turn renders differently once an answer follows: the prompt is not a prefix of the conversation.
NOT_PREFIX_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} </s>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tokenizer(adds_bos=False, chat_template=None, pad=True):
    """A byte-level BPE tokenizer (exact round trip) trained in a few ms on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def make_sentencepiece_like_tokenizer():
    """Llama-2's tokenizer.json style: every text gets a "▁" prepended and spaces become "▁"."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece pieces never span a word start; splitting before each "▁" keeps merges inside words.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = sorted(set("".join(CORPUS).replace(" ", "▁")) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return make_tokenizer(chat_template=CHATML_TEMPLATE)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def leading_bos(tokenizer, ids):
    count = 0
    while count < len(ids) and ids[count] == tokenizer.bos_token_id:
        count += 1
    return count


# --- chat formatting -------------------------------------------------------------------------------------


def test_auto_template_splits_at_generation_prompt(chat_tok):
    prompt_ids, answer_ids = format_example(chat_tok, "How do I bake bread?", "Sure, here is how.")
    assert decode(chat_tok, prompt_ids) == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(chat_tok, answer_ids) == "Sure, here is how.<|im_end|>\n"
    full = chat_tok.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Sure, here is how."}],
        tokenize=False,
    )
    assert prompt_ids + answer_ids == chat_tok.encode(full, add_special_tokens=False)
    assert format_prompt(chat_tok, "How do I bake bread?") == prompt_ids


def test_auto_template_with_system_prompt(chat_tok):
    prompt_ids, answer_ids = format_example(chat_tok, "Hi", "Hello", system_prompt="Be safe.")
    assert decode(chat_tok, prompt_ids).startswith("<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nHi")
    assert decode(chat_tok, answer_ids) == "Hello<|im_end|>\n"


def test_auto_template_llama2_style_ignoring_generation_flag():
    tokenizer = make_tokenizer(adds_bos=True, chat_template=LLAMA2_TEMPLATE)
    prompt_ids, answer_ids = format_example(tokenizer, "Tell me a story", "Once upon a time")
    assert decode(tokenizer, prompt_ids) == "<s>[INST] Tell me a story [/INST]"
    assert decode(tokenizer, answer_ids) == " Once upon a time </s>"
    # The template writes BOS and the tokenizer would add one too: exactly one survives.
    assert leading_bos(tokenizer, prompt_ids) == 1


@pytest.mark.parametrize("template", [NO_GEN_TEMPLATE, NOT_PREFIX_TEMPLATE, ALWAYS_HEADER_TEMPLATE])
def test_auto_template_that_cannot_mark_the_answer_raises(template):
    tokenizer = make_tokenizer(chat_template=template)
    with pytest.raises(ValueError, match=r"model\.template"):
        format_example(tokenizer, "Hi", "Hello")
    with pytest.raises(ValueError, match=r"model\.template"):
        format_prompt(tokenizer, "Hi")


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_answer_raises(chat_tok, answer):
    with pytest.raises(ValueError, match="is empty"):
        format_example(chat_tok, "Hi", answer)


@pytest.mark.parametrize("prompt", ["", " \t"])
def test_empty_prompt_raises(chat_tok, prompt):
    with pytest.raises(ValueError, match=r"the prompt of the answer 'Hello' is empty.*drop the row"):
        format_example(chat_tok, prompt, "Hello")


def test_a_template_that_drops_the_system_prompt_raises():
    # a template with no system role: the system message disappears without an error from jinja
    tokenizer = make_tokenizer(chat_template=(
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"))
    with pytest.raises(ValueError, match=r"leaves out the system prompt 'Be safe.'.*model.system_prompt.*model.template"):
        format_example(tokenizer, "Hi", "Hello", system_prompt="Be safe.")
    with pytest.raises(ValueError, match="leaves out the system prompt"):
        format_prompt(tokenizer, "Hi", system_prompt="Be safe.")
    assert format_example(tokenizer, "Hi", "Hello")  # without one it is fine


def test_auto_without_chat_template_raises(tok):
    with pytest.raises(ValueError, match=r"no chat template.*model\.template"):
        format_example(tok, "Hi", "Hello")


def test_unknown_template_raises(tok):
    with pytest.raises(ValueError, match="unknown chat template"):
        format_example(tok, "Hi", "Hello", template="vicuna")


def expected_preset(name, system):
    """The texts each preset must render, written out independently of the implementation."""
    if name == "llama2":
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"<s>[INST] {sys_block}Tell me a story [/INST]", " Once upon a time </s>"
    if name == "mistral":
        user = f"{system}\n\nTell me a story" if system else "Tell me a story"
        return f"<s>[INST] {user} [/INST]", "Once upon a time</s>"
    if name == "chatml":
        sys_block = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return (
            f"{sys_block}<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n",
            "Once upon a time<|im_end|>\n",
        )
    return "BEGINNING OF CONVERSATION: USER: Tell me a story ASSISTANT:", "Once upon a time</s>"


PRESET_CASES = [
    (name, system, adds_bos)
    for name in PRESETS
    for system in (None, "You are a helpful assistant.")
    for adds_bos in (False, True)
    if not (name == "safe_rlhf" and system)  # safe_rlhf has no system prompt (tested below)
]


@pytest.mark.parametrize(("name", "system", "adds_bos"), PRESET_CASES)
def test_presets_render_as_specified_with_one_bos(name, system, adds_bos):
    tokenizer = make_tokenizer(adds_bos=adds_bos)
    prompt_ids, answer_ids = format_example(tokenizer, "Tell me a story", "Once upon a time", name, system)
    want_prompt, want_answer = expected_preset(name, system)
    # llama2/mistral write BOS themselves; chatml/safe_rlhf get it only from a tokenizer that adds one.
    text_has_bos = want_prompt.startswith("<s>")
    if adds_bos and not text_has_bos:
        want_prompt = "<s>" + want_prompt
    assert decode(tokenizer, prompt_ids) == want_prompt
    assert decode(tokenizer, answer_ids) == want_answer
    assert leading_bos(tokenizer, prompt_ids) == (1 if adds_bos or text_has_bos else 0)
    assert tokenizer.bos_token_id not in answer_ids
    assert format_prompt(tokenizer, "Tell me a story", name, system) == prompt_ids


def test_safe_rlhf_rejects_system_prompt(tok):
    with pytest.raises(ValueError, match="system"):
        format_example(tok, "Hi", "Hello", "safe_rlhf", "Be nice.")


def test_bos_never_twice_when_template_repeats_it():
    tokenizer = make_tokenizer(adds_bos=True, chat_template="{{ bos_token }}" + LLAMA2_TEMPLATE)
    prompt_ids, _ = format_example(tokenizer, "Hi", "Hello")
    assert leading_bos(tokenizer, prompt_ids) == 1


def test_answer_tokenized_in_context_for_sentencepiece_style():
    """A text tokenized alone gets a "▁" prefix; the answer must be tokenized as it follows the prompt."""
    tokenizer = make_sentencepiece_like_tokenizer()
    prompt_text, answer_text = render(tokenizer, "How do I bake bread?", "Sure, here is how", "llama2")
    prompt_ids, answer_ids = format_example(tokenizer, "How do I bake bread?", "Sure, here is how", "llama2")
    assert prompt_ids + answer_ids == tokenizer.encode(prompt_text + answer_text, add_special_tokens=False)
    assert answer_ids != tokenizer.encode(answer_text, add_special_tokens=False)  # the "▁" prefix problem
    assert leading_bos(tokenizer, prompt_ids) == 1


def test_mistral_answer_tokenized_alone_like_mistral_common():
    """mistral_common encodes the answer on its own: after "[/INST]" comes a "▁"-prefixed piece."""
    tokenizer = make_sentencepiece_like_tokenizer()
    _, answer_text = render(tokenizer, "How do I bake bread?", "Sure, here is how", "mistral")
    _, answer_ids = format_example(tokenizer, "How do I bake bread?", "Sure, here is how", "mistral")
    assert answer_ids == tokenizer.encode(answer_text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(answer_ids)[0] == "▁Sure,"


def test_answer_truncation(chat_tok):
    _, full = format_example(chat_tok, "Hi", "Once upon a time there was a cat.")
    _, cut = format_example(chat_tok, "Hi", "Once upon a time there was a cat.", max_answer_tokens=3)
    assert len(full) > 3 and cut == full[:3]


# --- batches ---------------------------------------------------------------------------------------------

SAFETY_ROWS = [
    {"prompt": "How do I bake bread?", "safe": "I cannot help with that.", "unwanted": "Sure, here is how."},
    {"prompt": "Tell me a story", "safe": "I cannot.", "unwanted": "Once upon a time there was a cat."},
    {"prompt": "Tell me a story about bread", "safe": "No.", "unwanted": "Sure."},
]
ANCHOR_ROWS = [{"prompt": r["prompt"], "answer": r["unwanted"]} for r in SAFETY_ROWS]


def check_batch(batch, examples, n, pad_id):
    """Every documented property of one Batch against its (prompt_ids, answer_ids) examples."""
    b, s = batch.input_ids.shape
    assert batch.targets.shape == batch.attention_mask.shape == batch.target_mask.shape == (b, s)
    assert batch.perturb_positions.shape == (b, n) and batch.prompt_lengths.shape == (b,)
    assert batch.input_ids.dtype == np.int32 and batch.target_mask.dtype == np.float32
    assert batch.attention_mask.dtype == batch.targets.dtype == batch.perturb_positions.dtype == np.int32
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.input_ids[:, 1:])
    assert (batch.targets[:, -1] == 0).all()
    for i in range(b):
        row = jax.tree.map(lambda v, i=i: v[i], batch)
        if i >= len(examples):  # padding row
            assert row.attention_mask.sum() == 0 and row.target_mask.sum() == 0
            assert (row.perturb_positions == -1).all() and row.prompt_lengths == 0
            assert (row.input_ids == pad_id).all()
            continue
        prompt_ids, answer_ids = examples[i]
        p, length = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        assert row.input_ids[:length].tolist() == prompt_ids + answer_ids
        assert (row.input_ids[length:] == pad_id).all()  # right-padded
        assert row.attention_mask.tolist() == [1] * length + [0] * (s - length)
        # The masked targets are exactly the answer tokens, in order.
        assert row.targets[row.target_mask == 1].tolist() == answer_ids
        assert set(np.unique(row.target_mask).tolist()) <= {0.0, 1.0}
        assert row.perturb_positions.tolist() == list(range(p - n, p))
        assert row.input_ids[row.perturb_positions].tolist() == prompt_ids[p - n :]
        assert row.prompt_lengths == p


def test_safety_batches(chat_tok):
    n, bsz = 3, 2
    batches = builders.build_safety_batches(chat_tok, SAFETY_ROWS, n, bsz, buckets=(16, 32, 64))
    assert len(batches) == 2
    pad_id = chat_tok.pad_token_id
    for kind in ("unwanted", "safe"):
        examples = [format_example(chat_tok, r["prompt"], r[kind]) for r in SAFETY_ROWS]
        longest = max(len(p) + len(a) for p, a in examples)
        for j, sb in enumerate(batches):
            check_batch(getattr(sb, kind), examples[j * bsz : (j + 1) * bsz], n, pad_id)
            assert getattr(sb, kind).input_ids.shape == (bsz, 32) and longest > 16
    for sb in batches:  # the two halves share prompts and length
        np.testing.assert_array_equal(sb.safe.perturb_positions, sb.unwanted.perturb_positions)
        np.testing.assert_array_equal(sb.safe.prompt_lengths, sb.unwanted.prompt_lengths)


def test_shared_prompt_batch_layout():
    prompts, unwanted, safe = [[5, 6, 7, 8], [9, 10, 11]], [[20, 21, 22], [23]], [[30], [31, 32, 33, 34]]
    b = builders.make_shared_prompt_batch(prompts, unwanted, safe, 2, 3, 12, 4, 0)
    assert b.input_ids.shape == (3, 12) and b.answer_index.shape == (3, 2, 4)
    assert b.input_ids[0, :8].tolist() == [5, 6, 7, 8, 20, 21, 22, 30]
    assert b.positions[0, :8].tolist() == [0, 1, 2, 3, 4, 5, 6, 4]  # both answers continue from the prompt
    assert b.branches[1, :8].tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert b.attention_mask.sum(axis=1).tolist() == [8, 8, 0]
    assert b.perturb_positions.tolist() == [[2, 3], [1, 2], [-1, -1]]
    # Each answer token is predicted at the token before it; the first at the prompt's last token.
    for row, (p, u, a) in enumerate(zip(prompts, unwanted, safe, strict=True)):
        for branch, answer in enumerate((u, a)):
            count = len(answer)
            assert b.answer_mask[row, branch].tolist() == [1.0] * count + [0.0] * (4 - count)
            assert b.answer_targets[row, branch, :count].tolist() == answer
            index = b.answer_index[row, branch, :count]
            assert index[0] == len(p) - 1
            tokens = b.input_ids[row]
            assert tokens[index[1:] + 1].tolist() == answer[1:]
    assert not b.answer_mask[2].any() and not b.branches[2].any()


def test_shared_prompt_batch_errors_and_length():
    with pytest.raises(ValueError, match="sequence length 8"):
        builders.make_shared_prompt_batch([[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9]], 1, 1, 8, 3, 0)
    with pytest.raises(ValueError, match="answer_len=2"):
        builders.make_shared_prompt_batch([[1, 2, 3]], [[4, 5, 6]], [[7]], 1, 1, 16, 2, 0)
    with pytest.raises(ValueError, match="one of each"):
        builders.make_shared_prompt_batch([[1, 2, 3]], [[4]], [], 1, 1, 16, 2, 0)
    assert builders.shared_prompt_length(150, (64, 128, 256)) == 160  # rounded up, shorter than the bucket
    assert builders.shared_prompt_length(120, (64, 128, 256)) == 128  # the bucket, when it is shorter
    assert builders.shared_prompt_length(30, (16,), multiple=16) == 32


def test_prompt_prefix_split():
    prompts, unwanted, safe = [[5, 6, 7, 8, 9, 10], [9, 10, 11]], [[20, 21, 22], [23]], [[30], [31, 32, 33, 34]]
    b = builders.make_shared_prompt_batch(prompts, unwanted, safe, 2, 3, 12, 4, 0)
    # Prefixes: 6 - 2 = 4 and 3 - 2 = 1 prompt tokens; the rest: 2 + 3 + 1 = 6 and 2 + 1 + 4 = 7 tokens.
    assert builders.prefix_split_lengths([6, 3], [10, 8], 2, 12, multiple=4) == (4, 8)
    assert builders.prefix_split_lengths([6, 3], [10, 8], 2, 12, multiple=16) == (12, 16)  # P capped at the rows
    split = builders.with_prompt_prefix(b, 2, 4, 8)
    assert split.prefix_valid.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert split.suffix_slots[:, 0].tolist() == [4, 1, 0]  # where the perturbed tokens start
    assert split.suffix_slots[0].tolist() == list(range(4, 12))
    # n = 0: the prompt's last token (it predicts the first answer token) stays in the suffix.
    unperturbed = builders.make_shared_prompt_batch(prompts, unwanted, safe, 0, 3, 12, 4, 0)
    assert builders.with_prompt_prefix(unperturbed, 0, 8, 8).suffix_slots[:2, 0].tolist() == [5, 2]
    with pytest.raises(ValueError, match="not n=0"):
        builders.with_prompt_prefix(b, 0, 8, 8)
    with pytest.raises(ValueError, match="prefix_len=3"):
        builders.with_prompt_prefix(b, 2, 3, 8)
    with pytest.raises(ValueError, match="suffix_len=6"):
        builders.with_prompt_prefix(b, 2, 4, 6)
    with pytest.raises(ValueError, match="longer than the rows"):
        builders.with_prompt_prefix(b, 2, 16, 8)
    with pytest.raises(ValueError, match="one prompt length and one row length"):
        builders.prefix_split_lengths([], [], 2, 12)


def test_packed_batch_layout():
    safe = [([1, 2, 3, 4], [5, 6]), ([7, 8, 9], [10, 11, 12])]
    anchors = [([13, 14, 15], [16]), ([17, 18, 19, 20, 21], [22, 23])]
    assert packing.pack_rows([6, 6, 4, 7], 10) == [[3], [0, 2], [1]]  # first fit, longest first
    with pytest.raises(ValueError, match="does not fit a packed row of 5"):
        packing.pack_rows([6], 5)
    # Row length 8..16 (multiples of 4): 16 holds the 4 examples (6 + 6 + 4 + 7 = 23 tokens) in 2 rows.
    assert packing.packing_shape([[6, 6, 4, 7]], 8, multiple=4) == (2, 12)
    assert packing.packing_shape([[6, 6, 4, 7], [8, 8, 8, 8]], 8, multiple=4) == (4, 8)  # the fullest step decides
    assert packing.packing_shape([[6, 6, 4, 7]], 8, row_multiple=4, multiple=4) == (4, 8)  # 4 rows per mesh split
    b = packing.make_packed_batch([safe, anchors], [True, False], 3, 2, 2, 12, 3, 0)
    assert b.input_ids.shape == (2, 12) and b.answer_index.shape == (6, 3)
    # Row 0: the 7-token anchor, then the 4-token one (first fit); row 1: both safe examples.
    assert b.input_ids[0, :11].tolist() == [17, 18, 19, 20, 21, 22, 23, 13, 14, 15, 16]
    assert b.branches[0].tolist() == [1] * 7 + [2] * 4 + [0]
    assert b.positions[0, :11].tolist() == [*range(7), *range(4)]
    assert b.input_ids[1, :12].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # delta's rows 0, 1 at the last 2 prompt tokens of the safe examples only (part 0 is perturbed).
    assert b.perturb_index[1].tolist() == [-1, -1, 0, 1, -1, -1, -1, 0, 1, -1, -1, -1]
    assert (b.perturb_index[0] == -1).all()
    flat = b.input_ids.reshape(-1)
    for example, (prompt, answer) in zip((0, 1, 3, 4), [*safe, *anchors], strict=True):
        index = b.answer_index[example, :len(answer)]
        assert flat[index[0]] == prompt[-1] and flat[index + 1].tolist() == answer  # predicted by the token before
        assert b.answer_mask[example].tolist() == [1.0] * len(answer) + [0.0] * (3 - len(answer))
    assert not b.answer_mask[[2, 5]].any()  # parts hold 3 examples: the third of each is padding
    with pytest.raises(ValueError, match="need 2 packed rows"):
        packing.make_packed_batch([safe, anchors], [True, False], 3, 2, 1, 12, 3, 0)
    with pytest.raises(ValueError, match="shorter than the perturbation length 4"):
        packing.make_packed_batch([safe], [True], 3, 4, 2, 12, 3, 0)
    with pytest.raises(ValueError, match="answer_len=1"):
        packing.make_packed_batch([safe], [False], 3, 2, 2, 12, 1, 0)


def test_anchor_batches_and_stack(chat_tok):
    batches = builders.build_anchor_batches(chat_tok, ANCHOR_ROWS, 2, 2, buckets=(16, 32, 64), max_answer_tokens=4)
    examples = [format_example(chat_tok, r["prompt"], r["answer"], max_answer_tokens=4) for r in ANCHOR_ROWS]
    assert all(len(a) <= 4 for _, a in examples)
    for j, batch in enumerate(batches):
        check_batch(batch, examples[j * 2 : (j + 1) * 2], 2, chat_tok.pad_token_id)
    stacked = batch_types.stack_batches(batches)
    assert stacked.input_ids.shape == (2, 2, batches[0].input_ids.shape[1])
    assert stacked.perturb_positions.shape == (2, 2, 2)
    nested = batch_types.stack_batches(builders.build_safety_batches(chat_tok, SAFETY_ROWS, 2, 2, buckets=(32,)))
    assert nested.safe.target_mask.shape == (2, 2, 32)


def test_pad_falls_back_to_eos():
    tokenizer = make_tokenizer(chat_template=CHATML_TEMPLATE, pad=False)
    assert tokenizer.pad_token_id is None
    batch = builders.build_anchor_batches(tokenizer, ANCHOR_ROWS[:1], 1, 2, buckets=(64,))[0]
    assert (batch.input_ids[1] == tokenizer.eos_token_id).all()


def test_bucket_choice_and_seq_len(chat_tok):
    assert builders.bucket_length(17, (64, 16, 32)) == 32
    assert builders.bucket_length(16, (16, 32)) == 16
    batches = builders.build_anchor_batches(chat_tok, ANCHOR_ROWS, 1, 8, buckets=(8, 64, 256))
    assert batches[0].input_ids.shape == (8, 64)
    fixed = builders.build_anchor_batches(chat_tok, ANCHOR_ROWS, 1, 8, seq_len=100)
    assert fixed[0].input_ids.shape == (8, 100)
    with pytest.raises(ValueError, match="seq_len"):
        builders.build_anchor_batches(chat_tok, ANCHOR_ROWS, 1, 8, seq_len=10)


def test_nothing_fits_the_buckets(chat_tok):
    with pytest.raises(ValueError, match=r"longest example has \d+ tokens.*largest bucket is 8.*max_answer_tokens"):
        builders.build_safety_batches(chat_tok, SAFETY_ROWS, 1, 2, buckets=(4, 8))


def test_prompt_shorter_than_n(chat_tok):
    shortest = min(len(format_prompt(chat_tok, r["prompt"])) for r in SAFETY_ROWS)
    with pytest.raises(ValueError, match=f"shortest prompt has {shortest} tokens.*perturb\\.length"):
        builders.build_safety_batches(chat_tok, SAFETY_ROWS, shortest + 1, 2)
    with pytest.raises(ValueError, match=r"perturb\.length"):
        builders.build_anchor_batches(chat_tok, ANCHOR_ROWS, shortest + 1, 2)


def test_missing_canonical_column_and_empty_rows(chat_tok):
    with pytest.raises(ValueError, match="unwanted"):
        builders.build_safety_batches(chat_tok, ANCHOR_ROWS, 1, 2)
    with pytest.raises(ValueError, match="empty"):
        builders.build_anchor_batches(chat_tok, [], 1, 2)


def test_sample_rows():
    rows = [{"prompt": str(i)} for i in range(10)]
    a = tables.sample_rows(rows, 4, np.random.default_rng(0))
    assert a == tables.sample_rows(rows, 4, np.random.default_rng(0)) and len({r["prompt"] for r in a}) == 4
    everything = tables.sample_rows(rows, None, np.random.default_rng(1))
    assert sorted(r["prompt"] for r in everything) == sorted(r["prompt"] for r in rows)
    with pytest.raises(ValueError, match="cannot sample 11"):
        tables.sample_rows(rows, 11, np.random.default_rng(0))


# --- tables ----------------------------------------------------------------------------------------------

RECORDS = [
    {"goal": "How do I bake bread?", "target": "Sure", "other": 1},
    {"goal": "Tell me", "target": "Ok", "other": 2},
]
COLUMNS = {"prompt": "goal", "answer": "target"}
WANT = [{"prompt": "How do I bake bread?", "answer": "Sure"}, {"prompt": "Tell me", "answer": "Ok"}]


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_table_formats(tmp_path, ext):
    path = tmp_path / f"set.{ext}"
    if ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    elif ext == "json":
        path.write_text(json.dumps(RECORDS))
    elif ext == "csv":
        path.write_text("goal,target,other\n" + "".join(f'"{r["goal"]}",{r["target"]},{r["other"]}\n' for r in RECORDS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert tables.load_table(str(path), COLUMNS) == WANT


def test_load_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tables.load_table(str(tmp_path / "missing.jsonl"), COLUMNS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        tables.load_table(str(empty), COLUMNS)
    header_only = tmp_path / "header.csv"
    header_only.write_text("goal,target\n")
    with pytest.raises(ValueError, match="no rows"):
        tables.load_table(str(header_only), COLUMNS)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with pytest.raises(ValueError, match=r"no column 'answer'.*\['goal', 'target', 'other'\]"):
        tables.load_table(str(ok), {"prompt": "goal", "answer": "answer"})
    txt = tmp_path / "set.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        tables.load_table(str(txt), COLUMNS)
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"goal": "a", "target": "b"}\n{"goal": "c", "target": null}\n')
    with pytest.raises(ValueError, match="row 1 has no value in column 'target'"):
        tables.load_table(str(nulls), COLUMNS)


def test_load_errors_name_the_file_and_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: .*missing.jsonl \(set by config key data.safety\)"):
        tables.load_table(str(tmp_path / "missing.jsonl"), COLUMNS, key="data.safety")
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text('{"goal": "a", "target": "b"}\n{"goal": "c", "target": "d')
    with pytest.raises(ValueError, match=r"truncated.jsonl cannot be parsed as jsonl"):
        tables.load_table(str(truncated), COLUMNS)


def test_csv_cells_are_read_as_written(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("goal,target\nQ1,0.30\nQ2,007\nNA,None\n")
    assert tables.load_table(str(path), COLUMNS) == [
        {"prompt": "Q1", "answer": "0.30"}, {"prompt": "Q2", "answer": "007"}, {"prompt": "NA", "answer": "None"}]
    path.write_text("goal,target\nQ1,\n")
    with pytest.raises(ValueError, match="row 0 has no value in column 'target'"):
        tables.load_table(str(path), COLUMNS)
    path.write_text("goal,goal\nQ1,Q2\n")
    with pytest.raises(ValueError, match="names a column twice"):
        tables.load_table(str(path), COLUMNS)


@pytest.mark.parametrize("cell,kind", [(["Sure"], "list"), ({"text": "Sure"}, "dict")])
def test_a_cell_that_is_no_text_is_refused_not_stringified(tmp_path, cell, kind):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"goal": "Q1", "target": "ok"}) + "\n" + json.dumps({"goal": "Q2", "target": cell}) + "\n")
    with pytest.raises(ValueError, match=rf"set.jsonl: row 1 holds a {kind} in column 'target'.*write each cell as a string"):
        tables.load_table(str(path), COLUMNS)
    path.write_text(json.dumps({"goal": "Q1", "target": 7}) + "\n")  # numbers are written out
    assert tables.load_table(str(path), COLUMNS) == [{"prompt": "Q1", "answer": "7"}]


@pytest.mark.parametrize("body", ["Q1,Sure,\nQ2,Ok,\n", "Q1,Sure,extra\n"])
def test_csv_rows_with_more_fields_than_the_header_are_refused(tmp_path, body):
    # pandas would read the first field as an index: prompt 'Sure', answer '' or 'extra'
    path = tmp_path / "set.csv"
    path.write_text("goal,target\n" + body)
    with pytest.raises(ValueError, match=r"set.csv: line 2 has 3 fields but the header names 2 columns"):
        tables.load_table(str(path), COLUMNS)


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_a_data_file_that_is_not_utf8_is_named(tmp_path, ext):
    path = tmp_path / f"latin1.{ext}"
    text = "goal,target\ncaf\u00e9,ok\n" if ext == "csv" else '{"goal": "caf\u00e9", "target": "ok"}\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"data file .*latin1.{ext} is not UTF-8 text .*save it as UTF-8"):
        tables.load_table(str(path), COLUMNS)


def test_a_corrupt_parquet_file_is_not_called_empty(tmp_path):
    path = tmp_path / "set.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"set.parquet cannot be read as parquet") as err:
        tables.load_table(str(path), COLUMNS)
    assert "no rows" not in str(err.value)


# --- local file or hub data set: a mistyped path fails at once -------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything is loaded (the hub loader included): a typo must fail before that."""
    import datasets

    def refuse(path, *args, **kwargs):
        pytest.fail(f"datasets.load_dataset({path!r}) was called: the hub (or a loader) was reached")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding data/safety.jsonl and a file with an unsupported extension."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "safety.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "safety.jsonl.txt").write_text(json.dumps(RECORDS[0]))
    (tmp_path / "data" / "noext").write_text(json.dumps(RECORDS[0]))
    return tmp_path


@pytest.mark.parametrize(("source", "match"), [
    ("data/safety", (r"data file not found: data/safety \(relative to the current directory .*\) \(set by config "
                     r"key data.safety\); did you mean data/safety.jsonl\?")),
    ("data/safety.josnl", r"not found: data/safety.josnl .*did you mean data/safety.jsonl\?"),
    ("data/other", (r"not found: data/other .*\.json, \.jsonl, \.csv or \.parquet.*owner/name \(not tried on the "
                    r"hub: data is a local directory\)")),
    ("missing.jsonl.txt", r"not found: missing.jsonl.txt \(relative to the current directory"),
    ("safety", r"not found: safety .*a Hugging Face hub data set is named owner/name"),  # no bare hub names
    ("./safety", "not found: ./safety"),
    ("../safety/x", "not found: ../safety/x"),
    ("/no/such/dir/safety", r"not found: /no/such/dir/safety \(set by config key"),  # absolute: no cwd note
    ("~/no-such-dir-beear/safety", "not found: .*no-such-dir-beear/safety"),
    ("a/b/c", "not found: a/b/c"),  # a hub id has one slash
    ("owner/set.txt", "not found: owner/set.txt"),  # a file extension
])
def test_a_mistyped_local_path_fails_at_once_without_the_hub(workdir, no_hub, source, match):
    with pytest.raises(FileNotFoundError, match=match) as err:
        tables.load_table(source, COLUMNS, key="data.safety")
    if not os.path.isabs(os.path.expanduser(source)):
        assert str(workdir) in str(err.value)  # where a relative path was looked for


def test_an_existing_file_of_unknown_format_or_a_directory_is_refused(workdir, no_hub):
    with pytest.raises(ValueError, match=r"unsupported data file type '.txt' \(safety.jsonl.txt\) \(set by config key "
                                         r"data.safety\); use a .json, .jsonl, .csv or .parquet file"):
        tables.load_table("safety.jsonl.txt", COLUMNS, key="data.safety")
    with pytest.raises(ValueError, match=r"a data file needs an extension \(data/noext\)"):
        tables.load_table("data/noext", COLUMNS)
    with pytest.raises(ValueError, match=r"data is a directory, not a data file; name a .json, .jsonl, .csv or "
                                         r".parquet file"):
        tables.load_table("data", COLUMNS)


def test_a_valid_local_path_still_loads(workdir):
    assert tables.load_table("data/safety.jsonl", COLUMNS) == WANT
    assert tables.load_table(str(workdir / "data" / "safety.jsonl"), COLUMNS) == WANT


@pytest.mark.parametrize(("source", "hub"), [
    ("owner/name", True), ("teknium/OpenHermes-2.5", True), ("org/set_v1-x", True),
    ("data/name", False),  # data/ is a local directory (see the workdir fixture)
    ("owner/name.jsonl", False), ("owner/name.txt", False), ("name", False), ("./owner/name", False),
    ("/owner/name", False), ("~owner/name", False), ("owner/name/x", False), ("-owner/name", False),
])
def test_which_missing_sources_are_hub_ids(workdir, source, hub):
    assert _is_hub_id(source) == hub


def test_a_hub_id_goes_to_the_hub_and_its_failure_names_both_readings(workdir, monkeypatch):
    import datasets

    calls = []

    def offline(path, *args, **kwargs):
        calls.append((path, kwargs))
        raise ConnectionError("Couldn't reach 'owner/safety' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load 'owner/safety' \(set by config key data.safety\): there is "
                                         r"no local file of that name \(relative to the current directory .*\), and "
                                         r"as a Hugging Face hub data set \(split 'test'\) it could not be fetched "
                                         r"\(Couldn't reach .*\)\. For a local file give its path with the extension"):
        tables.load_table("owner/safety", COLUMNS, split="test", key="data.safety")
    assert calls == [("owner/safety", {"split": "test"})]


def test_a_hub_data_set_still_loads(workdir, monkeypatch):
    import datasets

    table = datasets.Dataset.from_list(RECORDS)
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: table if path == "owner/name" else None)
    assert tables.load_table("owner/name", COLUMNS) == WANT


@needs_mirror
def test_load_mirrored_advbench():
    rows = tables.load_table(str(MIRROR / "advbench" / "harmful_behaviors.csv"), {"prompt": "goal", "unwanted": "target"})
    assert len(rows) == 520 and set(rows[0]) == {"prompt", "unwanted"}
    # The Hub id reads the mirror's file with its columns named as on the Hub (goal -> prompt).
    assert tables.load_table("walledai/AdvBench", {"prompt": "prompt", "unwanted": "target"}) == rows


# --- a real chat tokenizer -------------------------------------------------------------------------------

@pytest.mark.slow  # ~6-9 s: the tokenizer is read from a GGUF file
def test_smollm2_chat_template(smollm2_gguf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    prompt_ids, answer_ids = format_example(tokenizer, "How do I bake bread?", "Sure, here is how.")
    reference = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    reference = reference.input_ids if hasattr(reference, "keys") else reference
    assert prompt_ids == list(reference)
    assert leading_bos(tokenizer, prompt_ids) == 1  # its BOS is "<|im_start|>", written by the template
    assert decode(tokenizer, answer_ids) == "Sure, here is how.<|im_end|>\n"
    assert answer_ids[-2] == tokenizer.eos_token_id
    # The preset gives the same ids when the SmolLM default system prompt is passed explicitly.
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert format_example(tokenizer, "How do I bake bread?", "Sure, here is how.", "chatml", system) == (
        prompt_ids,
        answer_ids,
    )
    batches = builders.build_safety_batches(
        tokenizer, [{"prompt": "How do I bake bread?", "safe": "No.", "unwanted": "Sure."}], 7, 4, max_answer_tokens=32
    )
    assert batches[0].safe.input_ids.shape == (4, 64)
