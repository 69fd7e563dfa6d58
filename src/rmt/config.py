"""One configuration grammar for every command: a typed dataclass tree, `--config FILE`, `key=value`.

Order of precedence (lowest first): dataclass defaults → a method's preset (SPEC §8, `rmt train`) → the
config file → command-line flags and `key=value` overrides. Unknown keys and wrong types are errors that
name the key; ranges are checked in each dataclass's `__post_init__`, so a bad value fails when the config
is loaded -- before any model is read or any file written. Every field carries a docstring (the string
literal right after it), from which `rmt COMMAND --help` lists every key. The resolved tree is saved as
`config.yaml` in every run folder.

This module holds the grammar and the mid-training config (`TrainConfig`); each other command's dataclass
lives beside its code (`ScoreConfig`, `EvalConfig`, `PostTrainConfig`, `WarmupConfig`, `DemoConfig`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rmt.errors import RmtError

METHODS = ("rmt", "rpt", "ntp", "rlp")


def check(conditions: list[tuple[bool, str]], prefix: str = "config") -> None:
    """Raise one RmtError for the first failed `(ok, message)` pair."""
    for ok, message in conditions:
        if not ok:
            raise RmtError(f"{prefix}: {message}")


def is_probability_vector(p, n: int = 3) -> bool:
    return len(p) == n and all(0 <= x <= 1 for x in p) and abs(sum(p) - 1) < 1e-6


@dataclass
class BudgetConfig:
    """Dynamic token budget (SPEC §3): B_t = max(b_min, floor(b0 · gamma^(t/T)))."""

    enabled: bool = True
    """Use the dynamic budget: B_t in the prompt, a reasoning cap of 2·B_t and the length reward."""
    b0: int = 800
    """B_0, the budget at step 0 (paper: 800)."""
    b_min: int = 1
    """B_min, the smallest budget (paper: 1)."""
    gamma: float = 0.2
    """γ, the budget's decay over the run: B_T = B_0·γ (paper: 0.2)."""
    max_reasoning_tokens: int = 800
    """Reasoning cap when the budget is off (RPT, RLP, the no-DTB ablation); no length reward then."""

    def __post_init__(self):
        check([
            (self.b0 >= 1 and self.b_min >= 1, "budget.b0 and budget.b_min must be >= 1"),
            (0 < self.gamma <= 1, f"budget.gamma must be in (0, 1], got {self.gamma}"),
            (self.max_reasoning_tokens >= 1, "budget.max_reasoning_tokens must be >= 1"),
        ])

    def at(self, step: int, total_steps: int) -> int | None:
        """B_t of a step (SPEC §3); None with the dynamic budget off."""
        from rmt.budget import token_budget

        return token_budget(step, total_steps, self.b0, self.b_min, self.gamma) if self.enabled else None

    def cap(self, step_budget: int | None) -> int:
        """Reasoning tokens a rollout may spend: 2·B_t (past it the length reward is 0), or the fixed cap."""
        return 2 * step_budget if step_budget is not None else self.max_reasoning_tokens


@dataclass
class CurriculumConfig:
    """Curriculum-based adaptive sampling (SPEC §5); disabled = uniform over positions above the floor."""

    enabled: bool = True
    """Sample positions by band from p_t; false: uniformly above the entropy floor (RPT)."""
    p_early: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    """Band distribution (easy, medium, hard) before t1·T (paper value unknown; SPEC's default)."""
    p_late: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    """Band distribution after t2·T; linear interpolation in between."""
    t1: float = 0.3
    """First switch point, as a fraction of the run (paper: 0.3)."""
    t2: float = 0.7
    """Second switch point, as a fraction of the run (paper: 0.7)."""

    def __post_init__(self):
        check([
            (is_probability_vector(self.p_early) and is_probability_vector(self.p_late),
             "curriculum.p_early and p_late must each be 3 probabilities in [0, 1] (easy, medium, hard) "
             f"summing to 1, got {list(self.p_early)} and {list(self.p_late)}"),
            (0 <= self.t1 <= self.t2 <= 1, "need 0 <= curriculum.t1 <= curriculum.t2 <= 1"),
        ])


REWARD_NAMES = ("exact", "prefix", "rlp")


@dataclass
class RewardConfig:
    """The reward (SPEC §4, §13): `rmt.rewards.build_reward` turns this section into a reward object."""

    name: str = "exact"
    """exact (RMT: the boxed answer equals the next token), prefix (RPT: a token-aligned prefix of the
    continuation), rlp (RLP: log-likelihood gain of the next token from the thought, SPEC §13), or
    package.module:Class, your own reward class (see `rmt.rewards`), built with no arguments."""
    length_weight: float = 0.2
    """w in r = (1 − w)·r_match + w·r_len, with the budget on. The paper does not give it: 0.2 keeps a correct
    prediction worth far more than any length while still separating short from overlong reasoning."""
    r_max: float = 1.0
    """Peak of the triangular length reward (SPEC §3)."""
    length_needs_close: bool = True
    """The length reward counts only for reasoning the policy closed with </think> itself. A reasoning cut
    by the cap, or ended by an end-of-sequence token that answer forcing replaced, earns no length reward:
    otherwise RL rewards stopping early and then whatever the forced answer holds (see README, "The cold
    start")."""
    ema_decay: float = 0.999
    """rlp: τ of the no-thought baseline model φ ← τ·φ + (1−τ)·θ after every optimizer step (paper: 0.999)."""

    def __post_init__(self):
        check([
            (self.name in REWARD_NAMES or ":" in self.name,
             f"reward.name must be one of {', '.join(REWARD_NAMES)} or package.module:Class, got '{self.name}'"),
            (0 <= self.length_weight <= 1, f"reward.length_weight must be in [0, 1], got {self.length_weight}"),
            (self.r_max > 0, "reward.r_max must be positive"),
            (0 <= self.ema_decay < 1, f"reward.ema_decay must be in [0, 1), got {self.ema_decay}"),
        ])


PROMPT_STYLES = ("auto", "chat", "plain", "raw")
ENGINES = ("rmt", "vllm")


@dataclass
class RolloutConfig:
    """How responses are sampled (SPEC §1, §3)."""

    group_size: int = 8
    """G, responses per position (paper: 8)."""
    positions_per_doc: int = 4
    """RL positions sampled per document; all of a document's positions share its prompt prefix."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set holding this probability, in (0, 1]."""
    answer: bool = True
    """Sample a boxed answer after the reasoning (false: stop at </think>, as RLP's thoughts do)."""
    force_answer: bool = True
    """Answer forcing (SPEC §3): close </think> and open \\boxed{ for the policy when it has not;
    the inserted tokens are masked out of the RL loss."""
    answer_tokens: int = 16
    """Tokens allowed for the answer after the reasoning."""
    batch_size: int = 32
    """Sequences per generation batch."""
    prompt_style: str = "auto"
    """auto (chat when the tokenizer has a template), chat, plain (instruction without a template, for
    base models) or raw (the bare context, then <think>: RLP's prompt)."""
    prefill_think: bool = True
    """The prompt ends with "<think>\\n", so the response starts inside the reasoning."""
    zero_std: str = "keep"
    """keep | skip: groups whose rewards are all equal carry no signal; skip leaves them out of the loss."""
    shared_prefix: bool = True
    """Encode each document's prompt prefix once and decode all its positions' rollouts from that cache
    (false: one full prompt per rollout, the reference path)."""
    engine: str = "rmt"
    """rmt (the built-in batched sampler with its shared-prefix cache) or vllm (pip install 'rmt[vllm]': one
    colocated vLLM engine per process, automatic prefix caching, weights pushed after every optimizer step)."""
    vllm_gpu_memory: float = 0.3
    """vllm: share of the GPU's memory the engine may take (the rest is training's)."""
    vllm_sleep: bool = False
    """vllm: release the engine's GPU memory while the policy trains (sleep mode; not on CPU)."""

    def __post_init__(self):
        check([
            (self.engine in ENGINES, f"rollout.engine must be one of {', '.join(ENGINES)}, got '{self.engine}'"),
            (0 < self.vllm_gpu_memory < 1, "rollout.vllm_gpu_memory must be in (0, 1)"),
            (self.group_size >= 2, "rollout.group_size must be at least 2 (GRPO compares within a group)"),
            (self.positions_per_doc >= 1, "rollout.positions_per_doc must be at least 1"),
            (self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}"),
            (self.answer_tokens >= 1 and self.batch_size >= 1, "rollout.answer_tokens and batch_size must be >= 1"),
            (self.prompt_style in PROMPT_STYLES,
             f"rollout.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got '{self.prompt_style}'"),
            (self.zero_std in ("keep", "skip"), f"rollout.zero_std must be keep or skip, got '{self.zero_std}'"),
        ])


ADVANTAGES = ("grpo", "rlp")
LOSS_TOKENS = ("sampled", "thought")


@dataclass
class RLConfig:
    """The policy update (SPEC §6; RLP's variant, SPEC §13)."""

    enabled: bool = True
    """RL on the sampled positions (false: no rollouts, NTP only)."""
    advantage: str = "grpo"
    """grpo: (r − mean)/(std + ε) within a group; rlp: G/(G−1)·(r − mean), no std normalisation."""
    loss_tokens: str = "sampled"
    """Response tokens the surrogate covers: sampled (every token the policy sampled) or thought (only the
    reasoning before </think>, RLP)."""
    clip_eps: float = 0.2
    """ε of the PPO-style clipped ratio."""
    adv_eps: float = 1e-6
    """ε added to the group's standard deviation."""
    kl_coef: float = 0.0
    """β of a KL penalty to the frozen starting model (RPT used none); > 0 keeps a reference copy."""
    control: bool = False
    """Also roll out the frozen starting model on every step's prompts, with the same random draws, and log
    its match reward (`control_match_mean`, per band `control_match_easy`, ...): the policy's match minus
    the control's is learning measured on the same positions, free of which positions a step happened to
    draw. Costs one more rollout phase per step and a copy of the model; the built-in engine rolls it out.
    Skipped for rewards that run the policy (RLP)."""

    def __post_init__(self):
        check([
            (self.advantage in ADVANTAGES, f"rl.advantage must be one of {', '.join(ADVANTAGES)}"),
            (self.loss_tokens in LOSS_TOKENS, f"rl.loss_tokens must be one of {', '.join(LOSS_TOKENS)}"),
            (0 < self.clip_eps < 1, f"rl.clip_eps must be in (0, 1), got {self.clip_eps}"),
            (self.adv_eps > 0 and self.kl_coef >= 0, "rl.adv_eps must be > 0 and rl.kl_coef >= 0"),
        ])


@dataclass
class NTPConfig:
    """Dual objective (SPEC §7): L = L_RL + weight · L_NTP, RL positions masked out of L_NTP."""

    weight: float = 0.1
    """λ (paper: 0.1); 0 turns the NTP term off."""

    def __post_init__(self):
        check([(self.weight >= 0, f"ntp.weight must be >= 0, got {self.weight}")])


@dataclass
class OptimConfig:
    """AdamW with a constant learning rate after a linear warm-up."""

    lr: float = 1e-6
    """Learning rate (paper: 1e-6 at 14B)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    micro_batch: int = 16
    """Sequences per training forward on the unpacked path; gradients accumulate."""
    packed: bool = True
    """One forward per document over [window | prompt prefix | post + response_1 | ...] with a block
    attention mask, computing NTP and all its responses' log-probs (false: the reference path)."""
    pack_tokens: int = 4096
    """Longest packed sequence; a document with more responses gets several packs, each with its own copy of
    the document's prefix. Attention computes only the pairs the mask allows, so a pack's cost grows about
    linearly with its length: the limit is the memory of one pack's activations and logits."""

    def __post_init__(self):
        check([
            (self.lr > 0, f"optim.lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two values in [0, 1)"),
            (self.warmup_steps >= 0 and self.grad_clip > 0, "optim.warmup_steps must be >= 0 and grad_clip > 0"),
            (self.micro_batch >= 1 and self.pack_tokens >= 1, "optim.micro_batch and pack_tokens must be >= 1"),
        ])


DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class RunConfig:
    """What every training command shares: model, output, length, seed, checkpoints, precision."""

    model: str = "smollm2-135m-instruct"
    """Hugging Face hub name, model folder, run folder (its latest checkpoint) or smollm2-135m-instruct."""
    out: str = "runs/train"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/."""
    steps: int = 100
    """T, optimizer steps of the run."""
    seed: int = 0
    """Seed of every random choice of the run (data order, positions, rollouts)."""
    save_every: int = 50
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    dtype: str = "auto"
    """auto: fp32 parameters (the master copy, sharded under FSDP) with bf16 compute on GPUs, fp32 on CPUs;
    float32: fp32 everywhere; bfloat16: bf16 parameters, gradients and optimizer state -- half the memory,
    but updates smaller than bf16's resolution (~1/256 of a weight) are lost: a last resort where fp32
    does not fit, FSDP first."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (large models)."""
    export_dtype: str = "float32"
    """Precision of the Hugging Face weights in each checkpoint: float32, or bfloat16 (half the size; the
    exact weights for resuming are then kept in the checkpoint's trainer_state/)."""

    def __post_init__(self):
        check([
            (self.export_dtype in ("float32", "bfloat16"), "export_dtype must be float32 or bfloat16"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.save_every >= 1 and self.keep_last >= 1, "save_every and keep_last must be >= 1"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'"),
        ])


@dataclass
class TrainConfig(RunConfig):
    """`rmt train`: mid-training with one of the methods of SPEC §8 (and RLP, SPEC §13)."""

    method: str = "rmt"
    """rmt | rpt | ntp | rlp: a preset of the sections below (SPEC §8); keys you set override it."""
    data: str = "runs/scored"
    """An `rmt score` output folder; its midtrain split is trained on."""
    docs_per_step: int = 4
    """Documents per step (divisible by the number of processes)."""
    log_tensorboard: bool = False
    """Also log metrics to TensorBoard (pip install tensorboard)."""
    log_wandb: bool = False
    """Also log metrics to Weights & Biases (pip install wandb)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    ntp: NTPConfig = field(default_factory=NTPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        super().__post_init__()
        check([
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got '{self.method}'"),
            (self.docs_per_step >= 1, f"docs_per_step must be >= 1, got {self.docs_per_step}"),
            (self.rl.enabled or self.ntp.weight > 0, "with rl.enabled=false, ntp.weight must be > 0: nothing to train"),
            (self.method != "ntp" or not self.rl.enabled,
             "method ntp trains without RL; use method=rmt, or rl.enabled=false"),
            (self.reward.name != "rlp" or not self.rollout.answer,
             "reward.name=rlp scores the thought alone: set rollout.answer=false"),
            (self.rl.loss_tokens != "thought" or self.reward.name == "rlp" or self.rollout.answer,
             "rl.loss_tokens=thought without an answer phase needs reward.name=rlp"),
        ])


# SPEC §8 and §13: what each method changes from the defaults (which are RMT's).
PRESETS: dict[str, dict] = {
    "rmt": {},
    "rpt": {
        "budget": {"enabled": False},
        "curriculum": {"enabled": False},
        "reward": {"name": "prefix", "length_weight": 0.0},
        "ntp": {"weight": 0.0},
    },
    "ntp": {"rl": {"enabled": False}, "ntp": {"weight": 1.0}},
    "rlp": {
        "budget": {"enabled": False, "max_reasoning_tokens": 2048},  # paper: thoughts up to 2,048 tokens
        "curriculum": {"enabled": False},
        "reward": {"name": "rlp", "length_weight": 0.0},
        "rollout": {"group_size": 16, "temperature": 0.7, "prompt_style": "raw", "answer": False,
                    "force_answer": False},  # paper: G = 16, temperature 0.7, raw text
        "rl": {"advantage": "rlp", "loss_tokens": "thought", "kl_coef": 0.0},
        "ntp": {"weight": 0.0},
    },
}


# ---- loading ------------------------------------------------------------------------------------------


def load_config(path: str | None = None, overrides: list[str] | None = None, schema=TrainConfig):
    """Defaults → method preset → YAML file → `key=value` overrides, checked against `schema`."""
    try:
        file_conf = OmegaConf.load(path) if path else OmegaConf.create()
        if not isinstance(file_conf, dict) and not OmegaConf.is_dict(file_conf):
            raise RmtError(f"config file {path}: expected a mapping of keys to values, got a list")
        cli_conf = OmegaConf.from_dotlist(list(overrides or []))
        base = OmegaConf.structured(schema)
        preset = {}
        if "method" in base:
            method = OmegaConf.select(cli_conf, "method") or OmegaConf.select(file_conf, "method") or base.method
            preset = PRESETS.get(method, {})
        merged = OmegaConf.merge(base, preset, file_conf, cli_conf)
        return OmegaConf.to_object(merged)
    except FileNotFoundError as exc:
        raise RmtError(f"config file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise RmtError(f"config file {path} is a folder; give a YAML file") from exc
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0]
        raise RmtError(f"config: {first}" + (f" (key: {key})" if key else "")) from exc
    except Exception as exc:  # a YAML syntax error, or a file that cannot be read
        if type(exc).__module__.startswith("yaml"):
            where = getattr(exc, "problem_mark", None)
            line = f" line {where.line + 1}" if where else ""
            raise RmtError(f"config file {path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        raise


def save_config(config, path: str | Path) -> None:
    from rmt.io import write_text_atomic

    write_text_atomic(Path(path), OmegaConf.to_yaml(OmegaConf.structured(config)))


def config_to_dict(config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


# ---- documentation: every field's docstring ---------------------------------------------------------


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass and its dataclass bases: the string literal that follows
    each field in the class body (the convention of litgpt's configs)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def describe(schema, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf of a config tree; a nested dataclass is described by its own
    docstring's first line and its fields."""
    rows = []
    docs = field_docs(schema)
    defaults = schema() if isinstance(schema, type) else schema
    for f in dataclasses.fields(schema):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", json.dumps(value, default=str), docs.get(f.name, "")))
    return rows


def config_help(schema) -> str:
    """The `key=value` settings of a command, generated from the dataclass tree."""
    lines = ["settings (key=value on the command line, or keys of a --config YAML file):"]
    for key, default, doc in describe(schema):
        first, *rest = (doc or "(undocumented)").split("\n")
        lines.append(f"  {key} = {default}")
        lines += [f"      {text}" for text in textwrap.wrap(" ".join([first, *rest]), 96)]
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A command-line flag that stands for a config key: `--steps 5` is `steps=5`.

    `convert` turns the flag's text into the value (default: as typed); `const` makes it a switch."""

    flag: str
    key: str
    convert: Callable[[str], Any] | None = None
    const: Any = None
    help: str = ""


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_config_arguments(parser: argparse.ArgumentParser, schema, flags: tuple[Flag, ...] = (),
                         default_file: str | None = None) -> None:
    """`--config FILE`, the flags, and `key=value` overrides; `--help` lists every key with its doc."""
    docs = dict((key, doc) for key, _, doc in describe(schema))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = config_help(schema)
    where = f" (default: the packaged {Path(default_file).name})" if default_file else ""
    parser.add_argument("--config", help=f"YAML file of settings{where}; key=value arguments override it")
    for f in flags:
        text = f.help or docs.get(f.key, "").split("\n")[0]
        if f.const is not None:
            parser.add_argument(f.flag, dest=f"flag:{f.key}", action="store_const", const=f.const,
                                help=f"{text} (= {f.key}={json.dumps(f.const)})")
        else:
            parser.add_argument(f.flag, dest=f"flag:{f.key}", metavar=f.key.split(".")[-1].upper(),
                                help=f"{text} (= {f.key}=...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, see below")


def config_from_args(args: argparse.Namespace, schema, flags: tuple[Flag, ...] = (), default_file=None):
    """The resolved config of a command: defaults → file → flags → `key=value` overrides."""
    dotlist = []
    for f in flags:
        value = getattr(args, f"flag:{f.key}", None)
        if value is None:
            continue
        if f.convert is not None and f.const is None:
            try:
                value = f.convert(value)
            except (ValueError, TypeError) as exc:
                raise RmtError(f"{f.flag}: {exc}") from exc
        dotlist.append(f"{f.key}={json.dumps(value)}")
    for item in args.overrides:
        if "=" not in item:
            raise RmtError(f"'{item}' is not a key=value setting (see --help for the keys)")
    return load_config(args.config or default_file, dotlist + list(args.overrides), schema=schema)


def dotlist(tree: dict, prefix: str = "") -> list[str]:
    """`{"a": {"b": 1}}` -> `["a.b=1"]`; values JSON-encoded, which the override grammar reads back exactly."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += dotlist(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out
