import json
import shutil

import numpy as np
import pytest
import torch

from rmt import assets
from rmt.cli import main
from rmt.errors import RmtError
from rmt.evaluate import evaluate
from rmt.rollout import Rollout, RolloutEngine, answer_format_ids
from rmt.scored import load_scored

SPLITS = ("easy", "medium", "hard")


@pytest.fixture(scope="module")
def fitted_model_dir(tiny_model_dir, tiny_scored_dir, tmp_path_factory):
    """The tiny model overfitted on the eval windows, so that greedy NTP accuracy is far from 0."""
    model = assets.load_model(str(tiny_model_dir))
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))
    windows, _ = load_scored(tiny_scored_dir, "eval")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    width = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), width), tokenizer.pad_token_id)
    labels = torch.full((len(windows), width), -100)
    for i, w in enumerate(windows):
        ids[i, : len(w.input_ids)] = labels[i, : len(w.input_ids)] = torch.as_tensor(w.input_ids)
    for _ in range(40):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("fitted") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eval_positions(scored_dir):
    """(window, t, entropy) of every scored eval position above the floor, counted here independently."""
    windows, stats = load_scored(scored_dir, "eval")
    floor = stats["thresholds"][0]
    found = [(i, t, float(w.entropy[t])) for i, w in enumerate(windows) for t in range(len(w.input_ids))
             if not np.isnan(w.entropy[t]) and w.entropy[t] > floor]
    return windows, stats["thresholds"], found


def recount(entropies, hits, thresholds):
    """Accuracy per nested split (H > t) from per-position hits."""
    out = {}
    for name, t in zip(SPLITS, thresholds):
        chosen = [h for e, h in zip(entropies, hits) if e > t]
        out[name] = (sum(chosen), len(chosen))
    return out


def test_ntp_accuracy_is_the_argmax_agreement_of_the_logits(fitted_model_dir, tiny_scored_dir):
    result = evaluate(str(fitted_model_dir), tiny_scored_dir, ["ntp"], progress=False)
    windows, thresholds, positions = eval_positions(tiny_scored_dir)
    model = assets.load_model(str(fitted_model_dir)).eval()
    with torch.no_grad():  # one unpadded forward per window, unlike the batched evaluation
        logits = [model(input_ids=torch.as_tensor(w.input_ids)[None]).logits[0] for w in windows]
    guesses = [int(logits[i][t - 1].argmax()) for i, t, _ in positions]
    hits = [g == int(windows[i].input_ids[t]) for g, (i, t, _) in zip(guesses, positions)]
    expected = recount([e for _, _, e in positions], hits, thresholds)

    ntp = result["results"]["ntp"]
    assert [r["predicted_id"] for r in result["records"]["ntp"]] == guesses
    assert ntp["positions"] == len(positions) == result["settings"]["pool_size"]
    for name, (correct, n) in expected.items():
        assert (ntp["splits"][name]["correct"], ntp["splits"][name]["n"]) == (correct, n)
        assert ntp["splits"][name]["accuracy"] == pytest.approx(correct / n)
    assert ntp["avg"] == pytest.approx(np.mean([c / n for c, n in expected.values()]))
    assert 0.2 < ntp["avg"] < 1.0  # the fitted model is often, not always, right: the count means something
    assert "ntr" not in result["results"]


def test_ntr_sample_and_accuracy_are_recounted_from_the_records(tiny_model_dir, tiny_scored_dir, monkeypatch):
    windows, thresholds, positions = eval_positions(tiny_scored_dir)
    tokenizer = assets.load_tokenizer(str(tiny_model_dir))

    targets = [tokenizer.decode([int(windows[i].input_ids[t])]) for i, t, _ in positions]
    common = max(set(targets), key=targets.count)

    # A model that always answers the most common target after 3 reasoning tokens: right exactly there.
    def always_common(self, docs, copies, seeds=None, max_reasoning_tokens=None):
        text = f"a b c</think> \\boxed{{{common}}}"
        prompts = [p for doc in docs for p in doc.prompts() for _ in range(copies)]
        return [Rollout(prompt_ids=p, reasoning_len=3, closed_think=True, text=text) for p in prompts]

    monkeypatch.setattr(RolloutEngine, "generate_shared", always_common)
    result = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], budget=4, positions=60, seed=3, progress=False)

    picked = sorted(np.random.default_rng(3).choice(len(positions), size=60, replace=False))
    sample = [positions[k] for k in picked]
    records = result["records"]["ntr"]
    assert [(r["window"], r["position"]) for r in records] == [(windows[i].window, t) for i, t, _ in sample]
    hits = [tokenizer.decode([int(windows[i].input_ids[t])]) == common for i, t, _ in sample]
    assert 0 < sum(hits) < len(hits)
    expected = recount([e for _, _, e in sample], hits, thresholds)
    ntr = result["results"]["ntr"]
    for name, (correct, n) in expected.items():
        assert (ntr["splits"][name]["correct"], ntr["splits"][name]["n"]) == (correct, n)
    assert ntr["avg"] == pytest.approx(np.mean([c / n for c, n in expected.values() if n]))
    assert [r["exact"] for r in records] == hits
    assert all(r["prefix"] for r, hit in zip(records, hits) if hit)  # a whole-token answer is also a prefix
    prefix = recount([e for _, _, e in sample], [r["prefix"] for r in records], thresholds)
    for name, (correct, n) in prefix.items():
        assert (ntr["prefix"]["splits"][name]["correct"], ntr["prefix"]["splits"][name]["n"]) == (correct, n)
    assert ntr["reasoning_len_mean"] == 3 and ntr["well_formed_frac"] == 1 and ntr["answered_frac"] == 1


def test_ntr_with_the_real_engine_is_consistent_and_deterministic(tiny_model_dir, tiny_scored_dir):
    first = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntp", "ntr"], budget=3, positions=12, seed=1,
                     progress=False)
    again = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntp", "ntr"], budget=3, positions=12, seed=1,
                     progress=False)
    other = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], budget=3, positions=12, seed=2, progress=False)
    assert first["records"] == again["records"]
    for mode in ("ntp", "ntr"):
        strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
        assert strip(first["results"][mode]) == strip(again["results"][mode])
    where = lambda result: [(r["doc_id"], r["window"], r["position"]) for r in result["records"]["ntr"]]  # noqa: E731
    assert where(first) != where(other)

    records = first["records"]["ntr"]
    assert len(records) == 12 and first["settings"]["reasoning_cap"] == 6
    # Past the cap only a closing tag begun there may go on (`rollout.reasoning_cut`).
    tag = len(answer_format_ids(assets.load_tokenizer(str(tiny_model_dir)))[0])
    assert all(r["reasoning_len"] <= 6 or (r["reasoning_len"] <= 6 + tag and not r["closed_think"]) for r in records)
    assert all(r["exact"] == (r["prediction"] == r["target"]) for r in records)
    ntr = first["results"]["ntr"]
    assert ntr["well_formed_frac"] == pytest.approx(np.mean([r["closed_think"] for r in records]))
    assert ntr["reasoning_len_mean"] == pytest.approx(np.mean([r["reasoning_len"] for r in records]))


def test_sampled_ntr_draws_each_positions_own_numbers(tiny_model_dir, tiny_scored_dir):
    """`temperature > 0`: one sampled answer per position, seeded by the position's index, so the records do
    not depend on how positions are batched, and differ from greedy decoding."""
    common = dict(budget=3, positions=12, seed=1, progress=False, temperature=1.0)
    small = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], batch_size=2, **common)
    large = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], batch_size=64, **common)
    greedy = evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntr"], budget=3, positions=12, seed=1, progress=False)
    responses = lambda result: [r["response"] for r in result["records"]["ntr"]]  # noqa: E731
    assert responses(small) == responses(large)
    assert responses(small) != responses(greedy)
    assert small["settings"]["temperature"] == 1.0 and greedy["settings"]["temperature"] == 0.0


def test_eval_command_writes_json_and_a_table(tiny_model_dir, tiny_scored_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(tiny_scored_dir), "--budget", "none",
            "--max-reasoning", "4", "--positions", "6", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["modes"] == ["ntp", "ntr"] and result["settings"]["budget"] is None
    assert result["settings"]["reasoning_cap"] == 4
    tag = len(answer_format_ids(assets.load_tokenizer(str(tiny_model_dir)))[0])
    assert all(r["reasoning_len"] <= 4 + tag for r in result["records"]["ntr"])
    printed = capsys.readouterr().out
    assert "greedy" in printed and "exact" in printed and "prefix" in printed and str(out) in printed


def test_a_run_folder_is_evaluated_at_its_latest_checkpoint_into_its_eval_json(tiny_model_dir, tiny_scored_dir,
                                                                               tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(tiny_model_dir, run / "checkpoints" / f"step-{step:06d}")
        (run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    assert main(["eval", "--model", str(run), "--data", str(tiny_scored_dir), "--mode", "ntp"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["checkpoint"] == str(run / "checkpoints" / "step-000002") and result["modes"] == ["ntp"]


def test_bad_inputs_are_one_clear_error(tiny_model_dir, tiny_scored_dir, tmp_path, capsys):
    with pytest.raises(RmtError, match="not an `rmt score` output"):
        evaluate(str(tiny_model_dir), tmp_path / "nothing", progress=False)
    with pytest.raises(RmtError, match="does not exist"):
        evaluate(str(tmp_path / "no-checkpoint"), tiny_scored_dir, progress=False)
    with pytest.raises(RmtError, match="modes"):
        evaluate(str(tiny_model_dir), tiny_scored_dir, ["ntx"], progress=False)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    out = str(tmp_path / "e.json")
    for model, data, message in [
        (tmp_path / "missing", tiny_scored_dir, "does not exist"),
        (tmp_path / "run", tiny_scored_dir, "no complete checkpoint"),
        (tiny_model_dir, tmp_path / "missing", "not an `rmt score` output"),
    ]:
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rmt eval: error:") and message in err and "\n" not in err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tiny_scored_dir), "--positions", "0",
                 "--out", out]) == 2
