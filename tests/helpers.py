"""Shared builders for tests: a small corpus and its scored dataset on the tiny model."""

import json
import random
from pathlib import Path

from rmt.score import ScoreOptions, score_dataset


def write_corpus(path: Path, n: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            text = (f"Tom has {a} apples and buys {b} more. How many apples now? {a} + {b} = {a + b}. "
                    f"Ana has {b} books and reads {a} paragraphs in the café.")
            f.write(json.dumps({"text": text}) + "\n")
    return path


def score_tiny(model_dir: Path, folder: Path) -> Path:
    corpus = write_corpus(folder / "corpus.jsonl")
    out = folder / "scored"
    # Quantile bands: a random model's entropies are all high, and the tests need every band populated.
    options = ScoreOptions(top_k=0, max_length=64, stride=48, min_context=8, band_mode="quantile", batch_size=16)
    score_dataset(str(model_dir), str(corpus), out, ["midtrain", "eval"], options)
    return out


def run_and_kill(cmd: list[str], metrics: Path, lines: int, env: dict | None = None) -> None:
    """Start `cmd`, SIGKILL it once `metrics` has `lines` lines, and check it was killed, not finished."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def assert_same_record(a: dict, b: dict, skip=()) -> None:
    """Two metrics records agree: same keys, floats within 1e-5, everything else equal (but `skip`)."""
    import pytest

    assert a.keys() == b.keys()
    for key in a.keys() - set(skip):
        if isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        else:
            assert a[key] == b[key], key


class OddLength:
    """A reward through the reward interface (`rmt.rewards`): 1 for responses of odd length in characters.

    A random tiny model never writes a correct answer, which would leave every advantage 0 and the weights
    unchanged; this reward differs within most groups, so that the tests' steps really update the model.
    Subprocesses name it in the config: `reward.name=helpers:OddLength` with the tests folder on PYTHONPATH."""

    name = "odd-length"

    def __call__(self, rollouts, tasks, context):
        assert len(rollouts) == len(tasks)
        return [{"reward": float(len(r.text) % 2), "odd": float(len(r.text) % 2)} for r in rollouts]


def subprocess_env() -> dict:
    """The environment for a subprocess that imports from the tests folder (e.g. `helpers:OddLength`)."""
    import os

    folder = str(Path(__file__).parent)
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([folder, *filter(None, [os.environ.get("PYTHONPATH")])])}
