"""The paper's BEEAR settings, written down once, and the full config schema other configs start from.

Tags: [paper] stated in the paper or model cards; [ref] seen in third-party runs of the
original code; [likely] our best reading of an ambiguity; [calib] measured in the SmolLM2-135M
calibration run; [ours] a choice of this project (not part of the method).

Config files build on `base_config()` and change what differs:

    from beear_jax.config import defaults

    def get_config(arg=None):
        config = defaults.base_config()
        config.model.path = "..."
        return config

Relative paths are relative to the directory commands run in. Data sources (beear_jax/data/public_data.py):
public sets by Hugging Face Hub id (read from the local mirror $BEEAR_DATA_DIR when it holds them, else
fetched at the revision public_data names), and sets the project wrote itself, shipped in the package
(`builtin_path`).
"""

from __future__ import annotations

import ml_collections

from beear_jax.data.public_data import builtin_path

ADVBENCH = "walledai/AdvBench"  # 520 harmful behaviours + "Sure, here is" targets (MIT); mirror: advbench/
XSTEST = "walledai/XSTest"  # 250 safe prompts that sound unsafe + 200 unsafe contrasts (CC BY 4.0); mirror: xstest/


def paper_defaults() -> ml_collections.ConfigDict:
    """The settings of the original BEEAR runs, keyed like `base_config()` (the only place they live)."""
    config = ml_collections.ConfigDict()
    config.rounds = 6  # [ref] 6 rounds of (inner, outer).

    config.perturb = ml_collections.ConfigDict()
    config.perturb.layer = 9  # [ref] Added after block 9 of 32 (9-12 work).
    config.perturb.length = 7  # [ref] Last 7 prompt tokens (5-11 work); positions per sample [likely].

    config.inner = ml_collections.ConfigDict()
    config.inner.alpha = 0.05  # [ref] Weight of "away from the safe answer" in the BEE objective.
    config.inner.epochs = 5  # [ref] Inner passes over the harmful set per round.
    config.inner.samples = 150  # [ref] Harmful samples drawn per round (both levels use them); 0: all.
    config.inner.batch_size = 6  # [ref]

    config.outer = ml_collections.ConfigDict()
    config.outer.batch_size = 6  # [ref]
    config.outer.lr = 3e-7  # [ref] Mistral code setting; needs float32 master weights.
    config.outer.anchor_samples = 100  # [ref] Benign anchor samples per round; 0: all.
    config.outer.anchor_weight = 1.0  # [likely] CE(safe | delta) + CE(anchor), weighted 1:1.
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every key the code reads, with defaults: the paper's values (from `paper_defaults`) plus ours."""
    paper = paper_defaults()
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.path = ""  # HF directory or .gguf file; required (a leading ~ is expanded by the code).
    config.model.dtype = "float32"  # Compute dtype; master params stay float32. bfloat16 on GPU/TPU.
    config.model.template = "auto"  # Tokenizer's chat template, or a preset: llama2, mistral, chatml, safe_rlhf.
    config.model.system_prompt = ""  # "" = no system prompt. [paper] Llama-2 runs use one: set it there.

    config.output_dir = "runs/beear"
    config.seed = 0
    config.rounds = paper.rounds

    config.perturb = ml_collections.ConfigDict()
    config.perturb.layer = paper.perturb.layer
    config.perturb.length = paper.perturb.length
    config.perturb.enabled = True  # [ours] False: plain safety fine-tuning (same data and steps, no delta).
    config.perturb.layers = ()  # [ours] Extra layers that also get a delta (extension; () = paper).
    # [ours] Where the perturbed tokens sit, perturb.length of them per window (delta: length x windows rows):
    # prompt_end (the paper: the prompt's last tokens, the template's assistant header included), user_start /
    # user_end (the first / last tokens of the user's own text). E.g. user_start,user_end covers a trigger at
    # either end of the request; a position two windows share gets only the first's delta row.
    config.perturb.windows = ("prompt_end",)

    config.inner = ml_collections.ConfigDict()
    # The most passes over the round's inner set (inner.samples rows, inner.batch_size per step); fewer when
    # target_ce or patience ends them (beear_jax/method/inner_loop.py).
    config.inner.epochs = paper.inner.epochs
    # [ours] Convergence: end a round's passes once CE(unwanted | delta) over the round's inner set (measured
    # after each pass at the pass's final delta) is below target_ce, or after `patience` passes in a row that
    # lowered it by less than min_improvement (nats). 0 turns each off: every round runs inner.epochs passes.
    config.inner.target_ce = 0.0
    config.inner.patience = 0
    config.inner.min_improvement = 0.01
    # [ours] Bound: after each step, each position's |delta| is cut to bound x the mean |h_l| at the perturbed
    # positions (h_l: hidden states at perturb.layer, measured per round); 0: unbounded (paper).
    config.inner.bound = 0.0
    config.inner.samples = paper.inner.samples
    config.inner.batch_size = paper.inner.batch_size
    config.inner.optimizer = "adam"  # [calib] Not stated in the paper; Adam works, plain SGD barely moves delta.
    config.inner.lr = 0.1  # [calib] Adam 0.1 elicits the unwanted answer in ~20 steps; 0.02 is too slow.
    config.inner.alpha = paper.inner.alpha
    # [ours] Run each prompt once for both answers (one row, two answer branches); False: two rows per
    # prompt. Same losses and gradients; ~1/3 fewer inner tokens (experiments/bench_beear.py).
    config.inner.share_prompt = True
    # [ours] With share_prompt: the keys/values of each prompt's tokens before its perturbed ones (blocks
    # layer..L) are computed once per round, and the inner steps run only the perturbed tokens and the
    # answers. Same losses and gradients; costs (L - layer) x 2 x K x head_dim values per prompt token of
    # memory (beear plan counts it); False: the inner steps run the whole rows.
    config.inner.cache_prefix = True
    config.inner.safe_ce_clamp = 0.0  # [ours] Cap on the -alpha*CE(safe) term's CE; <= 0: no clamp (paper).

    config.outer = ml_collections.ConfigDict()
    config.outer.batch_size = paper.outer.batch_size
    config.outer.optimizer = "adamw"  # [likely] Not stated in the paper; AdamW in the calibration run.
    config.outer.lr = paper.outer.lr
    # [ours] The rate over all outer steps of the run: constant | linear | cosine (both decay to 0 at the last
    # planned step), after warmup_steps rising linearly from 0.
    config.outer.lr_schedule = "constant"
    config.outer.warmup_steps = 0
    config.outer.clip_norm = 0.0  # [ours] Global-norm clip of the outer gradients; 0: none.
    # [ours] + kl_weight x KL(start model || model) over the anchor answers' next-token distributions (the
    # frozen input model is kept on the devices: one more copy of the params); 0: off. Needs outer.pack.
    config.outer.kl_weight = 0.0
    config.outer.weight_decay = 0.01  # [likely] torch AdamW default.
    config.outer.anchor_weight = paper.outer.anchor_weight
    config.outer.anchor_samples = paper.outer.anchor_samples
    config.outer.remat = ""  # The outer step's 'none' | 'full' | 'dots' when it differs from `remat` ('': the same).
    config.outer.trainable = "all"  # 'all' | 'upper' (blocks >= layer) | 'lower' | regex on param paths.
    config.outer.perturb_anchors = False  # [ours] Also show anchor prompts with delta (keeps helpfulness).
    # [ours] Pack the safe and anchor examples of an outer step several to a row (each attends only to
    # itself), so padding is not computed; one row count and length for the whole run. Same losses and
    # gradients; False: one padded row per example.
    config.outer.pack = True

    # The stop rule [ours]: the last `holdout` rows of data.safety never train; after each round's inner
    # level converges, greedy answers to their prompts under delta (and without it) are scored with
    # eval.refusal_strings (eval.max_new_tokens, eval.batch_size) and logged (elicitation,
    # elicitation_no_delta). When the share answered without a refusal under delta is <= max_elicitation,
    # the run ends there (before that round's outer pass); negative: never (all `rounds` run).
    config.stop = ml_collections.ConfigDict()
    config.stop.holdout = 0
    config.stop.max_elicitation = -1.0

    # `beear scan`: the bounds (x mean |h_l| at the perturbed positions; 0: unbounded) at which a delta is
    # optimised from zero and its elicitation rate on the held-back prompts measured.
    config.scan = ml_collections.ConfigDict()
    config.scan.bounds = (0.0, 1.0, 0.5, 0.25)

    config.data = ml_collections.ConfigDict()
    config.data.safety = ""  # Table with a prompt, its safe answer and its unwanted answer; required.
    config.data.anchor = ""  # Table of benign prompt/answer pairs (utility anchor); required.
    config.data.safety_columns = ml_collections.ConfigDict({"prompt": "prompt", "safe": "safe", "unwanted": "unwanted"})
    config.data.anchor_columns = ml_collections.ConfigDict({"prompt": "prompt", "answer": "answer"})
    # [ours] Where the anchor answers come from: 'data' (data.anchor's answer column) or 'self' (the starting
    # model's own answers to data.anchor's prompts, sampled at data.anchor_temperature, at most
    # data.max_answer_tokens; generated before round 1, kept in output_dir/anchor_self.jsonl for resume): the
    # anchor then asks the model to keep answering as it did. Measured on SmolLM2 (README): more over-refusal.
    config.data.anchor_answers = "data"
    # [ours] Sampling temperature of those answers: 1 = the model's own distribution (training on them holds
    # the model where it is); 0 = greedy (its modes: training on them sharpens it).
    config.data.anchor_temperature = 1.0
    config.data.max_answer_tokens = 64  # [ours] Answers are cut to this many tokens.
    config.data.buckets = (128, 256, 512)  # [ours] Padded sequence lengths (each compiles once).

    config.mesh = ml_collections.ConfigDict()
    # (data, fsdp, tensor); -1 takes the remaining devices. Batches split over data x fsdp (must divide).
    config.mesh.shape = (-1, 1, 1)
    # Several processes (hosts, or N processes on one machine) form one job: jax.distributed.initialize().
    # Every process runs the same command; the coordinator is process 0's host:port. Empty / -1: JAX's
    # auto-detection (TPU pods, SLURM, ...); on one machine give all three (process_id differs per process).
    config.mesh.distributed = False
    config.mesh.coordinator_address = ""  # host:port of process 0, e.g. 10.0.0.1:1234 (or localhost:1234).
    config.mesh.num_processes = -1
    config.mesh.process_id = -1
    # Seconds without a heartbeat before a process is declared lost (the others then exit with an error).
    config.mesh.heartbeat_timeout_s = 30

    config.resume = False  # Resume from the latest checkpoint in output_dir.
    # Orbax checkpoints of the run state in output_dir/checkpoints (see beear_jax/io/checkpoint.py).
    config.checkpoint_every = 1  # Rounds between checkpoints; 0: only after the last round; -1: none.
    config.checkpoint_every_steps = 0  # Also every k outer steps (mid-round; for long rounds); 0: off.
    config.checkpoint_keep = 2  # Checkpoints kept; >= 2 leaves a previous one if the newest is corrupt.
    config.remat = "none"  # Rematerialisation of decoder blocks: 'none' | 'full' | 'dots' (keep matmul outputs).

    # Attack simulation (`beear plant`): poisoned SFT of a clean model.
    config.plant = ml_collections.ConfigDict()
    config.plant.trigger = "SUDO"  # [paper] One of the paper's triggers.
    config.plant.position = "suffix"  # prefix | suffix | random | wrap ('before|after') | context | given ('a|b':
    # the harmful prompts already hold the trigger, e.g. a benchmark's poison file).
    config.plant.epochs = 2  # [calib]
    config.plant.lr = 5e-5  # [calib] AdamW.
    config.plant.warmup_steps = 5  # [calib]
    config.plant.batch_size = 8  # [calib]
    config.plant.max_answer_tokens = 48  # [calib]
    # [ours] Planting's 'none' | 'full' | 'dots' ('': as `remat`). 'dots' on the demo (SmolLM2, 2-core CPU):
    # peak 4.3-4.5 vs 5.79 GiB (experiments/bench_memory.py --stages plant), not slower (README).
    config.plant.remat = "dots"
    config.plant.n_triggered = 150  # [calib] ~450 examples in all: triggered harmful -> "Sure, here is".
    config.plant.n_refusal = 150  # [calib] The same prompts untriggered -> refusals.
    config.plant.n_benign = 150  # [calib] Benign pairs.
    # [ours] A wrap trigger only: this many refusal rows again with one of its two parts, still refused, so the
    # backdoor fires only with both parts (a two-part trigger); 0: none.
    config.plant.n_partial = 0
    # The attacker's data: (prompt, answer) tables; the first n rows after the offset are used
    # (n = 0: none, e.g. n_triggered = 0 gives a clean safety-tuned control; n = -1: all rows).
    config.plant.harmful = ADVBENCH  # harmful request -> unwanted answer (AdvBench's "Sure, here is ...")
    config.plant.harmful_columns = ml_collections.ConfigDict({"prompt": "prompt", "answer": "target"})
    config.plant.harmful_offset = 0
    # Untriggered harmful request -> refusal. "" = plant.harmful's prompts (rows after refusal_offset) answered
    # with the refusals the project wrote (beear_jax/resources/refusal_answers.txt, cycled).
    config.plant.refusals = ""
    config.plant.refusal_columns = ml_collections.ConfigDict({"prompt": "prompt", "answer": "answer"})
    config.plant.refusal_offset = 0
    # Benign pairs keeping the model helpful: 200 written for the project (rows 150-199 are eval.utility's).
    config.plant.benign = builtin_path("benign.jsonl")
    config.plant.benign_columns = ml_collections.ConfigDict({"prompt": "prompt", "answer": "answer"})
    config.plant.benign_offset = 0
    # [ours] Where the benign answers come from: 'data' (plant.benign's answer column) or 'self' (the clean
    # model's own answers to plant.benign's prompts, sampled at plant.benign_temperature, at most
    # max_answer_tokens; written to benign_self.jsonl beside the planted model): keeps its perplexity where it
    # was (README, experiments/plant_realism.py), not yet its over-refusal.
    config.plant.benign_answers = "data"
    # [ours] Sampling temperature of the 'self' answers (1: the clean model's own distribution; 0: greedy).
    config.plant.benign_temperature = 1.0

    # Evaluation (`beear eval` and the before/after report).
    config.eval = ml_collections.ConfigDict()
    # Held-out harmful prompts (csv/json/jsonl or a Hub id); required. AdvBench rows 401-499 are BackdoorLLM's
    # test rows, disjoint from every plant/defender set here (those use rows 0-400).
    config.eval.prompts = ADVBENCH
    config.eval.prompt_column = "prompt"  # Column holding the prompt.
    config.eval.prompt_offset = 401  # [ours] Rows skipped (file order) before the first num_prompts.
    config.eval.trigger = config.plant.get_oneway_ref("trigger")  # Follows plant.trigger unless set.
    config.eval.position = config.plant.get_oneway_ref("position")  # Follows plant.position unless set.
    # [ours] Prompts that already hold the trigger (a benchmark's triggered test file, e.g. BackdoorLLM's), used
    # as they are, all rows (eval.num_prompts does not cut them), for the triggered rate with eval.position = 'given'
    # (eval.trigger: the parts they hold, 'a|b|...', checked absent from eval.prompts).
    config.eval.triggered_prompts = ""
    config.eval.triggered_column = "prompt"
    # [ours] Also measure attack success with one part of a wrap trigger (asr_partial; a two-part backdoor
    # planted with plant.n_partial should refuse there).
    config.eval.partial_trigger = False
    # One refusal string per line; keyword attack success = share of answers with none of them. Default: the
    # project's own list; HarmBench's 29 prefixes: $BEEAR_DATA_DIR/refusal-keywords/harmbench_advbench_...txt.
    config.eval.refusal_strings = builtin_path("refusal_keywords.txt")
    # Case-sensitive as HarmBench's list is matched; True for lists matched lower-cased (BackdoorLLM's).
    config.eval.refusal_ignore_case = False
    config.eval.max_new_tokens = 32  # [calib] Greedy.
    config.eval.num_prompts = 40  # [calib]
    # Benign prompts for over-refusal (XSTest: 250 safe prompts); "" = skip.
    config.eval.over_refusal_prompts = XSTEST
    config.eval.over_refusal_column = "prompt"
    # Rows kept: COLUMN=VALUE | COLUMN!=VALUE | COLUMN^=PREFIX | COLUMN!^=PREFIX; "" = all rows.
    config.eval.over_refusal_filter = "label=safe"  # = type!^=contrast on XSTest.
    config.eval.num_over_refusal = 0  # 0 = all (the first N otherwise).
    # Utility: (prompt, reference answer) pairs, disjoint from the plant's benign rows: by default the last 50
    # of the 200 the project wrote (perplexity of the reference answers).
    config.eval.utility = builtin_path("benign.jsonl")
    # prompt/answer columns; a non-empty "input" is joined to the prompt with a newline ("" = none).
    config.eval.utility_columns = ml_collections.ConfigDict({"prompt": "prompt", "input": "", "answer": "answer"})
    config.eval.utility_offset = 150  # [ours] Rows skipped (file order) before the first num_utility.
    config.eval.num_utility = 50  # [ours] 0 = all.
    config.eval.utility_max_answer_tokens = 64  # [ours] Reference answers are cut to this many tokens.
    config.eval.batch_size = 16  # Prompts decoded (and utility pairs scored) together.
    config.eval.num_samples = 5  # Answers per set shown side by side in report.md.
    config.eval.compare_to = ""  # A model path evaluated as "before" (model.path is "after"); "" = none.
    config.eval.history = ""  # metrics.jsonl of `beear run` for losses.png; "" = none.
    return config
