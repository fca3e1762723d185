"""Build the training engine: the plain model, wrapped from outside (activation checkpointing, compile), AdamW
with decay only on matrices, and either DeepSpeed's engine (its JSON config derived from the run config) or, where
one process trains, `TorchEngine`: the same interface over torch's own loop, which adds no host time to a step."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from model import FusionTransformer, build_model
from model.mlp import MLP
from train.config import ConfigError, TrainConfig


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


def apply_compile(model: FusionTransformer, mode: str = "default", scope: str = "blocks") -> None:
    """Compile block by block (regional compilation): one graph reused by every layer, short compile times; and
    the output layer with its loss as one more region (fused instead of B x T x V fp32 logits in eager). The loss
    region's input length, the batch's count of text targets, varies: it is symbolic from the first call
    (`VARYING`), so one compile serves every length. `mode` applies to the blocks
    (reduce-overhead: CUDA graphs for steps too small to keep the GPU ahead of the host). scope `model`: the
    whole forward as one region instead (mask build, embeddings, rotary and loss inside it), for steps whose
    eager glue between regions costs more host time than the GPU spends on the layers."""
    if scope == "model":
        model.loss_kernel = False  # its call would break the graph: the loss's compiled torch form instead
        eager = model.forward
        signature, checked = inspect.signature(eager), list(inspect.signature(model._check).parameters)
        compiled = varying_from_the_start(
            torch.compile(eager, dynamic=None, mode=None if mode == "default" else mode), signature
        )

        def forward(*args, **kwargs):
            """Training forwards compiled, the batch-varying lengths symbolic from the first step (`VARYING`);
            evaluation's run eagerly (flex attention still compiled per call): torch 2.11's inductor fails to lower
            flex attention inside a whole-model graph without gradients ("convert FlexibleLayout to FixedLayout
            first", on an H200), which ended 15 sweep cells at their final evaluation.
            The input check, which reads values back, runs here rather than in the graph: inside, it would break
            the first step's graph in five places and make the second step compile again without it."""
            if not torch.is_grad_enabled():
                return eager(*args, **kwargs)
            if not model.check_inputs:
                return compiled(*args, **kwargs)
            given = signature.bind(*args, **kwargs)
            given.apply_defaults()
            model._check(**{k: given.arguments[k] for k in checked})
            model.check_inputs = False
            try:
                return compiled(*args, **kwargs)
            finally:
                model.check_inputs = True

        model.forward = forward
        return
    for block in model.blocks:
        block.compile(dynamic=False, mode=None if mode == "default" else mode)
    text_losses = model.text_losses
    model.text_losses = varying_from_the_start(torch.compile(text_losses, dynamic=None), inspect.signature(text_losses))


# The inputs whose first dimension changes from batch to batch: a packed batch's count of image patches and of text
# targets. Left to automatic dynamic shapes, the first step compiles them as constants and the second step, seeing
# other counts, compiles the whole graph again with them symbolic (`TORCH_LOGS=recompiles`: "tensor 'patches' size
# mismatch at index 0"); marked before the first call, one compile serves every batch, the graph the second
# compile would have built.
VARYING = ("patches", "target_index")


def varying_from_the_start(compiled, signature: inspect.Signature):
    """`compiled` with the VARYING inputs of its first call marked dynamic before that call compiles it. Only the
    first: the graph it builds keeps them symbolic, so later steps pay nothing for the marking."""
    first = True

    def call(*args, **kwargs):
        nonlocal first
        if first:
            given = signature.bind(*args, **kwargs).arguments
            for name in VARYING:
                t = given.get(name)
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            first = False
        return compiled(*args, **kwargs)

    return call


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


def engine_kind(cfg: TrainConfig, world: int) -> str:
    """deepspeed or torch, from `deepspeed.engine` and the number of processes."""
    kind = cfg.deepspeed.engine
    if kind == "auto":
        return "torch" if world == 1 else "deepspeed"
    if kind == "torch" and world > 1:
        raise ConfigError(f"deepspeed.engine=torch trains in one process; {world} were launched (use auto)")
    return kind


def step_clip(cfg: TrainConfig, kind: str = "deepspeed") -> float:
    """The norm train.step clips to, 0 where DeepSpeed clips. Without ZeRO the step clips itself (torch's
    clip_grad_norm_ never waits for the GPU; DeepSpeed's ZeRO-0 clipping reads the norm back to the host); ZeRO
    partitions the gradients, so there DeepSpeed clips (train.zero_waits keeps that free of waits)."""
    return cfg.deepspeed.grad_clip if kind == "torch" or cfg.deepspeed.zero_stage == 0 else 0.0


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


class TorchEngine:
    """What the loop, the evaluation and the checkpoints ask of DeepSpeed's engine, for one process: bf16 compute
    under autocast over fp32 weights (DeepSpeed's `autocast` mode; its bf16 mode keeps bf16 weights instead), the
    loss divided by the accumulation steps, the optimizer stepped at the accumulation boundary. Checkpoints hold
    the fp32 module states in DeepSpeed's file name (train.export reads either) and the optimizer's state."""

    kind = "torch"
    MODEL_FILE, OPTIM_FILE = "mp_rank_00_model_states.pt", "optim_states.pt"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device):
        self.module, self.optimizer, self.device = model.to(device), optimizer, device
        self.grad_accum = cfg.deepspeed.grad_accum
        self.bf16 = cfg.deepspeed.bf16 or cfg.deepspeed.autocast
        self.micro_steps = 0

    def __call__(self, **batch):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(**batch)

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True):
        self.module.train(mode)

    def eval(self):
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return None  # train.step clips, and reports the norm, where this engine trains

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool = False) -> None:
        path = Path(root) / tag
        path.mkdir(parents=True, exist_ok=True)
        files = {
            self.MODEL_FILE: {"module": self.module.state_dict(), "engine": self.kind, "client_state": client_state},
            self.OPTIM_FILE: {"optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps},
        }
        for name, obj in files.items():
            torch.save(obj, path / f"{name}.tmp")
            os.replace(path / f"{name}.tmp", path / name)

    def load_checkpoint(self, root: str, tag: str, load_lr_scheduler_states: bool = False) -> tuple[str, dict]:
        path = Path(root) / tag
        if not (path / self.OPTIM_FILE).exists():
            raise ConfigError(
                f"{path} was written by DeepSpeed's engine; resume it with deepspeed.engine=deepspeed (or start this "
                f"run from its weights: python -m train.export, then a new run)"
            )
        model_states = torch.load(path / self.MODEL_FILE, map_location=self.device, weights_only=False)
        optim_states = torch.load(path / self.OPTIM_FILE, map_location=self.device, weights_only=False)
        self.module.load_state_dict(model_states["module"])
        self.optimizer.load_state_dict(optim_states["optimizer"])
        self.micro_steps = optim_states["micro_steps"]
        return str(path), model_states["client_state"]


def clear_stale_build_lock(name: str = "deepspeed_shm_comm", max_age_s: float = 600.0) -> Path | None:
    """DeepSpeed JIT-builds its CPU shared-memory op under torch's FileBaton (`<extensions>/<name>/lock`), which
    waits forever, silently, on a lock whose builder was killed. The lock is also taken, for moments, by every
    process that loads the built op (torch checks its version under it), so only its age tells a dead holder: a
    lock older than any build takes is removed (returned, with a warning naming it); a fresh one is left, with a
    note naming it."""
    import warnings

    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    if not lock.exists():
        return None
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:  # released meanwhile
        return None
    if age > max_age_s:
        lock.unlink(missing_ok=True)
        warnings.warn(f"removed {lock}, left by a build that was killed", stacklevel=2)
        return lock
    print(f"waiting for {lock}: another process is building DeepSpeed's {name} op (if none is, remove it)", flush=True)
    return None


def build_engine(cfg: TrainConfig, device: torch.device, world: int = 1):
    """(engine, optimizer, model): DeepSpeed's engine or a TorchEngine, as `engine_kind` says."""
    kind = engine_kind(cfg, world)
    if kind == "deepspeed":
        from train import zero_waits

        zero_waits.apply()  # DeepSpeed's ZeRO-1/2 step without its host waits
    model = build_model(cfg.model)
    if cfg.init_weights:  # before the engine: ZeRO's optimizers copy the weights they start from
        from train.finetune import load_weights

        load_weights(model, cfg.init_weights)
    choose_mlp_kernels(model, cfg)
    if cfg.deepspeed.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.deepspeed.compile:
        apply_compile(model, cfg.deepspeed.compile_mode, cfg.deepspeed.compile_scope)
    if kind == "torch":
        model.to(device)  # before the optimizer: fused AdamW keeps its state on the parameters' device
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        fused=True,  # one kernel per step, and its found_inf flag is how train.step skips non-finite steps
    )
    if kind == "torch":
        return TorchEngine(model, optimizer, cfg, device), optimizer, model
    if device.type == "cpu":
        clear_stale_build_lock()
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine, optimizer, model
