"""One typed configuration tree for `rmt train` (and `rmt posttrain`), loaded from YAML with
`key=value` command-line overrides. Unknown keys and wrong types are errors that name the key.

Order of precedence (lowest first): dataclass defaults → the method's preset (SPEC §8) → the config
file → command-line overrides. The resolved tree is saved as `config.yaml` in every run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rmt.errors import RmtError

METHODS = ("rmt", "rpt", "ntp")


@dataclass
class BudgetConfig:
    """Dynamic token budget (SPEC §3): B_t = max(b_min, floor(b0 · gamma^(t/T)))."""

    enabled: bool = True
    b0: int = 800  # paper
    b_min: int = 1  # paper
    gamma: float = 0.2  # paper
    # Without the budget (RPT, the no-DTB ablation): fixed reasoning cap and no length reward.
    fixed_max_tokens: int = 800


@dataclass
class CurriculumConfig:
    """Curriculum-based adaptive sampling (SPEC §5); disabled = uniform over positions above the floor."""

    enabled: bool = True
    p_early: list[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])
    p_late: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    t1: float = 0.3  # paper
    t2: float = 0.7  # paper


@dataclass
class RewardConfig:
    """r = (1 − length_weight)·r_match + length_weight·r_len (SPEC §4)."""

    match: str = "exact"  # exact (RMT) or prefix (RPT)
    # The paper does not give w. 0.2 keeps a correct prediction worth far more than any length,
    # while still separating short from overlong reasoning within a group.
    length_weight: float = 0.2
    r_max: float = 1.0


@dataclass
class RolloutConfig:
    group_size: int = 8  # G (paper)
    positions_per_doc: int = 4  # positions sampled per document; they share the document's prefix
    temperature: float = 1.0
    top_p: float = 1.0
    force_answer: bool = True
    answer_tokens: int = 16  # allowance for the boxed answer after the reasoning cap
    batch_size: int = 32  # sequences per generation batch
    prompt_style: str = "auto"  # auto | chat | plain
    prefill_think: bool = True  # the prompt ends with "<think>\n"
    zero_std: str = "keep"  # keep | skip: groups whose rewards are all equal carry no signal
    # Encode each document's prompt prefix once and decode all its positions' rollouts from that
    # cache (false: one full prompt per rollout, the reference path).
    shared_prefix: bool = True


@dataclass
class RLConfig:
    """GRPO (SPEC §6)."""

    enabled: bool = True
    clip_eps: float = 0.2
    adv_eps: float = 1e-6
    kl_coef: float = 0.0  # RPT used no KL; >0 keeps a frozen reference model


@dataclass
class NTPConfig:
    """Dual objective (SPEC §7): L = L_RL + weight · L_NTP, RL positions masked out of L_NTP."""

    weight: float = 0.1  # λ (paper)


@dataclass
class OptimConfig:
    lr: float = 1e-6  # paper (14B); the CPU demo config raises it
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch: int = 16  # sequences per training forward (unpacked path); gradients accumulate
    # One forward per document over [window | prompt prefix | post + response_1 | ...] with a block
    # attention mask, computing NTP and all its responses' log-probs (false: the reference path).
    packed: bool = True
    pack_tokens: int = 2048  # longest packed sequence; a document with more responses gets several packs


@dataclass
class TrainConfig:
    method: str = "rmt"  # rmt | rpt | ntp (SPEC §8)
    model: str = "smollm2-135m-instruct"
    data: str = "runs/scored"  # an `rmt score` output folder
    out: str = "runs/train"
    steps: int = 100  # T
    docs_per_step: int = 4
    seed: int = 0
    save_every: int = 50
    keep_last: int = 2
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    gradient_checkpointing: bool = False
    log_tensorboard: bool = False
    log_wandb: bool = False
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    ntp: NTPConfig = field(default_factory=NTPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got '{self.method}'"),
            (self.steps > 0, "steps must be positive"),
            (self.docs_per_step > 0, "docs_per_step must be positive"),
            (self.reward.match in ("exact", "prefix"), f"reward.match must be exact or prefix, got '{self.reward.match}'"),
            (0 <= self.reward.length_weight <= 1, "reward.length_weight must be in [0, 1]"),
            (self.rollout.group_size >= 2, "rollout.group_size must be at least 2 (GRPO compares within a group)"),
            (self.rollout.positions_per_doc >= 1, "rollout.positions_per_doc must be at least 1"),
            (self.rollout.zero_std in ("keep", "skip"), "rollout.zero_std must be keep or skip"),
            (self.rollout.prompt_style in ("auto", "chat", "plain"), "rollout.prompt_style must be auto, chat or plain"),
            (self.dtype in ("auto", "float32", "bfloat16"), "dtype must be auto, float32 or bfloat16"),
            (len(self.curriculum.p_early) == 3 and len(self.curriculum.p_late) == 3,
             "curriculum.p_early and p_late need 3 probabilities (easy, medium, hard)"),
            (0 <= self.curriculum.t1 <= self.curriculum.t2 <= 1, "need 0 <= curriculum.t1 <= curriculum.t2 <= 1"),
            (self.save_every > 0 and self.keep_last > 0, "save_every and keep_last must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise RmtError(f"config: {message}")
        if self.method == "ntp" and self.rl.enabled:
            raise RmtError("config: method ntp trains without RL; use method=rmt, or rl.enabled=false")


# SPEC §8: what each method changes from the defaults (which are RMT's).
PRESETS: dict[str, dict] = {
    "rmt": {},
    "rpt": {
        "budget": {"enabled": False},
        "curriculum": {"enabled": False},
        "reward": {"match": "prefix", "length_weight": 0.0},
        "ntp": {"weight": 0.0},
    },
    "ntp": {"rl": {"enabled": False}, "ntp": {"weight": 1.0}},
}


def load_config(path: str | None = None, overrides: list[str] | None = None, schema=TrainConfig):
    """Defaults → method preset → YAML file → `key=value` overrides, checked against `schema`."""
    try:
        file_conf = OmegaConf.load(path) if path else OmegaConf.create()
        cli_conf = OmegaConf.from_dotlist(list(overrides or []))
        base = OmegaConf.structured(schema)
        method = OmegaConf.select(cli_conf, "method") or OmegaConf.select(file_conf, "method")
        preset = PRESETS.get(method or getattr(schema, "method", ""), {}) if "method" in base else {}
        merged = OmegaConf.merge(base, preset, file_conf, cli_conf)
        return OmegaConf.to_object(merged)
    except FileNotFoundError as exc:
        raise RmtError(f"config file not found: {path}") from exc
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0]
        raise RmtError(f"config: {first}" + (f" (key: {key})" if key else "")) from exc


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def config_to_dict(config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))
