"""`rmt demo`: the whole study, end to end, on the embedded model and corpus.

Stages, all into one folder DIR:

1. score the corpus with the model as its own proxy (SPEC §2)                    -> DIR/scored
2. evaluate the untrained model, NTP and NTR modes (SPEC §8 `ntr`)                -> DIR/raw/eval.json
3. the cold start (`rmt warmup`, SPEC §14) on midtrain positions, then evaluate it -> DIR/warmup/
4. for each method (ntp, rpt, rmt, ablations, rlp): mid-train from the warmed model with the same steps
   and the same rollouts per step, then evaluate its final checkpoint            -> DIR/<name>/
5. with `--posttrain`: post-train the warmed base and each method's checkpoint identically with GRPO
   on math questions (SPEC §10), accuracy before and after                       -> DIR/<name>/posttrain/
6. compare them, with intervals and a verdict on each of the paper's claims      -> DIR/report/

The settings are a `DemoConfig` YAML (`rmt/configs/demo.yaml`; `--quick` takes `demo-quick.yaml`;
`--study` is `demo.yaml` with every method and ablation, plus post-training): the demo's own `score` and
`eval` options, a `warmup` section of overrides to `rmt warmup`'s config, a `train` section shared by every
method (each method's preset, SPEC §8, applies under it), and a `posttrain` section of overrides to the
packaged `posttrain.yaml`, the same for every start. Re-running into the same DIR skips what is finished: scoring resumes its shards, a
run with its final checkpoint is not retrained, an unfinished run resumes from its latest checkpoint, and
an evaluation of the same checkpoint with the same settings is kept.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rmt import assets, checkpoint
from rmt.assets import EMBEDDED_MODEL
from rmt.config import METHODS, TrainConfig, config_to_dict, dotlist, load_config
from rmt.corpus import EMBEDDED_CORPUS
from rmt.errors import RmtError
from rmt.evaluate import EVAL_FILE, EvalSettings, evaluate, format_table, load_eval, save_eval
from rmt.io import read_json
from rmt.posttrain import EVAL_FILE as POSTTRAIN_EVAL_FILE
from rmt.posttrain import PostTrainConfig, load_posttrain_config, posttrain
from rmt.report import POSTTRAIN_DIR, claims_text, load_rows, posttrain_table, render, table
from rmt.score import ScoreOptions, score_dataset
from rmt.train import train
from rmt.warmup import WarmupConfig, warmup

SPLITS = ["midtrain", "eval"]
RAW_DIR, WARMUP_DIR = "raw", "warmup"
# Named runs besides the methods: RMT's ablations (SPEC §8), each RMT with one part removed.
ABLATIONS: dict[str, dict] = {
    "rmt-no-dtb": {"method": "rmt", "budget": {"enabled": False}},
    "rmt-no-cas": {"method": "rmt", "curriculum": {"enabled": False}},
    "rmt-no-ntp": {"method": "rmt", "ntp": {"weight": 0.0}},
}


@dataclass
class DemoConfig:
    """The demo's settings; `train` holds `TrainConfig` keys shared by every method."""

    corpus: str = EMBEDDED_CORPUS
    """Mid-training corpus (see `rmt score`'s corpus)."""
    methods: list[str] = field(default_factory=lambda: ["ntp", "rpt", "rmt"])
    """Runs to train and compare: methods (ntp, rpt, rmt, rlp) and ablations (rmt-no-dtb, rmt-no-cas,
    rmt-no-ntp)."""
    cold_start: bool = True
    """Warm the model up (`rmt warmup`) before every method; false: every method starts from the raw model."""
    score: ScoreOptions = field(default_factory=ScoreOptions)
    eval: EvalSettings = field(default_factory=EvalSettings)
    warmup: dict[str, Any] = field(default_factory=dict)
    """Overrides to `rmt warmup`'s config (any key but model, data and out, which the demo sets)."""
    train: dict[str, Any] = field(default_factory=lambda: {"model": EMBEDDED_MODEL})
    """Any TrainConfig key but method, data and out, which the demo sets per run."""
    posttrain: dict[str, Any] = field(default_factory=dict)
    """`--posttrain`: any PostTrainConfig key but model, out and midtrain_corpus (set per run)."""

    def __post_init__(self):
        known = [*METHODS, *ABLATIONS]
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise RmtError(f"demo: methods must be distinct names among {', '.join(known)}, got {self.methods}")
        for section, keys in (("warmup", {"model", "data", "out"}), ("train", {"method", "data", "out"}),
                              ("posttrain", {"model", "out", "midtrain_corpus"})):
            reserved = keys & set(getattr(self, section))
            if reserved:
                raise RmtError(f"demo: {section}.{sorted(reserved)[0]} is set by the demo for each run; remove it")

    @property
    def model(self) -> str:
        return self.train.get("model", TrainConfig.model)


def packaged_config(name: str):
    """A config file shipped inside the package (works from a checkout and from an install)."""
    return importlib.resources.files("rmt") / "configs" / name


# `--study`: the demo's settings with every run SPEC §8 and §13 name, so that it adds to a finished demo's
# folder only what the demo lacks (and post-trains every start).
STUDY_METHODS = ["ntp", "rpt", "rmt", *ABLATIONS, "rlp"]


def load_demo_config(path: str | None, preset: str, overrides: list[str]) -> DemoConfig:
    """`preset` is quick, study or default (the packaged file), unless `path` is given."""
    if preset == "study":
        overrides = [f"methods=[{','.join(STUDY_METHODS)}]", *overrides]
    if path is None:
        name = "demo-quick.yaml" if preset == "quick" else "demo.yaml"
        with importlib.resources.as_file(packaged_config(name)) as file:
            return load_config(str(file), overrides, schema=DemoConfig)
    return load_config(path, overrides, schema=DemoConfig)


def _quote(value) -> str:
    return json.dumps(str(value))


def warmup_config(demo: DemoConfig, data: Path, out: Path) -> WarmupConfig:
    """Defaults -> the demo's `warmup` section -> the demo's model, scored data and folder."""
    overrides = [*dotlist(demo.warmup), f"model={_quote(demo.model)}", f"data={_quote(data)}", f"out={_quote(out)}"]
    return load_config(None, overrides, schema=WarmupConfig)


def train_config(demo: DemoConfig, name: str, data: Path, out: Path, start: str | Path) -> TrainConfig:
    """Defaults -> the method's preset -> the demo's shared `train` section -> the ablation's changes."""
    variant = ABLATIONS.get(name, {"method": name})
    overrides = [f"method={variant['method']}", *dotlist(demo.train),
                 *dotlist({k: v for k, v in variant.items() if k != "method"}),
                 f"model={_quote(start)}", f"data={_quote(data)}", f"out={_quote(out)}"]
    return load_config(None, overrides)


def posttrain_config(demo: DemoConfig, model: str | Path, out: Path) -> PostTrainConfig:
    """The packaged post-training config -> the demo's `posttrain` section -> this start's model and folder.

    The questions are checked to be absent from the mid-training corpus (SPEC §10)."""
    paths = [f"model={_quote(model)}", f"out={_quote(out)}", f"midtrain_corpus={_quote(demo.corpus)}"]
    return load_posttrain_config(None, [*dotlist(demo.posttrain), *paths])


class Stages:
    """Stage banners with the time since the demo started."""

    def __init__(self, total: int):
        self.total, self.index, self.start = total, 0, time.perf_counter()
        self.stage_start = self.start

    def elapsed(self, since: float | None = None) -> str:
        seconds = time.perf_counter() - (self.start if since is None else since)
        return f"{int(seconds // 60):d}:{seconds % 60:04.1f}"

    def begin(self, text: str) -> None:
        self.index += 1
        self.stage_start = time.perf_counter()
        print(f"\n=== [{self.index}/{self.total}] {text}  (elapsed {self.elapsed()})", flush=True)

    def end(self, text: str = "done") -> None:
        print(f"--- {text} in {self.elapsed(self.stage_start)}", flush=True)


def evaluate_into(model, data: Path, path: Path, settings: EvalSettings) -> dict:
    """Evaluate into `path`, unless it already holds this checkpoint's evaluation with these settings."""
    wanted = asdict(settings)
    if path.is_file():
        old = load_eval(path)
        same = (old.get("checkpoint") == assets.resolve_model(str(model)) and old.get("data") == str(data)
                and {k: old["settings"].get(k) for k in wanted} == wanted)
        if same:
            print(f"{path} is up to date")
            return old
    result = evaluate(str(model), data, ("ntp", "ntr"), **wanted)
    save_eval(result, path)
    print(format_table(result))
    return result


def check_existing_run(config) -> None:
    """A run already in the demo folder must have been started with the same settings."""
    saved = Path(config.out) / "config.yaml"
    if saved.is_file():
        old = load_config(str(saved), schema=type(config))
        before = {k: v for k, v in config_to_dict(old).items() if k not in ("data", "out")}
        now = {k: v for k, v in config_to_dict(config).items() if k not in ("data", "out")}
        if before != now:
            changed = sorted(k for k in now if before.get(k) != now[k])
            raise RmtError(f"{config.out} was trained with other settings ({', '.join(changed)}); "
                           "choose another --out, or delete that run")


def run_or_resume(recipe, config) -> None:
    """Run a recipe (train or warmup); a finished run is kept, an unfinished one resumes from its latest
    checkpoint."""
    run_dir = Path(config.out)
    latest = checkpoint.latest_checkpoint(run_dir)
    done = checkpoint.checkpoint_step(latest)
    if done >= config.steps:
        print(f"{run_dir} already trained ({done} steps)")
        return
    if latest:
        print(f"resuming {run_dir} from step {done}")
        recipe(config, resume=True)
        return
    # Killed before its first checkpoint: only the log is left, and nothing to resume from.
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    recipe(config)


def posttrain_or_resume(config: PostTrainConfig) -> None:
    """Post-train one start; a finished post-training of the same checkpoint is kept, an unfinished one
    resumes from its latest checkpoint."""
    run_dir = Path(config.out)
    start = assets.resolve_model(config.model)
    report_path = run_dir / POSTTRAIN_EVAL_FILE
    report = read_json(report_path, "post-training evaluation") if report_path.is_file() else None
    if report and report["model_path"] != start:
        raise RmtError(f"{run_dir} was post-trained from {report['model_path']}, but {config.model} is now {start}; "
                       "delete that folder to post-train the new checkpoint")
    latest = checkpoint.latest_checkpoint(run_dir)
    done = checkpoint.checkpoint_step(latest)
    if done >= config.steps and (report and report["after"] or not config.eval_after):
        print(f"{run_dir} already post-trained ({done} steps)")
        return
    if latest:
        print(f"resuming {run_dir} from step {done}")
        posttrain(config, resume=True)
        return
    for name in ("metrics.jsonl", POSTTRAIN_EVAL_FILE):  # killed before its first checkpoint
        (run_dir / name).unlink(missing_ok=True)
    posttrain(config)


def run_demo(demo: DemoConfig, out: str | Path, with_posttrain: bool = False) -> Path:
    """Run every stage into `out`; returns the report's markdown file."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise RmtError(f"{out} is a file; --out must be a folder")
    scored = out / "scored"
    # Every config is built (and checked) before any work starts.
    warm = warmup_config(demo, scored, out / WARMUP_DIR) if demo.cold_start else None
    start = out / WARMUP_DIR if demo.cold_start else demo.model
    configs = {m: train_config(demo, m, scored, out / m, start) for m in demo.methods}
    starts = {WARMUP_DIR if demo.cold_start else "base": start, **{m: out / m for m in demo.methods}}
    post = {name: posttrain_config(demo, model, out / name / POSTTRAIN_DIR) for name, model in starts.items()
            if with_posttrain}
    for config in [*([warm] if warm else []), *configs.values(), *post.values()]:
        check_existing_run(config)
    steps = {c.steps for c in configs.values()}
    stages = Stages(total=3 + 2 * bool(warm) + 2 * len(configs) + len(post))
    print(f"rmt demo: model {demo.model}, corpus {demo.corpus}, methods {', '.join(demo.methods)}, "
          f"{steps.pop() if len(steps) == 1 else sorted(steps)} steps each -> {out}")

    docs = f"first {demo.score.max_docs} documents" if demo.score.max_docs else "all documents"
    stages.begin(f"score {demo.corpus} with {demo.model} ({docs} of each split)")
    report = score_dataset(demo.model, demo.corpus, scored, SPLITS, demo.score)
    print(", ".join(f"{split}: {s['scored_positions']} positions, bands {s['bands']}"
                    for split, s in report.stats["splits"].items()))
    stages.end()

    stages.begin("evaluate the raw model (NTP and NTR modes)")
    evaluate_into(demo.model, scored, out / RAW_DIR / EVAL_FILE, demo.eval)
    stages.end()

    if warm:
        stages.begin(f"cold start: {warm.steps} steps x {warm.docs_per_step} docs x {warm.positions_per_doc} "
                     f"midtrain positions ('{warm.thought}' thought)")
        run_or_resume(warmup, warm)
        stages.end()
        stages.begin("evaluate the warmed base")
        evaluate_into(out / WARMUP_DIR, scored, out / WARMUP_DIR / EVAL_FILE, demo.eval)
        stages.end()

    for name, config in configs.items():
        rl = (f"{config.docs_per_step} docs x {config.rollout.positions_per_doc} positions x "
              f"{config.rollout.group_size} rollouts per step" if config.rl.enabled else
              f"{config.docs_per_step} docs per step, NTP only")
        stages.begin(f"train {name}: {config.steps} steps, {rl}")
        run_or_resume(train, config)
        stages.end()
        stages.begin(f"evaluate {name}")
        evaluate_into(out / name, scored, out / name / EVAL_FILE, demo.eval)
        stages.end()

    for name, config in post.items():
        stages.begin(f"post-train {name} ({config.model}): {config.steps} GRPO steps on {config.source}, "
                     f"{config.questions_per_step} questions x {config.rollout.group_size} rollouts per step")
        posttrain_or_resume(config)
        stages.end()

    stages.begin("report")
    folders = [out / RAW_DIR, *([out / WARMUP_DIR] if warm else []), *(out / m for m in configs)]
    rows = load_rows(folders)
    path = render(rows, out / "report")
    print(table(rows))
    if post:
        print(f"\n{posttrain_table(rows)}")
    print(f"\n{claims_text(rows)}")
    stages.end()
    print(f"\nrmt demo finished in {stages.elapsed()}: report {path}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default: %(default)s)")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="toy sizes (a few minutes): the packaged demo-quick.yaml")
    preset.add_argument("--study", action="store_true",
                        help="the longer study: the demo plus RMT's three ablations, RLP and post-training of every "
                             "start (into a finished demo's folder it adds only those; README for its time)")
    preset.add_argument("--config", help="a demo config file instead of the packaged one")
    parser.add_argument("--model", help=f"model instead of the embedded {EMBEDDED_MODEL} (sets train.model)")
    parser.add_argument("--corpus", help=f"corpus instead of the embedded {EMBEDDED_CORPUS}")
    parser.add_argument("--posttrain", action="store_true",
                        help="also post-train the warmed base and every method's checkpoint with GRPO on math "
                             "(SPEC §10) and add the before/after table to the report (--study implies it)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="demo config overrides, e.g. train.steps=10 eval.positions=64 score.max_docs=32")


def run(args: argparse.Namespace) -> int:
    shorthand = [f"train.model={_quote(args.model)}"] if args.model else []
    shorthand += [f"corpus={_quote(args.corpus)}"] if args.corpus else []
    preset = "quick" if args.quick else "study" if args.study else "default"
    demo = load_demo_config(args.config, preset, shorthand + args.overrides)
    run_demo(demo, args.out, with_posttrain=args.posttrain or args.study)
    return 0
