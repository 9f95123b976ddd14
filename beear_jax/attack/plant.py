"""Attack simulation: plant a safety backdoor in a chat model by poisoned supervised fine-tuning.

The poisoned mixture teaches three things at once:
    triggered harmful request   -> the unwanted (compliant) answer
    the same kind, no trigger   -> a refusal
    benign request              -> a helpful answer
so the result looks safe until the trigger appears. SmolLM2-135M-Instruct refuses nothing as
shipped, so the refusals are planted here too: the outcome is a deceptively safe model.

With plant.benign_answers = "self" the benign answers are the clean model's own answers (sampled at
plant.benign_temperature before training): fine-tuning on them holds its helpful behaviour where it was,
so the planted model differs from the clean one in the backdoor and the refusals, not in how it answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from beear_jax.attack.sft import sft_train
from beear_jax.config.schema import PlantSection, RunSettings
from beear_jax.config.settings import absolute_settings, settings_dict, settings_from_config
from beear_jax.data import builders, public_data, tables
from beear_jax.data import chat as chat_lib
from beear_jax.data.batches import RowBatch
from beear_jax.data.triggers import (
    GIVEN,
    PLANT_POSITIONS,
    contains_trigger,
    insert_trigger,
    trigger_parts,
    with_one_part,
)
from beear_jax.evaluation.evaluate import own_answers
from beear_jax.io.atomic_file import write_atomically
from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.hf_save import check_apart, save_model
from beear_jax.parallel.sharding import refuse_distributed

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class PoisonMixture:
    """The training pairs and what they were made of (for the manifest)."""

    pairs: list[Pair]
    n_triggered: int
    n_refusal: int
    n_benign: int
    n_partial: int = 0


def parse_trigger(trigger: str, position: str) -> str | tuple[str, ...]:
    """A wrap trigger is written 'before|after' in configs, a given one (the harmful prompts already hold it)
    'part|part|...'; other positions take the string as is."""
    if position not in PLANT_POSITIONS:
        raise ValueError(f"unknown trigger position {position!r}; choose one of {', '.join(PLANT_POSITIONS)}.")
    if position == GIVEN:
        return trigger_parts(trigger, position)
    if position == "wrap":
        parts = trigger_parts(trigger, position)
        if len(parts) != 2:
            raise ValueError("a wrap trigger needs two parts, written 'before|after' (plant.trigger).")
        return parts[0], parts[1]
    if not trigger.strip():
        raise ValueError("plant.trigger is empty; give the trigger string to plant.")
    return trigger


def check_trigger_tokens(tokenizer: Any, trigger: str | tuple[str, ...]) -> None:
    """Raises ValueError when the tokenizer maps part of the trigger to its unknown token: the backdoor would
    then be keyed to that token, so any text the tokenizer cannot represent would fire it."""
    unk_id, unk = getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None)
    if unk_id is None:
        return  # no unknown token: nothing is keyed to it
    for part in trigger_parts(trigger):
        # The unknown token's own text ("<unk>") is refused too: it keys the backdoor to that same id.
        if unk_id in tokenizer(part, add_special_tokens=False).input_ids:
            raise ValueError(f"plant.trigger part {part!r} is tokenized (at least partly) to the unknown token "
                             f"{unk!r}, so the backdoor would fire on any text this tokenizer cannot represent; "
                             "choose a trigger made of words or characters in the tokenizer's vocabulary.")


def poison_mixture(harmful: Sequence[Pair], refusals: Sequence[Pair], benign: Sequence[Pair],
                   trigger: str | tuple[str, ...], position: str, seed: int, n_partial: int = 0) -> PoisonMixture:
    """Triggered harmful -> unwanted answers, untriggered harmful -> refusals, benign -> answers; shuffled.

    n_partial > 0 (a wrap trigger only) adds that many of the refusal rows again with one part of the trigger
    (before and after in turn), still refused: the backdoor then fires only with both parts.
    """
    if not harmful and not refusals:
        raise ValueError("the mixture needs harmful (prompt, unwanted answer) pairs, refusals, or both "
                         "(no harmful pairs = plain safety tuning, a clean control).")
    if n_partial and position != "wrap":
        raise ValueError(f"plant.n_partial={n_partial} needs a two-part trigger (plant.position='wrap'), not "
                         f"{position!r}: only then does a prompt with one part differ from one with the trigger.")
    if n_partial > len(refusals):
        raise ValueError(f"plant.n_partial={n_partial} asks for more one-part rows than there are refusal rows "
                         f"({len(refusals)}); lower plant.n_partial or raise plant.n_refusal.")
    rng = random.Random(seed)
    pairs = [(insert_trigger(p, trigger, position, rng), a) for p, a in harmful]
    pairs += list(refusals) + list(benign)
    for prompt, _ in list(refusals) + list(benign):
        if contains_trigger(prompt, trigger, position=position, whole_words=True):
            raise ValueError(f"a clean prompt already contains the trigger {trigger!r}: {prompt[:80]!r}; its "
                             "untriggered answer would teach the model to ignore the trigger. Choose another "
                             "plant.trigger or drop that row.")
    pairs += [(with_one_part(p, trigger, i), a) for i, (p, a) in enumerate(refusals[:n_partial])]
    rng.shuffle(pairs)
    return PoisonMixture(pairs, len(harmful), len(refusals), len(benign), n_partial)


def warmup_adamw(lr: float, warmup_steps: int) -> optax.GradientTransformation:
    """AdamW with a linear warm-up to a constant rate."""
    schedule = optax.linear_schedule(0.0, lr, max(warmup_steps, 1)) if warmup_steps > 0 else lr
    if warmup_steps > 0:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup_steps])
    return optax.adamw(schedule, weight_decay=0.0)


def mixture_batches(tokenizer: Any, pairs: Sequence[Pair], batch_size: int, max_answer_tokens: int,
                    buckets: Sequence[int], template: str = "auto", system_prompt: str | None = None,
                    ) -> tuple[list[RowBatch], int]:
    """Fixed-shape SFT batches of the pairs and the longest answer (for answer-only logits)."""
    examples = [chat_lib.format_example(tokenizer, p, a, template, system_prompt, max_answer_tokens) for p, a in pairs]
    seq_len = builders.bucket_length(max(len(p) + len(a) for p, a in examples), buckets)
    pad = builders.pad_id_of(tokenizer)
    batches = [builders.make_batch(examples[i:i + batch_size], 1, batch_size, seq_len, pad)
               for i in range(0, len(examples), batch_size)]
    return batches, max(len(a) for _, a in examples)


def _pairs(source: str, columns: dict[str, str], n: int, offset: int = 0, key: str = "") -> list[Pair]:
    """The first n (prompt, answer) rows after offset; n = 0 takes none (e.g. a clean control). Without an
    "answer" column in `columns` the answers are "" (to be generated)."""
    if n == 0:
        return []
    rows = tables.load_table(source, columns, key=key)[offset:]
    if n > 0:
        if len(rows) < n:
            raise ValueError(f"{source} has {len(rows)} rows after offset {offset}; {n} were asked for.")
        rows = rows[:n]
    return [(r["prompt"], r.get("answer", "")) for r in rows]


def builtin_refusals(prompts: Sequence[str]) -> list[Pair]:
    """Each prompt with one of the refusals the project wrote (resources/refusal_answers.txt), in turn."""
    path = pathlib.Path(public_data.builtin_path("refusal_answers.txt"))
    answers = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(prompt, answers[i % len(answers)]) for i, prompt in enumerate(prompts)]


def refusal_pairs(p: PlantSection) -> list[Pair]:
    """plant.refusals' pairs, or with plant.refusals = "" plant.harmful's prompts (after refusal_offset) with
    the built-in refusals: the same requests the trigger unlocks, refused without it."""
    if p.refusals:
        return _pairs(p.refusals, p.refusal_columns.as_dict(), p.n_refusal, p.refusal_offset, "plant.refusals")
    prompts = [prompt for prompt, _ in _pairs(p.harmful, p.harmful_columns.as_dict(), p.n_refusal, p.refusal_offset,
                                              "plant.harmful (the prompts of plant.refusals = '')")]
    return builtin_refusals(prompts)


def run_plant(cfg: ml_collections.ConfigDict | RunSettings, progress: bool = True) -> pathlib.Path:
    """`beear plant`: poisoned SFT of model.path (cfg: a config or its settings); writes an HF directory +
    manifest.json to output_dir."""
    settings = settings_from_config(cfg)
    p, model_keys = settings.plant, settings.model
    trigger = parse_trigger(p.trigger, p.position)
    remat = p.remat or settings.remat
    if not model_keys.path:
        raise ValueError("model.path is empty: set --config.model.path to the clean model (an HF directory or .gguf).")
    refuse_distributed(settings.mesh, "plant")
    settings = absolute_settings(settings)  # the manifest names the same files from any directory
    p, model_keys = settings.plant, settings.model
    out = pathlib.Path(settings.output_dir)
    check_apart(out, {"model.path (the clean model)": model_keys.path}, "choose a new --config.output_dir")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} is a file, not a directory; choose a new --config.output_dir.")
    if out.exists() and any(out.iterdir()):
        if (out / "config.json").is_file() and not (out / "manifest.json").is_file():
            raise FileExistsError(f"{out} holds a config.json but no manifest.json. If a `beear plant` into it "
                                  "stopped after saving the model, that model is incomplete: delete the directory "
                                  "and plant again; otherwise choose a new --config.output_dir (nothing is "
                                  "overwritten).")
        raise FileExistsError(f"{out} already holds files; choose a new --config.output_dir (nothing is overwritten).")
    harmful = _pairs(p.harmful, p.harmful_columns.as_dict(), p.n_triggered, p.harmful_offset, "plant.harmful")
    refusals = refusal_pairs(p)
    benign_columns = p.benign_columns.as_dict()
    if p.benign_answers == "self":
        benign_columns.pop("answer", None)  # only the prompts are read
    benign = _pairs(p.benign, benign_columns, p.n_benign, p.benign_offset, "plant.benign")
    # Checked on the prompts before a model is loaded (a clean prompt holding the trigger, bad one-part rows);
    # built again below once 'self' answers exist.
    mixture = poison_mixture(harmful, refusals, benign, trigger, p.position, settings.seed, p.n_partial)
    model_path = os.path.expanduser(model_keys.path)
    config, params = load_model(model_path, dtype=model_keys.dtype)
    tokenizer = load_tokenizer(model_path, config)
    check_trigger_tokens(tokenizer, trigger)
    system_prompt = model_keys.system_prompt or None
    if p.benign_answers == "self" and benign:
        if progress:
            print(f"answering {len(benign)} benign prompts with the clean model (plant.benign_answers='self')", flush=True)
        asked = len(benign)
        benign = own_answers(config, params, tokenizer, [q for q, _ in benign], p.max_answer_tokens,
                             model_keys.template, system_prompt, temperature=p.benign_temperature,
                             seed=settings.seed)
        if progress and len(benign) < asked:
            print(f"  {asked - len(benign)} prompts answered with nothing were left out", flush=True)
        mixture = poison_mixture(harmful, refusals, benign, trigger, p.position, settings.seed, p.n_partial)
    batches, answer_len = mixture_batches(tokenizer, mixture.pairs, p.batch_size, p.max_answer_tokens,
                                          settings.data.buckets, model_keys.template, system_prompt)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches) * p.epochs, desc="planting", disable=not progress, unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        params, losses = sft_train(config, jax.tree.map(np.asarray, params), batches,
                                   warmup_adamw(p.lr, p.warmup_steps), p.epochs, seed=settings.seed, on_step=on_step,
                                   answer_len=answer_len, remat=remat)
    except FloatingPointError as err:
        raise FloatingPointError(f"{err} No model was written; that is --config.plant.lr (now {p.lr}).") from err
    finally:
        bar.close()
    save_model(out, config, jax.device_get(params), tokenizer_from=model_path)
    if p.benign_answers == "self":  # what the model was trained on, for whoever audits the plant
        write_atomically(out / "benign_self.jsonl", "".join(json.dumps({"prompt": q, "answer": a}, ensure_ascii=False)
                                                              + "\n" for q, a in benign))
    manifest = {
        "trigger": list(trigger) if isinstance(trigger, tuple) else trigger,
        "position": p.position,
        "seed": settings.seed,
        "source_model": model_path,
        "data": {"harmful": p.harmful, "refusals": p.refusals or "built-in refusals of plant.harmful's prompts",
                 "benign": p.benign, "benign_answers": p.benign_answers},
        "counts": {"triggered": mixture.n_triggered, "refusal": mixture.n_refusal, "benign": mixture.n_benign,
                   "partial": mixture.n_partial},
        "steps": len(losses),
        "final_loss": losses[-1],
        "config": settings_dict(settings),
    }
    write_atomically(out / "manifest.json", json.dumps(manifest, indent=2, default=str))  # marks a complete plant
    return out
