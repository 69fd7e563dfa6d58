"""Math questions with verifiable answers for post-training (SPEC §10), their prompt, and the reward.

Sources, each giving a training list and a held-out evaluation list:

- `gsm8k`: the `posttrain` part of the embedded GSM8K (`rmt.corpus.document_split`), split again by a
  hash of the question into training and evaluation questions. Mid-training uses only the `midtrain`
  part, so mid-training documents, post-training questions and evaluation questions are disjoint.
- `reasoning-gym:TASK`: procedural problems generated offline; evaluation items come from indices after
  the training ones and are deduplicated against them.
- `FILE.jsonl` with `question` and `answer` fields: split by the same question hash, or, with a second
  file of evaluation questions, all of one for training and all of the other for evaluation.

`check_disjoint` refuses any overlap (questions compared after normalisation).
"""

from __future__ import annotations

import hashlib
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from rmt.corpus import EMBEDDED_CORPUS, gsm8k_answer, load_corpus, read_jsonl_records, split_corpus
from rmt.errors import RmtError
from rmt.prompts import THINK_OPEN, PromptBuilder
from rmt.rewards import extract_prediction

REASONING_GYM = "reasoning-gym:"
# Measured on SmolLM2-135M-Instruct: asking for "a single number" puts a number in the box more often than
# "only the final answer"; a worked example raised that further but was then copied into answers.
MATH_INSTRUCTION = (
    "Solve the math problem below. Think step by step inside <think> </think>, "
    "then write the final answer, a single number, inside \\boxed{}."
)
QUESTION_HEADER = "\n### Question\n"
_PLAIN_ANSWER_HEADER = "\n### Answer\n"
_MAX_ANSWER_CHARS = 200  # longer "answers" are not answers, and sympy could spend seconds on them


@dataclass(frozen=True)
class MathQuestion:
    id: str
    question: str
    answer: str  # the gold final answer, as text ("18", "\\frac{1}{2}")


@dataclass
class MathData:
    source: str
    train: list[MathQuestion]
    eval: list[MathQuestion]


# ---- sources ------------------------------------------------------------------------------------


def normalize_question(text: str) -> str:
    """The form questions are compared in: Unicode NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def is_eval_question(question: str, eval_fraction: float) -> bool:
    """Held out for evaluation: a stable hash of the normalised question, salted so that it is
    independent of the corpus split that put the question in the `posttrain` part."""
    digest = hashlib.sha256(("posttrain-eval\x00" + normalize_question(question)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _hash_split(questions: list[MathQuestion], eval_fraction: float) -> tuple[list, list]:
    train = [q for q in questions if not is_eval_question(q.question, eval_fraction)]
    held_out = [q for q in questions if is_eval_question(q.question, eval_fraction)]
    return train, held_out


def gsm8k_questions() -> list[MathQuestion]:
    """The `posttrain` part of the embedded GSM8K, as questions with their final numeric answers."""
    docs = split_corpus(load_corpus(EMBEDDED_CORPUS), "posttrain")
    return [MathQuestion(d.id, d.meta["question"], d.meta["answer"]) for d in docs]


def reasoning_gym_questions(task: str, size: int, seed: int, options: dict | None = None) -> list[MathQuestion]:
    """`size` problems of a reasoning-gym task; `options` are the task's settings (e.g. `max_digits`)."""
    import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **(options or {}))
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise RmtError(f"reasoning-gym task '{task}' with options {options or {}}: {exc}; "
                       "e.g. reasoning-gym:basic_arithmetic") from exc
    return [MathQuestion(f"{task}:{seed}:{i}", item["question"], str(item["answer"])) for i, item in enumerate(dataset)]


def read_questions(path: str | Path) -> list[MathQuestion]:
    """Questions of a JSONL file whose records have `question` and `answer` (GSM8K's `#### 18` is understood)."""
    path = Path(path)
    if not path.is_file():
        raise RmtError(f"question file {path} does not exist; give gsm8k, reasoning-gym:TASK or a .jsonl file")
    out = []
    for lineno, record in read_jsonl_records(path):
        if "question" not in record or "answer" not in record:
            raise RmtError(f"{path}:{lineno}: each line must be a JSON object with 'question' and 'answer'")
        answer = str(record["answer"])
        answer = gsm8k_answer(answer) if "####" in answer else answer.strip()
        out.append(MathQuestion(f"{path.stem}:{lineno}", str(record["question"]).strip(), answer))
    if not out:
        raise RmtError(f"{path}: holds no questions")
    return out


def _unseen(questions: list[MathQuestion], seen: set[str]) -> list[MathQuestion]:
    """The questions not in `seen` (normalised), first occurrences only; adds them to `seen`."""
    out = []
    for q in questions:
        key = normalize_question(q.question)
        if key not in seen:
            seen.add(key)
            out.append(q)
    return out


def load_math_data(source: str, eval_source: str = "", eval_fraction: float = 0.3, generated_train: int = 1000,
                   generated_eval: int = 200, seed: int = 0, task_options: dict | None = None) -> MathData:
    """Training and evaluation questions of a source (see the module docstring); checked disjoint."""
    if eval_source and not source.endswith(".jsonl"):
        raise RmtError("eval_source (a second .jsonl file) goes with a .jsonl source only")
    if source == EMBEDDED_CORPUS:
        train, held_out = _hash_split(gsm8k_questions(), eval_fraction)
    elif source.startswith(REASONING_GYM):
        task = source[len(REASONING_GYM):]
        # reasoning-gym seeds item i with seed + i: starting after the training items gives new ones.
        # Easy settings repeat problems, so repeats are dropped, and evaluation keeps only unseen ones.
        seen: set[str] = set()
        train = _unseen(reasoning_gym_questions(task, generated_train, seed, task_options), seen)
        held_out = _unseen(reasoning_gym_questions(task, generated_eval, seed + generated_train, task_options), seen)
    elif source.endswith(".jsonl"):
        questions = read_questions(source)
        if eval_source:
            train, held_out = questions, read_questions(eval_source)
        else:
            train, held_out = _hash_split(questions, eval_fraction)
    else:
        raise RmtError(f"unknown question source '{source}'; give gsm8k, reasoning-gym:TASK or a .jsonl file")
    if not train or not held_out:
        raise RmtError(f"{source}: {len(train)} training and {len(held_out)} evaluation questions; need both")
    check_disjoint(train, held_out)
    return MathData(source, train, held_out)


def check_disjoint(train: list[MathQuestion], held_out: list[MathQuestion], documents: list[str] = ()) -> None:
    """Raise RmtError if a question is both trained on and evaluated, or appears in a mid-training
    document (`documents`: their texts; a question inside a document counts)."""
    train_set = {normalize_question(q.question) for q in train}
    both = [q for q in held_out if normalize_question(q.question) in train_set]
    if both:
        raise RmtError(f"{len(both)} evaluation question(s) are also training questions, "
                       f"e.g. '{both[0].question[:80]}'; evaluation must use held-out questions")
    if documents:
        texts = [normalize_question(d) for d in documents]
        for q in [*train, *held_out]:
            norm = normalize_question(q.question)
            if any(norm in t for t in texts):
                raise RmtError(f"question {q.id} appears in the mid-training corpus: '{q.question[:80]}'")


# ---- prompt -------------------------------------------------------------------------------------


class QuestionPrompt:
    """Prompt token ids for a question: the math instruction and the question, through the chat template
    (`PromptBuilder` decides chat vs plain the same way as for mid-training), then `<think>\\n`."""

    def __init__(self, tokenizer, style: str = "auto", prefill_think: bool = True,
                 instruction: str = MATH_INSTRUCTION):
        self.tokenizer = tokenizer
        self.chat = PromptBuilder(tokenizer, style, prefill_think).chat
        self.prefill_think = prefill_think
        self.instruction = instruction

    def text(self, question: str) -> str:
        user = self.instruction + QUESTION_HEADER + question.strip()
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = user + _PLAIN_ANSWER_HEADER
        return text + (THINK_OPEN if self.prefill_think else "")

    def ids(self, question: str) -> list[int]:
        return self.tokenizer(self.text(question), add_special_tokens=False)["input_ids"]


# ---- reward -------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    # Full-width digits and other compatibility forms become ASCII; the Unicode minus is a minus.
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-").strip()


def _is_calculation(expr) -> bool:
    """An expression still to be computed (`21 * 70`, `3 + 4`, `\\sqrt{4}`), not a value or an equation."""
    from sympy import Basic
    from sympy.core.relational import Relational

    return isinstance(expr, Basic) and not expr.is_Atom and not isinstance(expr, Relational)


def answers_match(prediction: str, gold: str) -> bool:
    """Whether a boxed answer equals the gold answer, by math_verify (`\\frac{1}{2}` = 0.5, `1,000` = 1000,
    `\\$18` = 18), or, for gold answers that are not math, by equal text. When the gold answer is a number,
    a calculation (`21 * 70` for 1470) scores 0: copying the question's expression is not solving it.
    Never raises."""
    from math_verify import parse, verify

    prediction, gold = _clean(prediction), _clean(gold)
    if not prediction or len(prediction) > _MAX_ANSWER_CHARS:
        return False
    # math_verify's timeouts use SIGALRM, which only the main thread may set.
    seconds = 1 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds)
        if not gold_parsed:
            return re.sub(r"\s+", " ", prediction) == re.sub(r"\s+", " ", gold)
        predicted = parse(f"\\boxed{{{prediction}}}", parsing_timeout=seconds)
        if not predicted or (getattr(gold_parsed[0], "is_Number", False) and _is_calculation(predicted[0])):
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=seconds))
    except Exception:  # noqa: BLE001 -- odd input can break sympy in many ways; it is a wrong answer
        return False


def math_reward(response_text: str, gold: str) -> float:
    """1.0 if the last `\\boxed{}` after `</think>` holds the gold answer, else 0.0 (also when missing)."""
    prediction = extract_prediction(response_text)
    return float(prediction is not None and answers_match(prediction, gold))
