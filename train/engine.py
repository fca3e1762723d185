"""Build the DeepSpeed engine: the plain model, wrapped from outside (activation checkpointing, compile), AdamW
with decay only on matrices, and the DeepSpeed JSON config derived from the run config."""

from __future__ import annotations

import os

import deepspeed
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model import FusionTransformer, build_model
from model.mlp import MLP
from train import zero_waits
from train.config import TrainConfig


def apply_activation_checkpointing(model: FusionTransformer) -> None:
    """Recompute each block in the backward pass (state-dict keys are unchanged by the wrapper)."""
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)


def quiet_host_threads(device: torch.device) -> None:
    """On a GPU, one intra-op CPU thread for the training process unless OMP_NUM_THREADS says otherwise, as torchrun
    sets when it starts several processes a node. With a thread per core, the process's CPU tensor ops run on a
    pool that competes with the loader's workers and the trainer's own Python for the cores: at 20M on an H100 the
    real loader ran 11.8% below in-memory batches that way, 0.2% with one thread (docs/PERFORMANCE.md, round 7)."""
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def apply_compile(model: FusionTransformer) -> None:
    """Compile block by block (regional compilation): one graph reused by every layer, short compile times; and
    the output layer with its loss as one more region (fused instead of B x T x V fp32 logits in eager). The loss
    region's input length, the batch's count of text targets, varies: the second length seen makes that dimension
    symbolic (automatic dynamic shapes), one recompile instead of one per length."""
    for block in model.blocks:
        block.compile(dynamic=False)
    model.text_losses = torch.compile(model.text_losses, dynamic=None)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of the blocks and the output head; never norms, biases or input embeddings."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        embedding = name.startswith(("tok_emb.", "patch_emb."))
        (no_decay if p.dim() < 2 or embedding else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def step_clip(cfg: TrainConfig) -> float:
    """The norm train.step clips to, 0 where DeepSpeed clips. Without ZeRO the step clips itself (torch's
    clip_grad_norm_ never waits for the GPU; DeepSpeed's ZeRO-0 clipping reads the norm back to the host); ZeRO
    partitions the gradients, so there DeepSpeed clips (train.zero_waits keeps that free of waits)."""
    return cfg.deepspeed.grad_clip if cfg.deepspeed.zero_stage == 0 else 0.0


def deepspeed_config(cfg: TrainConfig) -> dict:
    ds = cfg.deepspeed
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": 0.0 if step_clip(cfg) else ds.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage},
        # DeepSpeed's own overflow check reads a flag back to the host every step; train.step's guard skips
        # non-finite steps on the device instead.
        "bf16": {"enabled": ds.bf16 and not ds.autocast, "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed calls any client optimizer "untested"
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        # Its throughput timer calls torch.cuda.synchronize() at the start and the end of every step, for a
        # samples/s log line this trainer never prints: the GPU's queue ran dry each step (PERFORMANCE.md, round 6).
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.autocast:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    for key, value in ds.extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def choose_mlp_kernels(model: FusionTransformer, cfg: TrainConfig) -> None:
    """Keep torch's MLP kernels where QuACK's fused ones (model.mlp) would break a promise of the engine. They read
    the weights without calling the layers, which is where ZeRO-3 gathers them; and under activation checkpointing
    the 125M step peaked at twice the memory with them (15.2 against 7.5 GB on an H200, docs/PERFORMANCE.md round
    9), which is what checkpointing is there to prevent."""
    if cfg.deepspeed.zero_stage == 3 or cfg.deepspeed.activation_checkpointing:
        for module in model.modules():
            if isinstance(module, MLP):
                module.fused = False


def build_engine(cfg: TrainConfig, device: torch.device):
    zero_waits.apply()  # DeepSpeed's ZeRO-1/2 step without its host waits
    model = build_model(cfg.model)
    choose_mlp_kernels(model, cfg)
    if cfg.deepspeed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.deepspeed.compile:
        apply_compile(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        fused=True,  # one kernel per step, and its found_inf flag is how train.step skips non-finite steps
    )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine, optimizer, model
