"""`rmt demo`: the whole study, end to end, on the embedded model and corpus.

Stages, all into one folder DIR:

1. score the corpus with the model as its own proxy (SPEC §2)         -> DIR/scored
2. evaluate the untrained model, NTP and NTR modes (SPEC §8 `ntr`)     -> DIR/base/eval.json
3. for each method (ntp, rpt, rmt): mid-train with the same steps and the same rollouts per step
   (docs_per_step, positions_per_doc, group_size), then evaluate its final checkpoint
                                                                         -> DIR/<method>/, .../eval.json
4. with `--posttrain`: post-train the base model and each method's checkpoint identically with GRPO on
   math questions (SPEC §10), accuracy before and after                  -> DIR/<name>/posttrain/
5. compare them                                                          -> DIR/report/report.md, *.png

The settings are a `DemoConfig` YAML (`rmt/configs/demo.yaml`; `--quick` takes `demo-quick.yaml`):
the demo's own `score` and `eval` options, a `train` section shared by every method, on top of
which each method's preset (SPEC §8) applies, and a `posttrain` section of overrides to the packaged
`posttrain.yaml`, the same for every starting checkpoint. Re-running into the same DIR skips what is finished:
scoring resumes its shards, a run with its final checkpoint is not retrained, an unfinished run
resumes from its latest checkpoint, and an evaluation of the same checkpoint with the same settings
is kept; so is a finished post-training of the same checkpoint with the same settings.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rmt import checkpoint
from rmt.assets import EMBEDDED_MODEL
from rmt.config import METHODS, TrainConfig, config_to_dict, load_config
from rmt.corpus import EMBEDDED_CORPUS
from rmt.errors import RmtError
from rmt.evaluate import EVAL_FILE, EvalSettings, evaluate, format_table, load_eval, resolve_checkpoint, save_eval
from rmt.posttrain import EVAL_FILE as POSTTRAIN_EVAL_FILE
from rmt.posttrain import PostTrainConfig, load_posttrain_config, posttrain
from rmt.report import POSTTRAIN_DIR, load_rows, posttrain_table, render, table
from rmt.score import ScoreOptions, score_dataset
from rmt.train import train

SPLITS = ["midtrain", "eval"]


@dataclass
class DemoConfig:
    """The demo's settings; `train` holds `TrainConfig` keys shared by every method."""

    corpus: str = EMBEDDED_CORPUS
    methods: list[str] = field(default_factory=lambda: ["ntp", "rpt", "rmt"])
    score: ScoreOptions = field(default_factory=ScoreOptions)
    eval: EvalSettings = field(default_factory=EvalSettings)
    # Any TrainConfig key except method, data and out, which the demo sets per run.
    train: dict[str, Any] = field(default_factory=lambda: {"model": EMBEDDED_MODEL})
    # `--posttrain`: any PostTrainConfig key except model, out and midtrain_corpus (set per run).
    posttrain: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise RmtError(f"demo: methods must be among {', '.join(METHODS)}, got {self.methods}")
        reserved = {"method", "data", "out"} & set(self.train)
        if reserved:
            raise RmtError(f"demo: train.{sorted(reserved)[0]} is set by the demo for each run; remove it")
        reserved = {"model", "out", "midtrain_corpus"} & set(self.posttrain)
        if reserved:
            raise RmtError(f"demo: posttrain.{sorted(reserved)[0]} is set by the demo for each run; remove it")

    @property
    def model(self) -> str:
        return self.train.get("model", TrainConfig.model)


def packaged_config(name: str):
    """A config file shipped inside the package (works from a checkout and from an install)."""
    return importlib.resources.files("rmt") / "configs" / name


def load_demo_config(path: str | None, quick: bool, overrides: list[str]) -> DemoConfig:
    if path is None:
        resource = packaged_config("demo-quick.yaml" if quick else "demo.yaml")
        with importlib.resources.as_file(resource) as file:
            return load_config(str(file), overrides, schema=DemoConfig)
    return load_config(path, overrides, schema=DemoConfig)


def _dotlist(tree: dict, prefix: str = "") -> list[str]:
    """`{"a": {"b": 1}}` -> `["a.b=1"]`; values JSON-encoded, which the override grammar reads back exactly."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _dotlist(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def train_config(demo: DemoConfig, method: str, data: Path, out: Path) -> TrainConfig:
    """Defaults -> the method's preset -> the demo's shared `train` section."""
    paths = [f"data={json.dumps(str(data))}", f"out={json.dumps(str(out))}"]
    overrides = [f"method={method}", *_dotlist(demo.train), *paths]
    return load_config(None, overrides)


def posttrain_config(demo: DemoConfig, model: str | Path, out: Path) -> PostTrainConfig:
    """The packaged post-training config -> the demo's `posttrain` section -> this start's model and folder.

    The questions are checked to be absent from the mid-training corpus (SPEC §10)."""
    paths = [f"model={json.dumps(str(model))}", f"out={json.dumps(str(out))}",
             f"midtrain_corpus={json.dumps(demo.corpus)}"]
    return load_posttrain_config(None, [*_dotlist(demo.posttrain), *paths])


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
        same = (old.get("checkpoint") == resolve_checkpoint(str(model)) and old.get("data") == str(data)
                and {k: old["settings"].get(k) for k in wanted} == wanted)
        if same:
            print(f"{path} is up to date")
            return old
    result = evaluate(str(model), data, ("ntp", "ntr"), **wanted)
    save_eval(result, path)
    print(format_table(result))
    return result


def check_existing_run(config: TrainConfig | PostTrainConfig) -> None:
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


def train_or_resume(config: TrainConfig) -> None:
    """Train a run; a finished run is kept, an unfinished one resumes from its latest checkpoint."""
    run_dir = Path(config.out)
    latest = checkpoint.latest_checkpoint(run_dir)
    done = checkpoint.checkpoint_step(latest)
    if done >= config.steps:
        print(f"{run_dir} already trained ({done} steps)")
        return
    if latest:
        print(f"resuming {run_dir} from step {done}")
        train(config, resume=True)
        return
    # Killed before its first checkpoint: only the log is left, and nothing to resume from.
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    train(config)


def posttrain_or_resume(config: PostTrainConfig) -> None:
    """Post-train one start; a finished post-training of the same checkpoint is kept, an unfinished one
    resumes from its latest checkpoint."""
    run_dir = Path(config.out)
    start = checkpoint.resolve_model_path(config.model)
    report_path = run_dir / POSTTRAIN_EVAL_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
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
    scored = out / "scored"
    configs = {m: train_config(demo, m, scored, out / m) for m in demo.methods}  # fail fast on a bad key
    starts = {"base": demo.model, **{m: out / m for m in demo.methods}}
    post = {name: posttrain_config(demo, model, out / name / POSTTRAIN_DIR) for name, model in starts.items()
            if with_posttrain}
    for config in [*configs.values(), *post.values()]:
        check_existing_run(config)
    steps = {c.steps for c in configs.values()}
    stages = Stages(total=3 + 2 * len(demo.methods) + len(post))
    print(f"rmt demo: model {demo.model}, corpus {demo.corpus}, methods {', '.join(demo.methods)}, "
          f"{steps.pop() if len(steps) == 1 else steps} steps each -> {out}")

    docs = f"first {demo.score.max_docs} documents" if demo.score.max_docs else "all documents"
    stages.begin(f"score {demo.corpus} with {demo.model} ({docs} of each split)")
    report = score_dataset(demo.model, demo.corpus, scored, SPLITS, demo.score)
    counts = ", ".join(f"{split}: {s['scored_positions']} positions, bands {s['bands']}"
                       for split, s in report.stats["splits"].items())
    print(counts)
    stages.end()

    stages.begin("evaluate the base model (NTP and NTR modes)")
    evaluate_into(demo.model, scored, out / "base" / EVAL_FILE, demo.eval)
    stages.end()

    for method, config in configs.items():
        stages.begin(f"train {method}: {config.steps} steps, {config.docs_per_step} docs x "
                     f"{config.rollout.positions_per_doc} positions x {config.rollout.group_size} rollouts per step")
        train_or_resume(config)
        stages.end()
        stages.begin(f"evaluate {method}")
        evaluate_into(out / method, scored, out / method / EVAL_FILE, demo.eval)
        stages.end()

    for name, config in post.items():
        stages.begin(f"post-train {name} ({config.model}): {config.steps} GRPO steps on {config.source}, "
                     f"{config.questions_per_step} questions x {config.rollout.group_size} rollouts per step")
        posttrain_or_resume(config)
        stages.end()

    stages.begin("report")
    folders = [out / "base", *(out / m for m in demo.methods)]
    rows = load_rows(folders)
    path = render(rows, out / "report")
    print(table(rows))
    if post:
        print(f"\n{posttrain_table(rows)}")
    stages.end()
    print(f"\nrmt demo finished in {stages.elapsed()}: report {path}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (a few minutes): the packaged demo-quick.yaml")
    parser.add_argument("--config", help="a demo config file instead of the packaged one")
    parser.add_argument("--model", help=f"model instead of the embedded {EMBEDDED_MODEL} (sets train.model)")
    parser.add_argument("--corpus", help=f"corpus instead of the embedded {EMBEDDED_CORPUS}")
    parser.add_argument("--posttrain", action="store_true",
                        help="also post-train the base model and every method's checkpoint with GRPO on math "
                             "(SPEC §10) and add the before/after table to the report")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="demo config overrides, e.g. train.steps=10 eval.positions=64 score.max_docs=32")


def run(args: argparse.Namespace) -> int:
    if args.quick and args.config:
        raise RmtError("give --quick or --config, not both")
    shorthand = [f"train.model={json.dumps(args.model)}"] if args.model else []
    shorthand += [f"corpus={json.dumps(args.corpus)}"] if args.corpus else []
    demo = load_demo_config(args.config, args.quick, shorthand + args.overrides)
    run_demo(demo, args.out, with_posttrain=args.posttrain)
    return 0
