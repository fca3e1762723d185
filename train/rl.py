"""RL post-training with group-relative policy optimisation (GRPO, Shao et al. 2024), `objective: rl`.

A step: each rank takes its share of the step's prompts (a function of the seed and the step, so a resumed run
draws what an uninterrupted one would), asks them in thinking mode in one prefill and forks `rl.group` samples of
each from it, all decoded in one batch (infer.Engine.fork_each), scores every answer with the task's own reward
(evals: the score evaluation reports) and adds the length term of its thought (train/length_penalty.py).
Advantages are relative to the group. The update is PPO's clipped ratio on the sampled tokens of the thought and
answer, each token weighing the same across the rank's step (DAPO's token-level mean), plus an optional k3 KL
estimate to the starting model; `rl.groups_per_micro` prompts' groups make one micro-batch (`deepspeed.grad_accum`
is set to the rank's prompts over it). `GRPO` is the objective the training loop (train/trainer.py) runs, as it
runs pretraining.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data.chat import ChatTokens, parse
from data.images import ImageSpec
from data.tokenizer import Tokenizer
from evals.reasoning import ReasoningTask, user_turn
from evals.task import Item
from infer.engine import Engine, SamplingParams, pad_prompts
from infer.modes import prompt as mode_prompt
from infer.modes import stop_ids
from model import load_pretrained
from model.generate import append_text
from train.config import ConfigError, TrainConfig
from train.engine import engine_kind, step_clip
from train.length_penalty import length_rewards
from train.objective import Objective


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """Each reward against its group's mean, over the group's standard deviation: they sum to zero, and a group
    whose rewards are all equal teaches nothing (all zero)."""
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    if std < eps:
        return [0.0] * len(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


@dataclass
class Prompt:
    task: ReasoningTask
    item: Item
    target: int = 0  # l1: the thought length the prompt asks for


class Prompts:
    """The tasks' train items, in an order drawn from (seed, epoch): step s takes the next `rl.prompts` of them."""

    def __init__(self, cfg: TrainConfig, split: str = "train", per_task: int | None = None):
        self.items: list[Prompt] = []
        for name in cfg.rl.tasks:
            task = ReasoningTask(name)
            task.source = f"{name}/{split}"
            found = task.items(cfg.rl.data, per_task or cfg.rl.train_items)
            if not found:
                raise ConfigError(f"rl.tasks: no {split} items for {name} under {cfg.rl.data}/{name}/{split}")
            self.items += [Prompt(task, it) for it in found]
        self.cfg = cfg
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.items)))
            random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time
        return self._orders[epoch]

    def for_step(self, step: int, rank: int, world: int) -> list[Prompt]:
        """This rank's share of the step's prompts."""
        n, per = len(self.items), self.cfg.rl.prompts
        out = []
        for k in range(step * per, (step + 1) * per):
            epoch, at = divmod(k, n)
            p = self.items[self._order(epoch)[at]]
            if self.cfg.rl.penalty == "l1":  # the target drawn from the prompt's place in the stream
                targets = self.cfg.rl.l1_targets
                p = Prompt(p.task, p.item, targets[random.Random(k).randrange(len(targets))])
            out.append(p)
        return out[rank::world]


def question(p: Prompt) -> Item:
    """The item as asked: L1 writes its target length after the question."""
    if not p.target:
        return p.item
    return Item(p.item.image, f"{p.item.prompt} Think for {p.target} tokens.", p.item.reference, p.item.kind)


@dataclass
class Group:
    prompt: dict  # the one-row prompt batch
    samples: list[list[int]]  # what each sample wrote (stop id included)
    rewards: list[float]
    advantages: list[float]
    thought: list[int]  # thought tokens per sample
    correct: list[float]


class Rollouts:
    """Generation and reward: one prefill for a rank's prompts, `group` samples of each forked from it, each
    scored."""

    def __init__(self, cfg: TrainConfig, model, tok: Tokenizer):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.t = ChatTokens.of(tok)
        self.spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)

    def __call__(self, prompts: list[Prompt], step: int, rank: int = 0) -> list[Group]:
        """All of this rank's prompts in one prefill, `group` samples of each decoded in one batch."""
        rl, groups = self.cfg.rl, []
        engine = Engine(self.model)
        try:
            batches = [
                mode_prompt(user_turn(question(p), self.spec), self.tok, "thinking", self.model.cfg) for p in prompts
            ]
            seed = (self.cfg.seed * 1_000_003 + step * 1009 + rank) % 2**62
            params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, 0, stop_ids(self.t), seed)
            drawn = engine.fork_each(batches, rl.group, params)
        finally:
            self.model.train()
        for p, batch, samples in zip(prompts, batches, drawn, strict=True):
            replies = [parse(s, "thinking", self.t) for s in samples]
            correct = [p.task.reward(self.tok.decode(r.answer), p.item) if r.finished else 0.0 for r in replies]
            thought = [len(r.thought) for r in replies]
            length = length_rewards(
                rl.penalty,
                thought,
                [c > 0 for c in correct],
                rl.alpha,
                max_len=rl.max_new_tokens,
                cache=rl.dapo_cache,
                targets=[p.target] * len(thought),
            )
            rewards = [c + x for c, x in zip(correct, length, strict=True)]
            groups.append(Group(batch, samples, rewards, group_advantages(rewards), thought, correct))
        return groups


def sequence_logprobs(model_or_engine, groups: list[Group], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each sample's written tokens under the model, (samples, T-1), the groups' samples in
    order as one batch, and the mask of those tokens (left-padded rows: a sample's tokens are the last of its row)."""
    rows = [append_text(g.prompt, s) for g in groups for s in g.samples]
    batch, _, _ = pad_prompts(rows, device)
    logits = model_or_engine(**batch, return_logits=True).logits.float()
    tokens = batch["tokens"]
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    T = tokens.shape[1]
    index = torch.arange(T - 1, device=device)
    lengths = torch.tensor([len(s) for g in groups for s in g.samples], device=device)
    mask = index >= (T - 1 - lengths)[:, None]
    return logp, mask


def grpo_loss(logp, old_logp, ref_logp, mask, advantages, clip: float, kl: float, scale: float) -> tuple:
    """The clipped surrogate (and KL) summed over the written tokens, times `scale` (the step's token-level mean)."""
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    per_token = -surrogate
    k3 = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        per_token = per_token + kl * k3
    m = mask.float()
    clipped = (((ratio - 1).abs() > clip).float() * m).sum()
    return (per_token * m).sum() * scale, (k3.detach() * m).sum(), clipped


class GRPO(Objective):
    """`objective: rl`: a step is the rank's prompts' rollouts, then `rl.updates` passes of the clipped update."""

    counters = {"rollout_tokens": 0}

    @classmethod
    def configure(cls, cfg: TrainConfig, world: int) -> TrainConfig:
        rl = cfg.rl
        if rl.prompts % world or (rl.prompts // world) % rl.groups_per_micro:
            raise ConfigError(
                f"rl.prompts={rl.prompts} must split evenly over the {world} ranks, and each rank's share into "
                f"micro-batches of rl.groups_per_micro={rl.groups_per_micro} groups"
            )
        # the accumulation follows from the prompts, whatever the config says
        micro = rl.prompts // world // rl.groups_per_micro
        return dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, grad_accum=micro))

    def __init__(self, cfg, run, engine, optimizer, model, device, rank, world, group, saved):
        super().__init__(cfg, run, engine, optimizer, model, device, rank, world, group, saved)
        self.tok = Tokenizer(cfg.data.tokenizer)
        self.prompts = Prompts(cfg)
        self.held_out = Prompts(cfg, "heldout", cfg.rl.eval_items) if rank == 0 else None
        self.reference = None
        if cfg.rl.kl > 0:
            self.reference = load_pretrained(cfg.init_weights).to(device).eval().requires_grad_(False)
        self.rollouts = Rollouts(cfg, model, self.tok)
        self.clip_norm = step_clip(cfg, engine_kind(cfg, world))
        self.last_eval: dict = {}

    def banner(self) -> str:
        rl = self.cfg.rl
        return (
            f"rl      GRPO, {rl.prompts} prompts x {rl.group} samples a step, penalty {rl.penalty} "
            f"(alpha {rl.alpha:g}), kl {rl.kl:g}, {rl.updates} update(s) a batch, tasks {', '.join(rl.tasks)}"
        )

    def step(self, state: dict, lr: float, log) -> None:
        cfg, rl, engine, device, world = self.cfg, self.cfg.rl, self.engine, self.device, self.world
        step = state["step"]
        t0 = time.perf_counter()
        groups = self.rollouts(self.prompts.for_step(step, self.rank, world), step, self.rank)
        written = sum(len(s) for g in groups for s in g.samples)
        t1 = time.perf_counter()
        tokens = torch.tensor([float(written)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(tokens, group=self.group)
        scale = cfg.deepspeed.grad_accum * world / max(float(tokens), 1.0)  # engines divide by micro-batches, ranks
        k = rl.groups_per_micro
        micro = [groups[i : i + k] for i in range(0, len(groups), k)]  # cfg.deepspeed.grad_accum of them
        old = [None] * len(micro)
        if rl.updates > 1:  # the policy that sampled, held fixed over the updates
            with torch.no_grad():
                old = [sequence_logprobs(engine, m, device)[0] for m in micro]
        refs = [None] * len(micro)
        if self.reference is not None:
            with torch.no_grad():
                refs = [sequence_logprobs(self.reference, m, device)[0] for m in micro]
        sums = torch.zeros(3, dtype=torch.float64)  # loss, kl, clipped tokens
        for _ in range(rl.updates):
            for i, m in enumerate(micro):
                logp, mask = sequence_logprobs(engine, m, device)
                adv = torch.tensor([a for g in m for a in g.advantages], device=device)
                loss, kl, clipped = grpo_loss(
                    logp, logp.detach() if old[i] is None else old[i], refs[i], mask, adv, rl.clip, rl.kl, scale
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the RL loss is not finite; lower optim.lr or rl.alpha")
                engine.backward(loss)
                if i == len(micro) - 1 and self.clip_norm:
                    params = [p for p in engine.module.parameters() if p.grad is not None]
                    torch.nn.utils.clip_grad_norm_(params, self.clip_norm, foreach=True)
                engine.step()
                sums += torch.tensor([loss.item(), kl.item(), clipped.item()], dtype=torch.float64)
        t2 = time.perf_counter()
        state["rollout_tokens"] += int(tokens)
        stats = torch.tensor(
            [
                sum(sum(g.rewards) for g in groups),
                sum(sum(g.correct) for g in groups),
                sum(sum(g.thought) for g in groups),
                float(sum(len(g.samples) for g in groups)),
                *sums.tolist(),
            ],
            dtype=torch.float64,
        )
        if world > 1:
            dist.all_reduce(stats, group=self.group)
        n = stats[3].item()
        record = {
            "reward": stats[0].item() / n,
            "correct": stats[1].item() / n,
            "thought_tokens": stats[2].item() / n,
            "loss": stats[4].item() / (world * rl.updates * cfg.deepspeed.grad_accum),  # each micro-batch a mean
            "kl": stats[5].item() / max(float(tokens), 1.0),
            "clipped": stats[6].item() / max(float(tokens) * rl.updates, 1.0),
            "lr": lr,
            "rollout_s": t1 - t0,
            "update_s": t2 - t1,
            "rollout_tokens_per_s": float(tokens) / max(t1 - t0, 1e-9) / world,
        }
        done = step + 1
        if self.rank == 0 and (done == cfg.steps or (rl.eval_every and done % rl.eval_every == 0)):
            self.last_eval = evaluate(self.model, self.tok, self.held_out, rl.max_new_tokens, device)
            record.update({f"heldout/{k}": v for k, v in self.last_eval.items()})
        log(done, record)

    def finish(self, state: dict, log) -> dict:
        return {"heldout": self.last_eval}


def blind_rewards(prompts: list[Prompt]) -> dict[str, list[float]]:
    """Per blind baseline of the prompts' task (its majority answer: what no reading gets), each prompt's reward for
    the baseline's guess. The prompts are one task's."""
    task = prompts[0].task
    guesses = task.baselines([p.item for p in prompts])
    return {label: [task.reward(g, p.item) for p, g in zip(prompts, gs, strict=True)] for label, gs in guesses.items()}


def evaluate(model, tok: Tokenizer, held_out: Prompts, max_new_tokens: int, device) -> dict:
    """Greedy thinking-mode answers on held-out items: per task, accuracy and mean thought tokens, next to the task's
    blind baselines on the same items (its majority answer: what no reading of the question or image gets)."""
    t = ChatTokens.of(tok)
    spec = ImageSpec(model.cfg.patch_size, model.cfg.max_image_patches)
    engine = Engine(model)
    out: dict[str, float] = {}
    try:
        by_task: dict[str, list[Prompt]] = {}
        for p in held_out.items:
            by_task.setdefault(p.task.name, []).append(p)
        for name, ps in by_task.items():
            batch = [mode_prompt(user_turn(question(p), spec), tok, "thinking", model.cfg) for p in ps]
            ids = engine.generate(batch, SamplingParams(max_new_tokens, stop_ids=stop_ids(t)))
            replies = [parse(x, "thinking", t) for x in ids]
            right = [p.task.reward(tok.decode(r.answer), p.item) if r.finished else 0.0 for p, r in zip(ps, replies)]
            out[f"{name}/accuracy"] = sum(right) / len(right)
            out[f"{name}/thought_tokens"] = sum(len(r.thought) for r in replies) / len(replies)
            for label, blind in blind_rewards(ps).items():
                out[f"{name}/baseline/{label.replace(' ', '_')}"] = sum(blind) / len(blind)
    finally:
        model.train()
    return out
