"""Run under `torchrun --nproc_per_node 2`: generation from an FSDP2-sharded model (torch's fully_shard, gloo
on CPU) inside `rmt.runs.gathered_weights`, with a different amount of decoding on each process, then a
training step. Writes each process's greedy rollouts to OUT/rank-R.json. A missing collective would hang."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from rmt import assets
from rmt.prompts import PromptBuilder
from rmt.rollout import RolloutEngine, RolloutSettings
from rmt.runs import gathered_weights

model_dir, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = assets.load_tokenizer(model_dir)
model = assets.load_model(model_dir)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)

builder = PromptBuilder(tokenizer)
ids = tokenizer("Tom has 12 apples and buys 4 more. How many apples now?", add_special_tokens=False)["input_ids"]
# Process 1 decodes three prompts with a longer cap, process 0 one prompt with a short one.
prompts = [builder.prompt_ids(ids, t, 3) for t in ([5] if rank == 0 else [5, 8, 11])]
cap = 2 if rank == 0 else 6
engine = RolloutEngine(model, tokenizer, RolloutSettings(max_reasoning_tokens=cap, answer_tokens=3, temperature=0.0))
model.eval()
with gathered_weights(model):
    rollouts = engine.generate(prompts, max_reasoning_tokens=cap)
model.train()
x = torch.tensor([ids])
model(input_ids=x, labels=x).loss.backward()  # training works again after the weights were freed
(out / f"rank-{rank}.json").write_text(json.dumps([r.response_ids for r in rollouts]))
dist.destroy_process_group()
