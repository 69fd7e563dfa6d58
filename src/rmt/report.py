"""`rmt report`: compare evaluated runs in the papers' layout, with intervals, verdicts on the paper's
claims, and plots of how each run trained.

Each RUN_DIR is a training run folder (`config.yaml`, `metrics.jsonl`, `checkpoints/`) with its evaluation
in `RUN_DIR/eval.json` (`rmt eval --model RUN_DIR` writes it there), a cold-start folder (`rmt warmup`),
or a folder holding only an `eval.json` -- the untrained base model (SPEC §8 `ntr`). The report folder gets
`report.md` and:

- `accuracy.png` -- NTR accuracy per nested split and method, with 95% intervals;
- `reasoning_length.png` -- mean reasoning length over training against the budget B_t and the cap;
- `band_mix.png` -- the curriculum's band distribution p_t and the bands actually sampled;
- `rewards.png` -- total, match and length reward over training;
- `posttrain.png` -- when rows were post-trained: math accuracy before and after, and the GRPO reward.

Every accuracy carries its 95% bootstrap interval over positions (`rmt.stats`); runs evaluated on the same
positions are compared paired, and each of the paper's claims gets a verdict: supported, contradicted, or
cannot tell (the interval of the difference holds 0).

A row's post-training (SPEC §10) is found in `RUN_DIR/posttrain/` (`rmt posttrain --model RUN_DIR
--out RUN_DIR/posttrain`; `rmt demo --posttrain` puts it there); the report then gets a before / after
table of held-out math accuracy for every post-trained row.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from matplotlib.ticker import MaxNLocator

from rmt.config import load_config
from rmt.corpus import read_jsonl_records
from rmt.difficulty import BAND_NAMES
from rmt.errors import RmtError
from rmt.evaluate import EVAL_FILE, load_eval, pct_ci
from rmt.io import read_json
from rmt.posttrain import EVAL_FILE as POSTTRAIN_EVAL_FILE
from rmt.posttrain import SAMPLES_FILE as POSTTRAIN_SAMPLES_FILE
from rmt.stats import paired_difference, paired_mean_difference, thirds_difference, verdict

FIGURES = ("accuracy.png", "reasoning_length.png", "band_mix.png", "rewards.png")
POSTTRAIN_FIGURE = "posttrain.png"
POSTTRAIN_DIR = "posttrain"  # a row's post-training run, inside its folder
METHOD_NOTES = {  # SPEC §8, §13, §14
    "base": "the untrained model, zero-shot next-token reasoning",
    "warmed base": "the cold start (`rmt warmup`): supervised next-token-reasoning examples on midtrain "
                   "positions; every method starts from it",
    "ntp": "continued pre-training: next-token loss on all tokens, no RL",
    "rpt": "RPT: RL above the entropy floor, uniform positions, prefix reward, fixed reasoning cap, no NTP loss",
    "rmt": "RMT: dynamic token budget + curriculum sampling + GRPO + NTP loss, exact reward",
    "rlp": "RLP: dense reward = log-likelihood gain of the next token from the thought over an EMA baseline, "
           "raw-text prompt, no NTP loss",
}
BAND_COLORS = {"easy": "#8fd18f", "medium": "#f2c14e", "hard": "#e0605e"}


@dataclass
class Row:
    """One method in the report: a training run (or cold start) and/or an evaluation."""

    folder: Path
    label: str
    kind: str = "base"  # base (evaluation only) | warmup | train
    config: object | None = None  # TrainConfig of a training run
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    posttrain: dict | None = None  # RUN_DIR/posttrain/posttrain_eval.json
    posttrain_metrics: list[dict] = field(default_factory=list)
    posttrain_samples: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def is_run(self) -> bool:
        return self.kind == "train"

    @property
    def method(self) -> str:
        return self.config.method if self.is_run else ("warmed base" if self.kind == "warmup" else "base")


def method_label(config) -> str:
    """The method with tags for what differs from its preset (SPEC §8 ablations)."""
    preset = load_config(None, [f"method={config.method}"])
    tags = []
    for name, on, preset_on in (
        ("DTB", config.budget.enabled, preset.budget.enabled),
        ("CAS", config.curriculum.enabled, preset.curriculum.enabled),
        ("NTP", config.ntp.weight > 0, preset.ntp.weight > 0),
    ):
        if on != preset_on and config.rl.enabled:
            tags.append(f"+{name}" if on else f"w/o {name}")
    if config.rl.enabled and config.reward.name != preset.reward.name:
        tags.append(f"{config.reward.name} reward")
    return " ".join([config.method, *tags])


def _config_kind(path: Path) -> str:
    """train or warmup, from the keys of a run folder's config.yaml."""
    try:
        keys = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RmtError(f"{path}: cannot read the run's config ({exc})") from exc
    if not isinstance(keys, dict):
        raise RmtError(f"{path}: not a run config (expected a mapping)")
    return "warmup" if "thought" in keys else "train"


def load_row(folder: str | Path, eval_file: str = EVAL_FILE) -> Row:
    """One folder's row; its evaluation is `folder/eval_file` (e.g. a second, sampled `rmt eval --out`)."""
    from rmt.warmup import WarmupConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise RmtError(f"{folder}: no such folder; give run folders (or a folder holding an {EVAL_FILE})")
    has_config, has_eval = (folder / "config.yaml").is_file(), (folder / eval_file).is_file()
    has_post = (folder / POSTTRAIN_DIR / POSTTRAIN_EVAL_FILE).is_file()
    if not has_config and not has_eval and not has_post:
        raise RmtError(f"{folder}: neither a training run (no config.yaml) nor an evaluation (no {eval_file}) "
                       f"nor a post-training ({POSTTRAIN_DIR}/{POSTTRAIN_EVAL_FILE})")
    row = Row(folder, label="base")
    if has_config:
        row.kind = _config_kind(folder / "config.yaml")
        schema = WarmupConfig if row.kind == "warmup" else None
        row.config = load_config(str(folder / "config.yaml"), schema=schema) if schema else \
            load_config(str(folder / "config.yaml"))
        row.label = "warmed base" if row.kind == "warmup" else method_label(row.config)
        row.metrics = _read_jsonl(folder / "metrics.jsonl")
        if not row.metrics:
            row.notes.append("no training steps logged")
        elif row.metrics[-1]["step"] < row.config.steps:
            row.notes.append(f"unfinished: {row.metrics[-1]['step']} of {row.config.steps} steps")
    if has_eval:
        row.evaluation = load_eval(folder / eval_file)
    if has_post:
        post = folder / POSTTRAIN_DIR
        row.posttrain = read_json(post / POSTTRAIN_EVAL_FILE, "post-training evaluation")
        row.posttrain_metrics = _read_jsonl(post / "metrics.jsonl")
        row.posttrain_samples = _read_jsonl(post / POSTTRAIN_SAMPLES_FILE)
        if row.posttrain["after"] is None:
            row.notes.append(f"post-training unfinished ({len(row.posttrain_metrics)} of {row.posttrain['steps']} "
                             "steps): no accuracy after")
    return row


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in read_jsonl_records(path)] if path.is_file() else []


def load_rows(folders, eval_file: str = EVAL_FILE) -> list[Row]:
    rows = [load_row(f, eval_file) for f in folders]
    labels = [r.label for r in rows]
    for r in rows:  # same label twice (e.g. two rmt runs): tell them apart by folder
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.folder.name})"
    return rows


def _acc(block: dict | None, split: str | None = None):
    if not block:
        return None
    return block["avg"] if split is None else block["splits"][split]["accuracy"]


def _ci(block: dict | None, split: str | None = None):
    if not block:
        return None
    return block.get("avg_ci") if split is None else block["splits"][split].get("ci")


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def comparability_notes(rows: list[Row]) -> list[str]:
    """Warnings when the evaluations did not ask the same questions."""
    import json

    evals = [r.evaluation for r in rows if r.evaluation]
    return [f"evaluations differ in `{key}`: their numbers are not directly comparable"
            for key in ("data", "settings") if len({json.dumps(e[key], sort_keys=True) for e in evals}) > 1]


def _ratio(ntr: dict | None) -> str:
    """NTR accuracy over greedy NTP accuracy on the same positions, per split (min over splits shown)."""
    if not ntr or not ntr.get("ntp_same_positions"):
        return "—"
    ntp = ntr["ntp_same_positions"]
    ratios = [ntr["splits"][s]["accuracy"] / ntp["splits"][s]["accuracy"] for s in BAND_NAMES
              if ntr["splits"][s]["accuracy"] is not None and ntp["splits"][s]["accuracy"]]
    return "/".join(f"{100 * r:.0f}" for r in ratios) if ratios else "—"


def table(rows: list[Row]) -> str:
    header = ["Method", "Easy", "Medium", "Hard", "Avg. [95% CI]", "NTP Avg.", "NTR/NTP % (e/m/h)",
              "Reasoning length", "`</think>` closed", "Steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        results = r.evaluation["results"] if r.evaluation else {}
        ntr, ntp = results.get("ntr"), results.get("ntp")
        length = f"{ntr['reasoning_len_mean']:.1f}" if ntr else "—"
        closed = f"{100 * ntr['well_formed_frac']:.0f}%" if ntr else "—"
        steps = str(r.metrics[-1]["step"]) if r.metrics else ("0" if r.kind == "base" else "—")
        cells = [r.label, *(_pct(_acc(ntr, s)) for s in BAND_NAMES), pct_ci(_acc(ntr), _ci(ntr)),
                 _pct(_acc(ntp)), _ratio(ntr), length, closed, steps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- paired comparisons and the paper's claims -------------------------------------------------------


def _ntr_outcomes(row: Row) -> dict | None:
    """{(doc, window, position): record} of a row's NTR evaluation."""
    if not row.evaluation or "ntr" not in row.evaluation["records"]:
        return None
    return {(r["doc_id"], r["window"], r["position"]): r for r in row.evaluation["records"]["ntr"]}


def compare(a: Row, b: Row) -> dict | None:
    """A minus B on the NTR positions both answered: accuracy per split and on average (paired bootstrap),
    and reasoning length. None when they share no position or used other evaluation settings."""
    ra, rb = _ntr_outcomes(a), _ntr_outcomes(b)
    if ra is None or rb is None or a.evaluation["settings"] != b.evaluation["settings"] \
            or a.evaluation["data"] != b.evaluation["data"]:
        return None
    keys = [k for k in ra if k in rb]
    if not keys:
        return None
    thresholds = a.evaluation["settings"]["thresholds"]
    entropy = [ra[k]["entropy"] for k in keys]
    accuracy = paired_difference(entropy, [ra[k]["exact"] for k in keys], [rb[k]["exact"] for k in keys], thresholds)
    length = paired_mean_difference([ra[k]["reasoning_len"] for k in keys], [rb[k]["reasoning_len"] for k in keys])
    return {"n": len(keys), "accuracy": accuracy, "length": length}


def _diff_cell(d: dict, scale: float = 100.0, unit: str = "") -> str:
    if d["diff"] is None:
        return "—"
    lo, hi = d["ci"]
    return f"{scale * d['diff']:+.1f}{unit} [{scale * lo:+.1f}, {scale * hi:+.1f}]"


def differences_table(rows: list[Row]) -> str:
    """Each run against the row it started from (the warmed base, else the base) and against RMT."""
    start = next((r for r in rows if r.kind == "warmup"), None) or next((r for r in rows if r.kind == "base"), None)
    rmt = next((r for r in rows if r.is_run and r.label == "rmt"), None)
    pairs = []
    for r in rows:
        if r.is_run and start is not None:
            pairs.append((r, start))
    for r in rows:
        if rmt is not None and r is not rmt and r is not start:
            pairs.append((rmt, r))
    header = ["A − B", "Easy", "Medium", "Hard", "Avg.", "Verdict (Avg.)", "Reasoning length", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 6 + ["---:"]) + "|"]
    for a, b in pairs:
        c = compare(a, b)
        if c is None:
            continue
        acc = c["accuracy"]
        lines.append("| " + " | ".join([f"{a.label} − {b.label}", *(_diff_cell(acc[s]) for s in BAND_NAMES),
                                        _diff_cell(acc["avg"]), verdict(acc["avg"]["ci"]),
                                        _diff_cell(c["length"], 1.0), str(c["n"])]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _find(rows: list[Row], label: str) -> Row | None:
    return next((r for r in rows if r.label == label), None)


def claims(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for each of the paper's claims this run can speak to."""
    out = []
    rmt, rpt = _find(rows, "rmt"), _find(rows, "rpt")
    c = compare(rmt, rpt) if rmt and rpt else None
    if c:
        d = c["accuracy"]["avg"]
        v = {"higher": "supports", "lower": "contradicts"}.get(verdict(d["ci"]), "cannot tell")
        out.append(("RMT's NTR accuracy is above RPT's", v, f"Avg. difference {_diff_cell(d)} points, "
                    f"paired over {c['n']} positions"))
        length = c["length"]
        v = {"lower": "supports", "higher": "contradicts"}.get(verdict(length["ci"]), "cannot tell")
        if _mean_length(rpt):
            means = f"RMT's mean is {100 * _mean_length(rmt) / _mean_length(rpt):.0f}% of RPT's"
        else:  # a ratio to nothing says nothing
            means = f"RPT's mean is 0 tokens, RMT's {_mean_length(rmt):.1f}"
        out.append(("RMT reasons much shorter than RPT (paper: 21% of RPT's length)", v,
                    f"length difference {_diff_cell(length, 1.0)} tokens; {means}"))
    else:
        out.append(("RMT's NTR accuracy is above RPT's", "not run", "needs evaluated rmt and rpt rows"))
    ablations = {tag: _find(rows, f"rmt w/o {tag}") for tag in ("NTP", "DTB", "CAS")}
    if rmt and all(ablations.values()):
        drops = {tag: compare(rmt, row) for tag, row in ablations.items()}
        between = [compare(ablations["DTB"], ablations["NTP"]), compare(ablations["CAS"], ablations["DTB"])]
        if all(drops.values()) and all(between):
            verdicts = [verdict(b["accuracy"]["avg"]["ci"]) for b in between]
            # Each component must help (removing it costs accuracy), in that order; a removal that helps
            # contradicts the claim whatever the order.
            helped = any(verdict(d["accuracy"]["avg"]["ci"]) == "lower" for d in drops.values())
            v = "contradicts" if helped or "lower" in verdicts else \
                "supports" if verdicts == ["higher", "higher"] else "cannot tell"
            evidence = "; ".join(f"removing {tag} costs {_diff_cell(d['accuracy']['avg'])}"
                                 for tag, d in drops.items())
            if helped:
                evidence += " (a negative cost: the run without it was better)"
            out.append(("Ablation order: removing NTP hurts most, then DTB, then CAS", v, evidence))
    else:
        out.append(("Ablation order: removing NTP hurts most, then DTB, then CAS", "not run",
                    "needs rmt w/o NTP, w/o DTB and w/o CAS rows (`rmt demo --study`)"))
    post = posttrain_claim(rows)
    if post:
        out.append(post)
    return out


def fixed_mix(metrics: list[dict]) -> list[float]:
    """Each step's match reward at the run's overall band mix: the per-band rates of the step weighted by each
    band's share of all the run's sampled positions (direct standardisation), so that the curriculum's move
    towards harder bands does not lower it by itself. NaN for a step that lacks a band the run sampled."""
    totals = {b: sum(m.get("sampled_bands", {}).get(b, 0) for m in metrics) for b in BAND_NAMES}
    used = [b for b in BAND_NAMES if totals[b] > 0]
    out = []
    for m in metrics:
        rates = [m.get(f"match_{b}") for b in used]
        present = all(r is not None and np.isfinite(r) and m.get("sampled_bands", {}).get(b, 0) > 0
                      for r, b in zip(rates, used))
        out.append(sum(totals[b] * r for b, r in zip(used, rates)) / sum(totals[b] for b in used)
                   if used and present else np.nan)
    return out


def learning_table(rows: list[Row]) -> str:
    """For each RL run: the match reward of its last third of steps minus its first third, over all its
    rollouts, at a fixed band mix, and within each difficulty band (the curriculum moves towards harder
    bands, which lowers the overall rate by itself; at a fixed mix or within a band, a rise is learning)."""
    runs = [r for r in rows if r.is_run and r.config.rl.enabled and len(r.metrics) >= 3
            and any(m.get("reward_match_mean") is not None for m in r.metrics)]
    header = ["Run", "All rollouts", "Fixed band mix", *(f"{b} band" for b in BAND_NAMES),
              "Minus the starting model, same prompts", "Verdict (all / fixed mix / within bands / vs start)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in runs:
        def trend(key, band=None):
            values = [np.nan if m.get(key) is None else m[key] for m in r.metrics]
            weights = [m.get("sampled_bands", {}).get(band, 0) for m in r.metrics] if band else None
            return thirds_difference(values, weights)

        overall = trend("reward_match_mean")
        mix = thirds_difference(fixed_mix(r.metrics))
        bands = [trend(f"match_{b}", b) for b in BAND_NAMES]
        gain = thirds_difference(match_gain(r.metrics))

        def cell(t):
            if t is None:
                return "—"
            return f"{100 * t['first']:.1f} → {100 * t['last']:.1f} ({_diff_cell(t)})"

        def gain_cell(t):
            if t is None:
                return "— (no `rl.control`)"
            return f"{100 * t['first']:+.1f} → {100 * t['last']:+.1f} ({_diff_cell(t)})"

        words = [_trend_word([overall]), _trend_word([mix]), _trend_word(bands), _trend_word([gain])]
        lines.append("| " + " | ".join([r.label, cell(overall), cell(mix), *(cell(t) for t in bands), gain_cell(gain),
                                        " / ".join(words)]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _trend_word(trends) -> str:
    """rises / falls / mixed (some rise, some fall) / cannot tell, from `thirds_difference` results."""
    found = {verdict(t["ci"]) for t in trends if t is not None}
    if "higher" in found and "lower" in found:
        return "mixed"
    return "rises" if "higher" in found else "falls" if "lower" in found else "cannot tell"


def _mean_length(row: Row) -> float:
    return row.evaluation["results"]["ntr"]["reasoning_len_mean"]


def posttrain_claim(rows: list[Row]) -> tuple[str, str, str] | None:
    """RMT's post-trained accuracy against the best other start, paired over the same held-out questions."""
    claim = "RMT is a better start for math post-training"
    rmt = _find(rows, "rmt")
    others = [r for r in rows if r is not rmt and r.posttrain and r.posttrain.get("after")]
    if not rmt or not rmt.posttrain or not rmt.posttrain.get("after") or not others:
        return (claim, "not run", "needs post-trained rmt and baseline rows (`--posttrain`)") if rmt else None
    best = max(others, key=lambda r: r.posttrain["after"]["accuracy"])
    after = lambda r: {s["id"]: float(s["correct"]) for s in r.posttrain_samples if s["phase"] == "after"}  # noqa: E731
    a, b = after(rmt), after(best)
    ids = [i for i in a if i in b]
    if not ids:
        return (claim, "cannot tell", "no shared evaluation questions")
    d = paired_mean_difference([a[i] for i in ids], [b[i] for i in ids])
    v = {"higher": "supports", "lower": "contradicts"}.get(verdict(d["ci"]), "cannot tell")
    return (claim, v, f"after post-training, rmt − {best.label} (the best other start) = {_diff_cell(d)} points "
                      f"over {len(ids)} questions")


def claims_text(rows: list[Row]) -> str:
    lines = ["| Paper's claim | This run | Evidence (95% CI) |", "|---|---|---|"]
    lines += [f"| {c} | **{v}** | {e} |" for c, v, e in claims(rows)]
    return "\n".join(lines)


def posttrain_table(rows: list[Row]) -> str:
    """Held-out math accuracy before and after the same GRPO post-training of each row (SPEC §10)."""
    from rmt.stats import mean_interval

    header = ["Start", "Accuracy before", "Accuracy after [95% CI]", "Change", "Response length before / after",
              "`</think>` before / after", "GRPO steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        if r.posttrain is None:
            continue
        before, after = r.posttrain["before"], r.posttrain["after"]
        acc = lambda phase: _pct(phase and phase["accuracy"])  # noqa: E731
        outcomes = [float(s["correct"]) for s in r.posttrain_samples if s["phase"] == "after"]
        after_cell = pct_ci(after["accuracy"], mean_interval(outcomes)) if after and outcomes else acc(after)
        change = f"{100 * (after['accuracy'] - before['accuracy']):+.1f}" if before and after else "—"
        length = lambda phase: f"{phase['response_len_mean']:.1f}" if phase else "—"  # noqa: E731
        closed = lambda phase: f"{100 * phase['format_ok_frac']:.0f}%" if phase else "—"  # noqa: E731
        steps = str(r.posttrain_metrics[-1]["step"]) if r.posttrain_metrics else "0"
        cells = [r.label, acc(before), after_cell, change, f"{length(before)} / {length(after)}",
                 f"{closed(before)} / {closed(after)}", steps]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def posttrain_text(rows: list[Row]) -> str:
    """What the post-training table measured, and whether its rows are comparable."""
    import json

    reports = [r.posttrain for r in rows if r.posttrain]
    first = reports[0]
    same = lambda key: len({json.dumps(p.get(key)) for p in reports}) == 1  # noqa: E731
    text = (f"Every start is post-trained by the same GRPO recipe on `{first['source']}` "
            f"({first['n_train']} training questions, {first['steps']} steps) and evaluated greedily on the same "
            f"{first['n_eval']} held-out questions, before and after, with a reasoning cap of "
            f"{first['max_reasoning_tokens']} tokens. Accuracy in % (exact answer, checked with math-verify); "
            "response length in tokens.")
    differ = [key for key in ("source", "n_eval", "steps", "max_reasoning_tokens") if not same(key)]
    if differ:
        text += f" Note: the post-trainings differ in {', '.join(differ)}: their rows are not directly comparable."
    return text


def details(rows: list[Row]) -> str:
    """Per-row sample sizes, prefix-match accuracy and training summary."""
    header = ["Method", "Folder", "NTR n (easy/medium/hard)", "NTR prefix Avg.", "NTP Avg. [95% CI]",
              "NTP n (easy/medium/hard)", "Final reward", "Final match reward", "Train time (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for r in rows:
        results = r.evaluation["results"] if r.evaluation else {}
        ntr, ntp = results.get("ntr"), results.get("ntp")
        n = lambda block: "/".join(str(block["splits"][s]["n"]) for s in BAND_NAMES) if block else "—"  # noqa: E731

        def last(key):
            values = [m[key] for m in r.metrics if m.get(key) is not None]
            return f"{np.mean(values[-max(1, len(values) // 10):]):.3f}" if values else "—"

        minutes = f"{sum(m['step_seconds'] for m in r.metrics) / 60:.1f}" if r.metrics else "—"
        cells = [r.label, f"`{r.folder}`", n(ntr), _pct(_acc(ntr and ntr["prefix"])), pct_ci(_acc(ntp), _ci(ntp)),
                 n(ntp), last("reward_mean"), last("reward_match_mean"), minutes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_text(rows: list[Row]) -> str:
    evaluation = next((r.evaluation for r in rows if r.evaluation), None)
    if evaluation is None:
        return "No run has an evaluation yet."
    s = evaluation["settings"]
    t = s["thresholds"]
    budget = f"budget B = {s['budget']} in the prompt" if s["budget"] is not None else "no budget in the prompt"
    decoding = "greedy decoding" if not s.get("temperature") else \
        f"one answer sampled at temperature {s['temperature']:g} per position (the same random draws for every row)"
    return (
        f"Evaluated on the {s.get('split', 'eval')} split of `{evaluation['data']}`. Nested splits by proxy entropy: "
        f"easy H > {t[0]:.3g}, medium H > {t[1]:.3g}, hard H > {t[2]:.3g} nats; Avg. is their unweighted mean. "
        f"NTR mode: {s['ntr_positions']} positions sampled from the {s['pool_size']} above the floor "
        f"(seed {s['seed']}), the same for every row, {decoding}, {budget}, reasoning cap "
        f"{s['reasoning_cap']} tokens, answer forcing {'on' if s['force_answer'] else 'off'}; accuracy is exact "
        f"match of the boxed prediction with the next token. NTP mode: greedy next token at every pool position. "
        "NTR/NTP: NTR accuracy as a share of greedy NTP accuracy on the same positions. Accuracies in %, with "
        "95% percentile-bootstrap intervals over positions (positions of one document are correlated, so the "
        "intervals are if anything a little narrow); reasoning length in tokens."
    )


def write_markdown(rows: list[Row], out: Path, figures: dict[str, str]) -> Path:
    from rmt.io import write_text_atomic

    notes = [f"- {r.label}: {note}" for r in rows for note in r.notes]
    data = next((r.evaluation["data"] for r in rows if r.evaluation), "SCORED_DIR")
    notes += [f"- {r.label}: not evaluated; `rmt eval --model {r.folder} --data {data}` writes its {EVAL_FILE}"
              for r in rows if r.evaluation is None]
    notes += [f"- {note}" for note in comparability_notes(rows)]
    parts = [
        "# RMT report",
        "",
        "Next-token accuracy in NTR mode (reasoning, then the boxed token) per nested split, as in the papers' "
        "tables, with NTP-mode (greedy next token) average and the mean reasoning length.",
        "",
        table(rows),
        "",
        settings_text(rows),
        "",
    ]
    methods = dict.fromkeys(r.method for r in rows)
    parts += [f"- **{m}**: {METHOD_NOTES[m]}" for m in methods if m in METHOD_NOTES] + [""]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    parts += ["## The paper's claims", "",
              "Each verdict rests on a paired difference between runs evaluated on the same positions (or "
              "questions): *supports* / *contradicts* when its 95% interval excludes 0, *cannot tell* when it "
              "holds 0.", "", claims_text(rows), ""]
    differences = differences_table(rows)
    if differences:
        parts += ["## Paired differences", "",
                  "NTR accuracy of A minus B in points (95% paired-bootstrap interval) on the positions both "
                  "answered, and the difference in mean reasoning length (tokens).", "", differences, ""]
    learning = learning_table(rows)
    if learning:
        parts += ["## Did the reward rise during RL?", "",
                  "Match reward (the % of rollouts whose answer was right) in the first third of the training "
                  "steps → the last third, and the difference in points with a 95% bootstrap interval over steps. The "
                  "curriculum moves towards harder bands, which lowers the rate over all rollouts by itself; "
                  "at a fixed band mix (each step's per-band rates weighted by the run's overall band shares) "
                  "or within a band, a rise is learning. With `rl.control`, the starting model also answers every "
                  "step's prompts with the same random draws: the policy's match minus its match is the gain RL has "
                  "made by then, measured on the same positions (0 at the first step, where the two are the same "
                  "model).", "", learning, ""]
    if any(r.posttrain for r in rows):
        parts += ["## Post-training on math (SPEC §10)", "",
                  "Does a mid-trained checkpoint make a better start for reinforcement post-training?", "",
                  posttrain_table(rows), "", posttrain_text(rows), ""]
    parts += ["## Details", "", details(rows), ""]
    parts += ["## Figures", ""]
    for name, caption in figures.items():
        parts += [f"### {caption}", "", f"![{caption}]({name})", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


# ---- figures ------------------------------------------------------------------------------------------


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start), ignoring missing values."""
    out = np.empty_like(values, dtype=float)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out[i] = np.nanmean(chunk) if np.isfinite(chunk).any() else np.nan
    return out


def _step_axis(ax, runs: list[Row]) -> None:
    """Training steps on the x axis: integer ticks, and some width even for a single logged step."""
    steps = [m["step"] for r in runs for m in r.metrics]
    if steps:
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("training step")


def _series(metrics: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([m["step"] for m in metrics], dtype=float)
    values = np.array([np.nan if m.get(key) is None else float(m[key]) for m in metrics], dtype=float)
    return steps, values


def plot_accuracy(rows: list[Row], path: Path):
    fig = _figure(figsize=(11, 4.8))
    ax = fig.subplots()
    evaluated = [r for r in rows if r.evaluation and "ntr" in r.evaluation["results"]]
    if not evaluated:
        _empty(ax, "no run has an NTR evaluation")
    else:
        groups = [*BAND_NAMES, "avg"]
        width = 0.8 / len(evaluated)
        x = np.arange(len(groups))
        for k, r in enumerate(evaluated):
            ntr = r.evaluation["results"]["ntr"]
            values = [_acc(ntr, s) for s in BAND_NAMES] + [_acc(ntr)]
            cis = [_ci(ntr, s) for s in BAND_NAMES] + [_ci(ntr)]
            heights = np.array([np.nan if v is None else 100 * v for v in values])
            lo = np.array([np.nan if not c or c[0] is None else 100 * c[0] for c in cis])
            hi = np.array([np.nan if not c or c[1] is None else 100 * c[1] for c in cis])
            errors = np.nan_to_num(np.stack([heights - lo, hi - heights]), nan=0.0).clip(min=0)
            bars = ax.bar(x - 0.4 + (k + 0.5) * width, heights, width, label=r.label, yerr=errors, capsize=2,
                          error_kw={"elinewidth": 0.8, "alpha": 0.7})
            ax.bar_label(bars, labels=[_pct(v) for v in values], fontsize=6 if len(evaluated) > 5 else 7,
                         padding=2, rotation=90 if len(evaluated) > 5 else 0)
        thresholds = evaluated[0].evaluation["settings"]["thresholds"]
        ax.set_xticks(x, [f"{n}\nH > {t:.3g}" for n, t in zip(BAND_NAMES, thresholds)] + ["avg\n(mean of splits)"])
        top = np.nanmax([100 * ((_ci(r.evaluation["results"]["ntr"], s) or [0, 0])[1] or 0)
                         for r in evaluated for s in BAND_NAMES])
        ax.set_ylim(0, max(10.0, top * 1.2))
        ax.set_ylabel("NTR accuracy (%)")
        ax.set_xlabel("nested split of the eval positions (proxy entropy, nats)")
        ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not on them
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("Next-token reasoning accuracy per difficulty split (exact match, 95% intervals)")
    fig.savefig(path, dpi=120)
    return fig


def plot_reasoning_length(rows: list[Row], path: Path):
    fig = _figure(figsize=(11, 4.8))
    ax = fig.subplots()
    runs = [r for r in rows if r.is_run and r.config.rl.enabled and r.metrics]
    if not runs:
        _empty(ax, "no RL run has logged steps")
    for k, r in enumerate(runs):
        color = f"C{k}"
        steps, length = _series(r.metrics, "reasoning_len_mean")
        ax.plot(steps, length, color=color, marker="o", markersize=3, label=f"{r.label}: mean reasoning length")
        _, budget = _series(r.metrics, "budget")
        _, cap = _series(r.metrics, "reasoning_cap")
        if np.isfinite(budget).any():
            ax.plot(steps, budget, color=color, linestyle="--", label=f"{r.label}: budget $B_t$")
        # Wide and pale, so that it stays visible when the mean length sits on the cap.
        ax.plot(steps, cap, color=color, linestyle=":", linewidth=4, alpha=0.5, label=f"{r.label}: cap " + (
            "$2B_t$" if np.isfinite(budget).any() else "(fixed)"))
    ax.set_title("Reasoning length over training against the token budget")
    _step_axis(ax, runs)
    ax.set_ylabel("reasoning tokens per rollout")
    ax.set_ylim(bottom=0)
    if runs:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return fig


def plot_band_mix(rows: list[Row], path: Path):
    """Per curriculum run: the intended band mix p_t (left) beside the bands actually sampled (right)."""
    runs = [r for r in rows if r.is_run and r.config.rl.enabled and r.metrics
            and any(m.get("band_probs") for m in r.metrics)]
    fig = _figure(figsize=(11, 3.8 * max(1, len(runs))))
    if not runs:
        ax = fig.subplots()
        _empty(ax, "no run samples positions with the curriculum (CAS)")
        ax.set_title("Band mix over training")
    else:
        fig.suptitle("Band mix over training: curriculum $p_t$ and the RL positions actually sampled")
    for (left, right), r in zip(fig.subplots(len(runs), 2, squeeze=False, sharey=True) if runs else [], runs):
        steps = np.array([m["step"] for m in r.metrics])
        probs = np.array([[m["band_probs"][b] for b in BAND_NAMES] for m in r.metrics])
        left.stackplot(steps, probs.T, labels=BAND_NAMES, colors=[BAND_COLORS[b] for b in BAND_NAMES])
        left.set_title(f"{r.label}: curriculum $p_t$")
        counts = np.array([[m["sampled_bands"][b] for b in BAND_NAMES] for m in r.metrics], dtype=float)
        totals = counts.sum(axis=1, keepdims=True)
        shares = np.nan_to_num(counts / np.where(totals > 0, totals, np.nan))
        bottom = np.zeros(len(steps))
        for j, b in enumerate(BAND_NAMES):
            right.bar(steps, shares[:, j], width=0.8, bottom=bottom, color=BAND_COLORS[b], label=b)
            bottom += shares[:, j]
        right.set_title(f"{r.label}: sampled positions ({int(totals.mean())} per step)")
        for ax in (left, right):
            ax.set_xlabel("training step")
            ax.set_ylim(0, 1)
            ax.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        left.set_ylabel("fraction of RL positions")
        right.legend(title="band", fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=120)
    return fig


def match_gain(metrics: list[dict]) -> list[float]:
    """Each step's match reward minus the control's (`rl.control`: the starting model on the same prompts
    with the same random draws); NaN where a step has no control."""
    return [np.nan if m.get("reward_match_mean") is None or m.get("control_match_mean") is None
            else m["reward_match_mean"] - m["control_match_mean"] for m in metrics]


def plot_rewards(rows: list[Row], path: Path):
    """Total, match and length reward per step, the match gain over the starting model on the same prompts
    (top), the match reward per difficulty band and the reasoning length (bottom): the curriculum moves
    towards harder bands, which lowers the overall match rate by itself; within a band, at a fixed band mix,
    or against the starting model on the same prompts, a rising match rate is learning."""
    runs = [r for r in rows if r.is_run and r.config.rl.enabled and r.metrics]
    series = {r.label: [{**m, "match_gain": g} for m, g in zip(r.metrics, match_gain(r.metrics))] for r in runs}
    fig = _figure(figsize=(17, 8))
    axes = fig.subplots(2, 4, sharex=True)
    panels = (("reward_mean", "total reward r"), ("reward_match_mean", "match reward $r_{match}$"),
              ("reward_len_mean", "length reward $r_{len}$"),
              ("match_gain", "match − the starting model's\n(same prompts, same draws; rl.control)"),
              *((f"match_{b}", f"match reward, {b} band positions") for b in BAND_NAMES),
              ("reasoning_len_mean", "reasoning length (tokens)"))
    for ax, (key, title) in zip(axes.flat, panels):
        shown = [r for r in runs if any(np.isfinite(m.get(key) if m.get(key) is not None else np.nan)
                                        for m in series[r.label])]
        if not shown:
            _empty(ax, "no RL run logs it")
        top = 0.0
        for k, r in enumerate(runs):
            if r not in shown:
                continue
            steps, values = _series(series[r.label], key)
            window = max(1, len(steps) // 10)
            ax.plot(steps, values, color=f"C{k}", alpha=0.3, linewidth=1)
            ax.plot(steps, _smooth(values, window), color=f"C{k}", linewidth=2, marker="o", markersize=3,
                    label=r.label + (f" ({window}-step mean)" if window > 1 else ""))
            top = max(top, float(np.nanmax(values, initial=0.0)))
            if key == "reward_match_mean" and any(m.get("sampled_bands") for m in r.metrics):
                mix = np.asarray(fixed_mix(r.metrics), dtype=float)
                ax.plot(steps, _smooth(mix, window), color=f"C{k}", linewidth=1.5, linestyle="--",
                        label=r.label + " at a fixed band mix")
        if key == "reward_match_mean" and shown:
            ax.legend(fontsize=7)
        if key == "match_gain":
            ax.axhline(0, color="k", linewidth=0.8)
            ax.set_ylabel("difference (−1 to 1)")
        elif key == "reasoning_len_mean":
            ax.set_ylim(bottom=0)
            ax.set_ylabel("tokens, mean over rollouts")
        else:
            ax.set_ylim(-0.02, max(0.1, 1.15 * top))  # rewards lie in [0, 1]; zoom in on small ones
            ax.set_ylabel("mean over rollouts (0–1)")
        ax.set_title(title, fontsize=10)
        _step_axis(ax, runs)
        ax.grid(alpha=0.3)
    if runs:
        axes[0, 0].legend(fontsize=8)
    fig.suptitle("Rewards over training (thin: per step, thick: trailing mean)")
    fig.savefig(path, dpi=110)
    return fig


def plot_posttrain(rows: list[Row], path: Path):
    """Math accuracy before / after post-training per start (left) and the GRPO reward per step (right)."""
    posted = [r for r in rows if r.posttrain]
    fig = _figure(figsize=(12, 4.4))
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])
    x = np.arange(len(posted))
    for k, (phase, color) in enumerate((("before", "0.65"), ("after", "C2"))):
        values = [r.posttrain[phase] and r.posttrain[phase]["accuracy"] for r in posted]
        heights = [np.nan if v is None else 100 * v for v in values]
        bars = left.bar(x - 0.2 + 0.4 * k, heights, 0.4, color=color, label=f"{phase} post-training")
        left.bar_label(bars, labels=[_pct(v) for v in values], fontsize=8, padding=2)
    left.set_xticks(x, [r.label for r in posted])
    top = max([100 * (r.posttrain[p] or {}).get("accuracy", 0) for r in posted for p in ("before", "after")])
    left.set_ylim(0, max(10.0, 1.25 * top))
    left.set_ylabel("held-out accuracy (%)")
    left.set_title("Math accuracy before and after the same post-training")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    top = 0.0
    for k, r in enumerate(posted):
        if r.posttrain_metrics:
            steps, reward = _series(r.posttrain_metrics, "reward_mean")
            window = max(1, len(steps) // 10)
            style = ("-", "--", ":", "-.")[k % 4]  # identical curves (an unchanged start) stay visible
            right.plot(steps, reward, color=f"C{k}", alpha=0.3, linewidth=1, linestyle=style)
            right.plot(steps, _smooth(reward, window), color=f"C{k}", linewidth=2, marker="o", markersize=3,
                       linestyle=style, label=r.label + (f" ({window}-step mean)" if window > 1 else ""))
            top = max(top, float(np.nanmax(reward, initial=0.0)))
    if not any(r.posttrain_metrics for r in posted):
        _empty(right, "no post-training step logged")
    else:
        right.legend(fontsize=8)
        right.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        right.set_xlabel("post-training step")
    right.set_ylim(-0.02, min(1.02, max(0.1, 1.15 * top)))  # rewards lie in [0, 1]; zoom in on small ones
    right.set_ylabel("mean reward = accuracy of the rollouts")
    right.set_title("GRPO reward during post-training")
    right.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return fig


def render(rows: list[Row], out: Path) -> Path:
    """The report of loaded rows. Figures are drawn on `matplotlib.figure.Figure` (Agg when saved as PNG),
    never through pyplot, so no GUI backend or global state is involved."""
    if not rows:
        raise RmtError("give at least one run folder")
    if out.exists() and not out.is_dir():
        raise RmtError(f"{out} is a file; --out must be a folder")
    out.mkdir(parents=True, exist_ok=True)
    plot_accuracy(rows, out / "accuracy.png")
    plot_reasoning_length(rows, out / "reasoning_length.png")
    plot_band_mix(rows, out / "band_mix.png")
    plot_rewards(rows, out / "rewards.png")
    captions = {
        "accuracy.png": "NTR accuracy per split",
        "reasoning_length.png": "Reasoning length against the budget",
        "band_mix.png": "Band mix over training (curriculum)",
        "rewards.png": "Rewards over training",
    }
    if any(r.posttrain for r in rows):
        plot_posttrain(rows, out / POSTTRAIN_FIGURE)
        captions[POSTTRAIN_FIGURE] = "Post-training on math: before and after"
    return write_markdown(rows, out, captions)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help=f"training run folders with {EVAL_FILE}, and/or a folder holding only a base {EVAL_FILE}; "
                             f"a RUN_DIR/{POSTTRAIN_DIR}/ post-training adds the before / after table")
    parser.add_argument("--out", required=True, type=Path, help="report folder (report.md and figures)")
    parser.add_argument("--eval-file", default=EVAL_FILE,
                        help="the evaluation file to read in each folder (default: %(default)s), e.g. one written "
                             "by `rmt eval --temperature 1 --out RUN/eval-t1.json`")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise RmtError(f"{args.out} is a file; --out must be a folder")
    rows = load_rows(args.runs, args.eval_file)
    path = render(rows, args.out)
    print(table(rows))
    print(f"\n{claims_text(rows)}")
    figures = list(FIGURES)
    if any(r.posttrain for r in rows):
        print(f"\n{posttrain_table(rows)}")
        figures.append(POSTTRAIN_FIGURE)
    print(f"wrote {path} and {', '.join(figures)}")
    return 0
