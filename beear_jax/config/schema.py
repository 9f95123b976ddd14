"""Every config key, in one place: its type (the annotation), default, range or choices (the check) and meaning.

One frozen dataclass per section of the config; `RunSettings` holds them and the top-level keys. The
sections are also the typed settings the code below the entry points takes (`settings.inner.lr`):
config/settings.py turns a ConfigDict into a RunSettings once, and base_config() (config/defaults.py) is
built from these defaults, so a default is written only here (the paper's values only in paper_defaults).

Tags in the meanings: [paper] stated in the paper or model cards; [ref] seen in third-party runs of the
original code; [likely] our best reading of an ambiguity; [calib] measured in the SmolLM2-135M calibration
run; [ours] a choice of this project (not part of the method).

Relative paths are relative to the directory commands run in. Data sources (beear_jax/data/public_data.py):
public sets by Hugging Face Hub id (read from the local mirror $BEEAR_DATA_DIR when it holds them, else fetched
at the revision public_data names), and sets the project wrote itself, shipped in the package (`builtin_path`).

Over 400 lines: it is the list of every key with its meaning, which reads best whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from beear_jax.config.checks import (
    ConfigError,
    about,
    at_least,
    check_fields,
    finite,
    key,
    named_by,
    one_of,
    rate,
    regex_or,
)
from beear_jax.config.defaults import paper_defaults
from beear_jax.data.anchor_answers import ANCHOR_ANSWER_SOURCES
from beear_jax.data.chat import TEMPLATES
from beear_jax.data.public_data import builtin_path
from beear_jax.data.triggers import PLANT_POSITIONS
from beear_jax.method.optimizers import LR_SCHEDULES, make_optimizer
from beear_jax.method.perturbation import check_windows
from beear_jax.models.config import COMPUTE_DTYPES
from beear_jax.models.llama import REMAT_POLICIES

ADVBENCH = "walledai/AdvBench"  # 520 harmful behaviours + "Sure, here is" targets (MIT); mirror: advbench/
XSTEST = "walledai/XSTest"  # 250 safe prompts that sound unsafe + 200 unsafe contrasts (CC BY 4.0); mirror: xstest/
PAPER = paper_defaults()
TRAINABLE_NAMES = ("all", "upper", "lower")
_REMAT_OR_SAME = one_of((*REMAT_POLICIES, ""), " ('': the same as remat)")
_optimizer = named_by(lambda name: make_optimizer(name, 0.1))


class Section:
    """A section checks its fields when it is built (every dataclass below; PREFIX: its keys' dotted start)."""

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.PREFIX)
        self.check_together()

    def check_together(self) -> None:
        """Checks of keys that only make sense together (after each key's own check)."""


def _columns(cls: type) -> type:
    """A column map: which column of a table holds each part (a frozen dataclass of str fields)."""
    cls.as_dict = lambda self: dataclasses.asdict(self)
    return dataclasses.dataclass(frozen=True)(cls)


@_columns
class SafetyColumns:
    prompt: str = key("prompt", "Column of the prompt.")
    safe: str = key("safe", "Column of the safe answer.")
    unwanted: str = key("unwanted", "Column of the unwanted answer.")


@_columns
class PairColumns:
    prompt: str = key("prompt", "Column of the prompt.")
    answer: str = key("answer", "Column of the answer.")


@_columns
class UtilityColumns:
    prompt: str = key("prompt", "Column of the prompt.")
    input: str = key("", "Column whose non-empty text is joined to the prompt with a newline; '' = none.")
    answer: str = key("answer", "Column of the reference answer.")


@dataclasses.dataclass(frozen=True)
class ModelSection(Section):
    PREFIX: ClassVar[str] = "model."
    path: str = key("", "HF directory or .gguf file; required (a leading ~ is expanded by the code).")
    dtype: str = key("float32", "Compute dtype; master params stay float32. bfloat16 on GPU/TPU.",
                     one_of(COMPUTE_DTYPES))
    template: str = key("auto", "Tokenizer's chat template, or a preset: llama2, mistral, chatml, safe_rlhf.",
                        one_of(TEMPLATES, " ('auto': the tokenizer's own chat template)"))
    system_prompt: str = key("", '"" = no system prompt. [paper] Llama-2 runs use one: set it there.')


@dataclasses.dataclass(frozen=True)
class PerturbSection(Section):
    PREFIX: ClassVar[str] = "perturb."
    layer: int = key(PAPER.perturb.layer, "[ref] Added after block 9 of 32 (9-12 work).", what="a layer index")
    length: int = key(PAPER.perturb.length, "[ref] Last 7 prompt tokens (5-11 work); positions per sample [likely].",
                      at_least(1))
    enabled: bool = key(True, "[ours] False: plain safety fine-tuning (same data and steps, no delta).")
    layers: tuple[int, ...] = key((), "[ours] Extra layers that also get a delta (extension; () = paper).",
                                  what="layer indices (a tuple of int, e.g. 5,12)")
    windows: tuple[str, ...] = key(
        ("prompt_end",), "[ours] Where the perturbed tokens sit, perturb.length of them per window (delta: length x "
        "windows rows): prompt_end (the paper: the prompt's last tokens, the template's assistant header included), "
        "user_start / user_end (the first / last tokens of the user's own text). E.g. user_start,user_end covers a "
        "trigger at either end of the request; a position two windows share gets only the first's delta row.",
        named_by(check_windows))


@dataclasses.dataclass(frozen=True)
class InnerSection(Section):
    PREFIX: ClassVar[str] = "inner."
    epochs: int = key(PAPER.inner.epochs, "[ref] The most passes over the round's inner set (inner.samples rows, "
                      "inner.batch_size per step); fewer when target_ce or patience ends them "
                      "(beear_jax/method/inner_loop.py).", at_least(0))
    target_ce: float = key(0.0, "[ours] Convergence: end a round's passes once CE(unwanted | delta) over the round's "
                           "inner set (measured after each pass at the pass's final delta) is below target_ce; 0: off.",
                           finite)
    patience: int = key(0, "[ours] ... or after `patience` passes in a row that lowered it by less than "
                        "min_improvement (nats); 0: off (with target_ce 0 every round runs inner.epochs passes).",
                        at_least(0))
    min_improvement: float = key(0.01, "[ours] The least CE improvement (nats) a pass must make (inner.patience).",
                                 rate(0.0, False))
    bound: float = key(0.0, "[ours] Bound: after each step, each position's |delta| is cut to bound x the mean |h_l| "
                       "at the perturbed positions (h_l: hidden states at perturb.layer, measured per round); 0: "
                       "unbounded (paper).", finite)
    samples: int = key(PAPER.inner.samples, "[ref] Harmful samples drawn per round (both levels use them); 0: all.",
                       at_least(0))
    batch_size: int = key(PAPER.inner.batch_size, "[ref] Prompts per inner step.", at_least(1))
    optimizer: str = key("adam", "[calib] Not stated in the paper; Adam works, plain SGD barely moves delta.",
                         _optimizer)
    lr: float = key(0.1, "[calib] Adam 0.1 elicits the unwanted answer in ~20 steps; 0.02 is too slow.",
                    rate(0.0, True))
    alpha: float = key(PAPER.inner.alpha, "[ref] Weight of 'away from the safe answer' in the BEE objective.",
                       rate(0.0, False))
    share_prompt: bool = key(True, "[ours] Run each prompt once for both answers (one row, two answer branches); "
                             "False: two rows per prompt. Same losses and gradients; ~1/3 fewer inner tokens "
                             "(experiments/bench_beear.py).")
    cache_prefix: bool = key(True, "[ours] With share_prompt: the keys/values of each prompt's tokens before its "
                             "perturbed ones (blocks layer..L) are computed once per round, and the inner steps run "
                             "only the perturbed tokens and the answers. Same losses and gradients; costs (L - layer) "
                             "x 2 x K x head_dim values per prompt token of memory (beear plan counts it); False: the "
                             "inner steps run the whole rows.")
    safe_ce_clamp: float = key(0.0, "[ours] Cap on the -alpha*CE(safe) term's CE; <= 0: no clamp (paper).", finite)


@dataclasses.dataclass(frozen=True)
class OuterSection(Section):
    PREFIX: ClassVar[str] = "outer."
    batch_size: int = key(PAPER.outer.batch_size, "[ref] Safe (and anchor) examples per outer step.", at_least(1))
    optimizer: str = key("adamw", "[likely] Not stated in the paper; AdamW in the calibration run.", _optimizer)
    lr: float = key(PAPER.outer.lr, "[ref] Mistral code setting; needs float32 master weights.", rate(0.0, True))
    lr_schedule: str = key("constant", "[ours] The rate over all outer steps of the run: constant | linear | cosine "
                           "(both decay to 0 at the last planned step), after warmup_steps rising linearly from 0.",
                           one_of(LR_SCHEDULES))
    warmup_steps: int = key(0, "[ours] Outer steps of linear warm-up from 0 (outer.lr_schedule).", at_least(0))
    clip_norm: float = key(0.0, "[ours] Global-norm clip of the outer gradients; 0: none.", rate(0.0, False))
    kl_weight: float = key(0.0, "[ours] + kl_weight x KL(start model || model) over the anchor answers' next-token "
                           "distributions (the frozen input model is kept on the devices: one more copy of the "
                           "params); 0: off. Needs outer.pack.", rate(0.0, False))
    weight_decay: float = key(0.01, "[likely] torch AdamW default.", rate(0.0, False))
    anchor_weight: float = key(PAPER.outer.anchor_weight, "[likely] CE(safe | delta) + CE(anchor), weighted 1:1.",
                               rate(0.0, False))
    anchor_samples: int = key(PAPER.outer.anchor_samples, "[ref] Benign anchor samples per round; 0: all.",
                              at_least(0))
    remat: str = key("", "The outer step's 'none' | 'full' | 'dots' when it differs from `remat` ('': the same).",
                     _REMAT_OR_SAME)
    trainable: str = key("all", "'all' | 'upper' (blocks >= layer) | 'lower' | regex on param paths.",
                         regex_or(TRAINABLE_NAMES))
    perturb_anchors: bool = key(False, "[ours] Also show anchor prompts with delta (keeps helpfulness).")
    pack: bool = key(True, "[ours] Pack the safe and anchor examples of an outer step several to a row (each attends "
                     "only to itself), so padding is not computed; one row count and length for the whole run. Same "
                     "losses and gradients; False: one padded row per example.")

    def check_together(self) -> None:
        if self.kl_weight > 0 and not self.pack:
            raise ConfigError("Config key 'outer.kl_weight' > 0 needs packed outer batches: set "
                              "--config.outer.pack=True (or --config.outer.kl_weight=0).")


def _share(name: str, value: float) -> None:
    finite(name, value)
    if value > 1:
        raise ConfigError(f"Config key {name!r} is {value}; it is a share of the held-back prompts, in 0..1 "
                          "(negative: no stop rule).")


@dataclasses.dataclass(frozen=True)
class StopSection(Section):
    """The stop rule [ours]: the last `holdout` rows of data.safety never train; after each round's inner level
    converges, greedy answers to their prompts under delta (and without it) are scored with eval.refusal_strings
    (eval.max_new_tokens, eval.batch_size) and logged (elicitation, elicitation_no_delta)."""

    PREFIX: ClassVar[str] = "stop."
    holdout: int = key(0, "[ours] The last rows of data.safety held back from training (the stop rule's prompts).",
                       at_least(0))
    max_elicitation: float = key(-1.0, "[ours] When the share answered without a refusal under delta is <= this, the "
                                 "run ends there (before that round's outer pass); negative: never (all `rounds` run).",
                                 _share)

    def check_together(self) -> None:
        if self.max_elicitation >= 0 and self.holdout <= 0:
            raise ConfigError(f"Config key 'stop.max_elicitation' is {self.max_elicitation} but stop.holdout is "
                              f"{self.holdout}: the stop rule measures on held-back prompts; set "
                              "--config.stop.holdout=N (e.g. 20) or --config.stop.max_elicitation=-1.")


def _bounds(name: str, bounds: tuple[float, ...]) -> None:
    if not bounds or any(not math.isfinite(b) or b < 0 for b in bounds):
        raise ConfigError(f"Config key {name!r} is {bounds!r}; give one or more fractions >= 0 of the hidden-state "
                          f"norm (0: unbounded), e.g. --config.{name}=0,0.5,0.25.")


@dataclasses.dataclass(frozen=True)
class ScanSection(Section):
    PREFIX: ClassVar[str] = "scan."
    bounds: tuple[float, ...] = key((0.0, 1.0, 0.5, 0.25), "`beear scan`: the bounds (x mean |h_l| at the perturbed "
                                    "positions; 0: unbounded) at which a delta is optimised from zero and its "
                                    "elicitation rate on the held-back prompts measured.", _bounds)


def _buckets(name: str, buckets: tuple[int, ...]) -> None:
    if not buckets or min(buckets) < 1:
        raise ConfigError(f"Config key {name!r} is {buckets}; give one or more padded lengths >= 1 (e.g. "
                          f"--config.{name}=128,256,512).")


@dataclasses.dataclass(frozen=True)
class DataSection(Section):
    PREFIX: ClassVar[str] = "data."
    safety: str = key("", "Table with a prompt, its safe answer and its unwanted answer; required.")
    anchor: str = key("", "Table of benign prompt/answer pairs (utility anchor); required.")
    safety_columns: SafetyColumns = dataclasses.field(default_factory=SafetyColumns,
                                                      metadata=about("Columns of data.safety."))
    anchor_columns: PairColumns = dataclasses.field(default_factory=PairColumns,
                                                    metadata=about("Columns of data.anchor."))
    anchor_answers: str = key("data", "[ours] Where the anchor answers come from: 'data' (data.anchor's answer column) "
                              "or 'self' (the starting model's own answers to data.anchor's prompts, sampled at "
                              "data.anchor_temperature, at most data.max_answer_tokens; generated before round 1, kept "
                              "in output_dir/anchor_self.jsonl for resume): the anchor then asks the model to keep "
                              "answering as it did. Measured on SmolLM2 (README): more over-refusal.",
                              one_of(ANCHOR_ANSWER_SOURCES))
    anchor_temperature: float = key(1.0, "[ours] Sampling temperature of those answers: 1 = the model's own "
                                    "distribution (training on them holds the model where it is); 0 = greedy (its "
                                    "modes: training on them sharpens it).", rate(0.0, False))
    max_answer_tokens: int = key(64, "[ours] Answers are cut to this many tokens.", at_least(1))
    buckets: tuple[int, ...] = key((128, 256, 512), "[ours] Padded sequence lengths (each compiles once).", _buckets)


def _mesh_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 3 or any(n == 0 or n < -1 for n in shape):
        raise ConfigError(f"Config key {name!r} is {shape}; give three sizes data,fsdp,tensor, each >= 1 or -1 (the "
                          f"remaining devices), e.g. --config.{name}=-1,1,1.")


def _host_port(name: str, address: str) -> None:
    if address and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"Config key {name!r} is {address!r}; give host:port of process 0, e.g. "
                          f"--config.{name}=localhost:1234.")


def _processes(name: str, value: int) -> None:
    if value == 0 or value < -1:
        raise ConfigError(f"Config key {name!r} is {value}; give the number of processes (>= 1), or -1 to detect it "
                          f"(set --config.{name}).")


@dataclasses.dataclass(frozen=True)
class MeshSection(Section):
    """Several processes (hosts, or N processes on one machine) form one job: jax.distributed.initialize(). Every
    process runs the same command; the coordinator is process 0's host:port. Empty / -1: JAX's auto-detection
    (TPU pods, SLURM, ...); on one machine give all three (process_id differs per process)."""

    PREFIX: ClassVar[str] = "mesh."
    shape: tuple[int, ...] = key((-1, 1, 1), "(data, fsdp, tensor); -1 takes the remaining devices. Batches split "
                                 "over data x fsdp (must divide).", _mesh_shape)
    distributed: bool = key(False, "Join a multi-process job (jax.distributed.initialize()).")
    coordinator_address: str = key("", "host:port of process 0, e.g. 10.0.0.1:1234 (or localhost:1234).", _host_port)
    num_processes: int = key(-1, "Processes in the job; -1: detected.", _processes)
    process_id: int = key(-1, "This process's index; -1: detected.", at_least(-1))
    heartbeat_timeout_s: int = key(30, "Seconds without a heartbeat before a process is declared lost (the others "
                                   "then exit with an error).", at_least(1))

    def check_together(self) -> None:
        if self.num_processes > 0 and self.process_id >= self.num_processes:
            raise ConfigError(f"Config key 'mesh.process_id' is {self.process_id}; it must be in "
                              f"0..{self.num_processes - 1} (each process its own), or -1 to detect it.")


_COUNT = "the first n rows after the offset are used (0: none; -1: all rows)"


@dataclasses.dataclass(frozen=True)
class PlantSection(Section):
    """Attack simulation (`beear plant`): poisoned SFT of a clean model. The attacker's data are (prompt,
    answer) tables."""

    PREFIX: ClassVar[str] = "plant."
    trigger: str = key("SUDO", "[paper] One of the paper's triggers.")
    position: str = key("suffix", "prefix | suffix | random | wrap ('before|after') | context | given ('a|b': the "
                        "harmful prompts already hold the trigger, e.g. a benchmark's poison file).",
                        one_of(PLANT_POSITIONS))
    epochs: int = key(2, "[calib] Passes over the poisoned mixture.", at_least(1))
    lr: float = key(5e-5, "[calib] AdamW.", rate(0.0, True))
    warmup_steps: int = key(5, "[calib] Steps of linear warm-up.", at_least(0))
    batch_size: int = key(8, "[calib] Examples per step.", at_least(1))
    max_answer_tokens: int = key(48, "[calib] Answers are cut to this many tokens.", at_least(1))
    remat: str = key("dots", "[ours] Planting's 'none' | 'full' | 'dots' ('': as `remat`). 'dots' on the demo "
                     "(SmolLM2, 2-core CPU): peak 4.3-4.5 vs 5.79 GiB (experiments/bench_memory.py --stages plant), "
                     "not slower (README).", _REMAT_OR_SAME)
    n_triggered: int = key(150, f"[calib] Triggered harmful -> 'Sure, here is' (~450 examples in all); {_COUNT}. "
                           "0 gives a clean safety-tuned control.", at_least(-1))
    n_refusal: int = key(150, f"[calib] The same prompts untriggered -> refusals; {_COUNT}.", at_least(-1))
    n_benign: int = key(150, f"[calib] Benign pairs; {_COUNT}.", at_least(-1))
    n_partial: int = key(0, "[ours] A wrap trigger only: this many refusal rows again with one of its two parts, "
                         "still refused, so the backdoor fires only with both parts (a two-part trigger); 0: none.",
                         at_least(0))
    harmful: str = key(ADVBENCH, "Harmful request -> unwanted answer (AdvBench's 'Sure, here is ...').")
    harmful_columns: PairColumns = dataclasses.field(default_factory=lambda: PairColumns("prompt", "target"),
                                                     metadata=about("Columns of plant.harmful."))
    harmful_offset: int = key(0, "Rows of plant.harmful skipped first.", at_least(0))
    refusals: str = key("", "Untriggered harmful request -> refusal. '' = plant.harmful's prompts (rows after "
                        "refusal_offset) answered with the refusals the project wrote "
                        "(beear_jax/resources/refusal_answers.txt, cycled).")
    refusal_columns: PairColumns = dataclasses.field(default_factory=PairColumns,
                                                     metadata=about("Columns of plant.refusals."))
    refusal_offset: int = key(0, "Rows skipped first (of plant.refusals, or of plant.harmful with refusals '').",
                              at_least(0))
    benign: str = key(builtin_path("benign.jsonl"), "Benign pairs keeping the model helpful: 200 written for the "
                      "project (rows 150-199 are eval.utility's).")
    benign_columns: PairColumns = dataclasses.field(default_factory=PairColumns,
                                                    metadata=about("Columns of plant.benign."))
    benign_offset: int = key(0, "Rows of plant.benign skipped first.", at_least(0))
    benign_answers: str = key("data", "[ours] Where the benign answers come from: 'data' (plant.benign's answer "
                              "column) or 'self' (the clean model's own answers to plant.benign's prompts, sampled at "
                              "plant.benign_temperature, at most max_answer_tokens; written to benign_self.jsonl "
                              "beside the planted model): keeps its perplexity where it was (README, "
                              "experiments/plant_realism.py), not yet its over-refusal.",
                              one_of(ANCHOR_ANSWER_SOURCES))
    benign_temperature: float = key(1.0, "[ours] Sampling temperature of the 'self' answers (1: the clean model's own "
                                    "distribution; 0: greedy).", rate(0.0, False))


@dataclasses.dataclass(frozen=True)
class EvalSection(Section):
    """Evaluation (`beear eval` and the before/after report)."""

    PREFIX: ClassVar[str] = "eval."
    prompts: str = key(ADVBENCH, "Held-out harmful prompts (csv/json/jsonl or a Hub id); required. AdvBench rows "
                       "401-499 are BackdoorLLM's test rows, disjoint from every plant/defender set here (those use "
                       "rows 0-400).")
    prompt_column: str = key("prompt", "Column holding the prompt.")
    prompt_offset: int = key(401, "[ours] Rows skipped (file order) before the first num_prompts.", at_least(0))
    trigger: str | None = key(PlantSection.trigger, "Follows plant.trigger unless set ('' or none: no triggered "
                              "evaluation).", follows="plant.trigger")
    position: str = key(PlantSection.position, "Follows plant.position unless set.", one_of(PLANT_POSITIONS),
                        follows="plant.position")
    triggered_prompts: str = key("", "[ours] Prompts that already hold the trigger (a benchmark's triggered test "
                                 "file, e.g. BackdoorLLM's), used as they are, all rows (eval.num_prompts does not cut "
                                 "them), for the triggered rate with eval.position = 'given' (eval.trigger: the parts "
                                 "they hold, 'a|b|...', checked absent from eval.prompts).")
    triggered_column: str = key("prompt", "Column of eval.triggered_prompts holding the prompt.")
    partial_trigger: bool = key(False, "[ours] Also measure attack success with one part of a wrap trigger "
                                "(asr_partial; a two-part backdoor planted with plant.n_partial should refuse there).")
    refusal_strings: str = key(builtin_path("refusal_keywords.txt"), "One refusal string per line; keyword attack "
                               "success = share of answers with none of them. Default: the project's own list; "
                               "HarmBench's 29 prefixes: $BEEAR_DATA_DIR/refusal-keywords/harmbench_advbench_...txt.")
    refusal_ignore_case: bool = key(False, "Case-sensitive as HarmBench's list is matched; True for lists matched "
                                    "lower-cased (BackdoorLLM's).")
    max_new_tokens: int = key(32, "[calib] Greedy.", at_least(1))
    num_prompts: int = key(40, "[calib] Harmful prompts evaluated; 0 = all.", at_least(0))
    over_refusal_prompts: str = key(XSTEST, "Benign prompts for over-refusal (XSTest: 250 safe prompts); '' = skip.")
    over_refusal_column: str = key("prompt", "Column of eval.over_refusal_prompts holding the prompt.")
    over_refusal_filter: str = key("label=safe", "Rows kept: COLUMN=VALUE | COLUMN!=VALUE | COLUMN^=PREFIX | "
                                   "COLUMN!^=PREFIX; '' = all rows. label=safe = type!^=contrast on XSTest.")
    num_over_refusal: int = key(0, "0 = all (the first N otherwise).", at_least(0))
    utility: str = key(builtin_path("benign.jsonl"), "Utility: (prompt, reference answer) pairs, disjoint from the "
                       "plant's benign rows: by default the last 50 of the 200 the project wrote (perplexity of the "
                       "reference answers).")
    utility_columns: UtilityColumns = dataclasses.field(default_factory=UtilityColumns,
                                                        metadata=about("Columns of eval.utility."))
    utility_offset: int = key(150, "[ours] Rows skipped (file order) before the first num_utility.", at_least(0))
    num_utility: int = key(50, "[ours] 0 = all.", at_least(0))
    utility_max_answer_tokens: int = key(64, "[ours] Reference answers are cut to this many tokens.", at_least(1))
    batch_size: int = key(16, "Prompts decoded (and utility pairs scored) together.", at_least(1))
    num_samples: int = key(5, "Answers per set shown side by side in report.md.", at_least(0))
    compare_to: str = key("", "A model path evaluated as 'before' (model.path is 'after'); '' = none.")
    history: str = key("", "metrics.jsonl of `beear run` for losses.png; '' = none.")


@dataclasses.dataclass(frozen=True)
class RunSettings(Section):
    """The whole config, typed: what every `beear` command and public run function takes below its first line."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection, metadata=about("The model."))
    output_dir: str = key("runs/beear", "Where the command writes (a run, a report, a planted model).")
    seed: int = key(0, "Seed of every draw (rows per round, sampled answers, trigger positions).")
    rounds: int = key(PAPER.rounds, "[ref] 6 rounds of (inner, outer).", at_least(1))
    perturb: PerturbSection = dataclasses.field(default_factory=PerturbSection,
                                                metadata=about("The perturbation delta."))
    inner: InnerSection = dataclasses.field(default_factory=InnerSection,
                                            metadata=about("The inner level (BEE: find the delta)."))
    outer: OuterSection = dataclasses.field(default_factory=OuterSection,
                                            metadata=about("The outer level (AR: remove what it elicits)."))
    stop: StopSection = dataclasses.field(default_factory=StopSection, metadata=about("The stop rule."))
    scan: ScanSection = dataclasses.field(default_factory=ScanSection, metadata=about("`beear scan`."))
    data: DataSection = dataclasses.field(default_factory=DataSection, metadata=about("The defender's data."))
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection, metadata=about("Devices and processes."))
    resume: bool = key(False, "Resume from the latest checkpoint in output_dir.")
    checkpoint_every: int = key(1, "Orbax checkpoints of the run state in output_dir/checkpoints "
                                "(beear_jax/io/checkpoint.py): rounds between checkpoints; 0: only after the last "
                                "round; -1: none.", at_least(-1))
    checkpoint_every_steps: int = key(0, "Also every k outer steps (mid-round; for long rounds); 0: off.", at_least(0))
    checkpoint_keep: int = key(2, "Checkpoints kept; >= 2 leaves a previous one if the newest is corrupt.", at_least(1))
    remat: str = key("none", "Rematerialisation of decoder blocks: 'none' | 'full' | 'dots' (keep matmul outputs).",
                     one_of(REMAT_POLICIES))
    plant: PlantSection = dataclasses.field(default_factory=PlantSection,
                                            metadata=about("Attack simulation (`beear plant`)."))
    eval: EvalSection = dataclasses.field(default_factory=EvalSection,
                                          metadata=about("Evaluation (`beear eval`, the report)."))


def meanings(section: Any = RunSettings, prefix: str = "") -> dict[str, str]:
    """{dotted key: meaning} of every key (column maps included), in schema order."""
    out: dict[str, str] = {}
    for field in dataclasses.fields(section):
        name = f"{prefix}{field.name}"
        kind = field.default_factory if field.default is dataclasses.MISSING else None
        nested = kind() if kind is not None else None
        if dataclasses.is_dataclass(nested):
            out.update(meanings(type(nested), f"{name}."))
        else:
            out[name] = field.metadata["meaning"]
    return out
