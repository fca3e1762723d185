"""The run's one YAML config, mapped onto typed dataclasses, with dotted `key=value` overrides.

    python train.py --config configs/tiny.yaml optim.lr=1e-3 deepspeed.zero_stage=3 model.depth=4

Every key is checked before any work starts: an unknown or mistyped key fails with its dotted path and the
closest valid key; a value of the wrong type fails with the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.pipeline import DataConfig, SourceConfig
from model.config import ConfigError, ModelConfig


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # never applied to norms, biases or embeddings


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor and the end of a wsd cooldown, as a fraction of lr
    cooldown_fraction: float = 0.2  # wsd: the last fraction of steps decays
    cooldown_shape: str = "1-sqrt"  # wsd: 1-sqrt | linear | cosine

    def __post_init__(self):
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"schedule.kind='{self.kind}' is not cosine, wsd or constant")
        if self.cooldown_shape not in ("1-sqrt", "linear", "cosine"):
            raise ConfigError(f"schedule.cooldown_shape='{self.cooldown_shape}' is not 1-sqrt, linear or cosine")


@dataclass
class DeepSpeedConfig:
    # auto: DeepSpeed where several processes train, torch's own loop (train.engine.TorchEngine) where one does:
    # with one rank ZeRO partitions nothing, and DeepSpeed's engine only adds host time to every step
    # (docs/PERFORMANCE.md, tiny cells). deepspeed | torch: that engine whatever the world size (torch: one process).
    engine: str = "auto"
    zero_stage: int = 2
    bf16: bool = True  # bf16 weights (DeepSpeed's bf16 mode, fp32 master copy in the optimizer); off for CPU runs
    # fp32 weights, bf16 compute under torch.autocast (DeepSpeed's torch_autocast); takes precedence over bf16
    autocast: bool = False
    grad_accum: int = 1
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    # torch.compile's mode for the compiled regions: default | reduce-overhead (CUDA graphs: launch-bound tiny
    # steps) | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # What one compiled region spans: blocks (each block, plus the output layer with its loss: short compile times,
    # the default) | model (the whole forward, the attention mask's build and the embeddings included, as one graph
    # with automatic dynamic shapes: the launch-bound steps of tiny sweep cells; docs/study/STUDY.md, GPU time)
    compile_scope: str = "blocks"
    # Capture the training step once as a CUDA graph and replay it (train.graphed_step): one process, the torch
    # engine; batches padded to one shape (the output head runs at the target index's padded room). For tiny steps
    # bound by the host; on a CPU the same fixed-shape step runs uncaptured.
    cuda_graph: bool = False
    extra: dict = field(default_factory=dict)  # merged into the DeepSpeed JSON config as is

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} is not 0, 1, 2 or 3")
        if self.grad_accum < 1:
            raise ConfigError(f"deepspeed.grad_accum={self.grad_accum} must be >= 1")
        if self.engine not in ("auto", "deepspeed", "torch"):
            raise ConfigError(f"deepspeed.engine='{self.engine}' is not auto, deepspeed or torch")
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if self.compile_mode not in modes:
            raise ConfigError(f"deepspeed.compile_mode='{self.compile_mode}' is not one of {', '.join(modes)}")
        if self.compile_scope not in ("blocks", "model"):
            raise ConfigError(f"deepspeed.compile_scope='{self.compile_scope}' is not blocks or model")
        if self.cuda_graph and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"deepspeed.cuda_graph captures the whole step itself; compile_mode={self.compile_mode} captures CUDA "
                "graphs of its own inside it (use default or max-autotune-no-cudagraphs)"
            )
        if self.compile_scope == "model" and (self.zero_stage == 3 or self.activation_checkpointing):
            raise ConfigError(
                "deepspeed.compile_scope=model is not built for ZeRO-3's parameter hooks or activation checkpointing "
                "(use compile_scope=blocks)"
            )


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; 0 = only at the end and on signals
    keep: int = 2  # newest complete checkpoints kept
    at_steps: list[int] = field(default_factory=list)  # also save exactly here (WSD branch points)


@dataclass
class ExportConfig:
    """What a run writes when it ends, beside its checkpoints (train.export): RUN/export always when either is on."""

    hf: bool = False  # RUN/hf: a transformers folder of the whole model (trust_remote_code=True)
    hf_text: bool = False  # RUN/hf-text: a stock Llama/Qwen3 folder for text; the run fails if the config cannot map


@dataclass
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    telemetry_every: int = 100  # steps that also measure the largest attention logit (costs a T x T matmul)
    peak_tflops: float = 0.0  # 0: look the device up in the peak table (CPU has none: MFU is not reported)
    progress: str = "auto"  # auto | bar | lines
    sample_log: bool = False  # each rank appends the (sample key, start, end) of every row it trains on
    profile: list[int] = field(default_factory=list)  # [first, last): steps torch.profiler records (train.profile)

    def __post_init__(self):
        if self.profile and (len(self.profile) != 2 or not 0 <= self.profile[0] < self.profile[1]):
            raise ConfigError(f"logging.profile must be [first, last) steps with first < last; got {self.profile}")


@dataclass
class EvalConfig:
    every: int = 500  # steps; 0 = only at the end
    max_batches: int = 50  # per held-out source
    # evals/ tasks run with the held-out losses (rank 0, batched engine), logged as task/<name>/... with baselines
    tasks: list[str] = field(default_factory=list)
    task_items: int = 100  # items per task
    task_max_new_tokens: int = 48
    task_data: str = ""  # the dataset root the tasks read; "": beside data.tokenizer (the embedded layout)

    def __post_init__(self):
        if self.tasks:
            from evals.registry import TASKS

            unknown = [t for t in self.tasks if t not in TASKS]
            if unknown:
                raise ConfigError(f"eval.tasks: unknown task(s) {unknown} (known: {', '.join(sorted(TASKS))})")


@dataclass
class NanConfig:
    max_consecutive: int = 5  # this many non-finite steps in a row stop the run
    inject_steps: list[int] = field(default_factory=list)  # fault injection: these steps' losses become NaN
    inject_ranks: list[int] = field(default_factory=list)  # ...on these ranks only (empty: on every rank)


@dataclass
class RLConfig:
    """objective=rl (train/rl.py): GRPO on the reasoning tasks' train split, with a length term on the thoughts."""

    tasks: list[str] = field(default_factory=lambda: ["count", "twohop", "digitsum", "arith"])
    data: str = "artifacts/reasoning"  # `python -m data.reasoning`'s output: TASK/{train,heldout}
    prompts: int = 8  # prompts per step, all ranks together (grad_accum is derived: see groups_per_micro)
    group: int = 8  # samples per prompt, forked from one prefill
    max_new_tokens: int = 160  # thought and answer
    temperature: float = 1.0
    top_p: float = 1.0
    clip: float = 0.2  # the policy ratio's clip range (PPO/GRPO)
    kl: float = 0.0  # weight of the k3 KL estimate to the starting model (0: no reference model is kept)
    updates: int = 1  # optimizer steps per batch of rollouts (above 1 the ratio moves off 1 and the clip acts)
    groups_per_micro: int = 1  # prompts' groups in one micro-batch of the update: fewer, larger forwards on a GPU
    penalty: str = "none"  # none | kimi | sigmoid | dapo | l1 (train/length_penalty.py)
    alpha: float = 0.0  # the penalty's strength
    dapo_cache: int = 32  # dapo: the soft band before max_new_tokens
    l1_targets: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # l1: lengths asked in the prompt
    train_items: int = 1000  # prompts read per task
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_items: int = 50  # held-out items per task, greedy, thinking mode

    def __post_init__(self):
        from train.length_penalty import KINDS

        if self.penalty not in KINDS:
            raise ConfigError(f"rl.penalty='{self.penalty}' is not one of {', '.join(KINDS)}")
        if self.group < 2:
            raise ConfigError(f"rl.group={self.group}: group-relative advantages need two samples or more")
        if self.prompts < 1 or self.updates < 1 or self.max_new_tokens < 1 or self.groups_per_micro < 1:
            raise ConfigError("rl: prompts, updates, max_new_tokens and groups_per_micro must be positive")
        if not self.tasks:
            raise ConfigError("rl.tasks is empty")
        if self.penalty == "sigmoid" and not 0 <= self.alpha < 1:
            raise ConfigError(f"rl.alpha={self.alpha}: the sigmoid penalty takes alpha in [0, 1)")
        if self.penalty == "dapo" and not 0 < self.dapo_cache <= self.max_new_tokens:
            raise ConfigError("rl.dapo_cache must be in (0, max_new_tokens]")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    seed: int = 0
    resume: str = "auto"  # auto: the run_dir's latest checkpoint if any | none | a checkpoint directory
    init_from: str = ""  # a checkpoint to start from when run_dir has none of its own (a WSD cooldown branch)
    init_weights: str = ""  # an export (or a run directory with one): its weights only, fine-tuning's start
    # lm: every text target | sft: chat samples only, their assistant turns (data.chat) | rl: GRPO (train/rl.py)
    objective: str = "lm"
    # differences from the checkpoint's fingerprint a resume accepts (train/fingerprint.py): keys or prefixes, e.g.
    # [data.sources] to change the mixture; LR, schedule, steps, evaluation and logging are never checked
    resume_allow: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    nan: NanConfig = field(default_factory=NanConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def __post_init__(self):
        if self.objective not in ("lm", "sft", "rl"):
            raise ConfigError(f"objective='{self.objective}' is not 'lm', 'sft' or 'rl'")
        if self.objective in ("sft", "rl") and not (self.init_weights or self.init_from):
            raise ConfigError(
                f"objective={self.objective} fine-tunes a model: give init_weights (an export or a run directory)"
            )
        if self.objective == "rl" and not self.init_weights:  # its KL reference and its start are an export
            raise ConfigError("objective=rl starts from an export: give init_weights (an export or a run directory)")
        if self.objective == "rl" and self.deepspeed.zero_stage == 3:
            raise ConfigError("objective=rl generates with the model's own weights: ZeRO-3's partitions cannot")
        if self.deepspeed.cuda_graph and (self.objective == "rl" or self.logging.telemetry_every):
            raise ConfigError(
                "deepspeed.cuda_graph replays one captured step: objective=rl (rollouts) and logging.telemetry_every "
                "(a forward that differs on its steps) need the eager step"
            )
        if self.objective == "sft":
            self.data.kinds = self.data.kinds or ["chat"]
            if self.data.kinds != ["chat"]:
                raise ConfigError(f"objective=sft trains on chat samples only; data.kinds={self.data.kinds}")
        if self.export.hf_text:  # refused when the run starts, not after it has trained
            from train.hf.export import ExportError, text_architecture

            try:
                text_architecture(self.model)
            except ExportError as e:
                raise ConfigError(f"export.hf_text: {e}") from None
        if self.data.patch_size != self.model.patch_size:
            raise ConfigError(f"data.patch_size={self.data.patch_size} != model.patch_size={self.model.patch_size}")
        if self.data.position_scheme != self.model.position_scheme:
            raise ConfigError(
                f"data.position_scheme='{self.data.position_scheme}' != model.position_scheme="
                f"'{self.model.position_scheme}': the layout must match the rotary scheme"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        if self.data.max_image_patches > self.model.max_image_patches:
            raise ConfigError(
                f"data.max_image_patches={self.data.max_image_patches} exceeds "
                f"model.max_image_patches={self.model.max_image_patches}"
            )


# --------------------------------------------------------------------------------------------- mapping
def _hint(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(valid)})"


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        return build(tp, value, path + ".")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 3e-4 (no dot) as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, str):
        try:
            return int(value)  # "8", as a decimal field takes "3e-3"
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"'{path}' must be {tp.__name__}, got {value!r}")
    return value


def build(cls, values: dict, prefix: str = ""):
    """Dataclass `cls` from a nested dict, every key checked against the fields (recursively)."""
    if cls is ModelConfig:  # the model owns its size dial (depth) and its own key checks
        return ModelConfig.from_dict(values)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_hint(key, names)}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def apply_override(tree: dict, dotted: str) -> None:
    """`a.b.c=value` into a nested dict; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in dotted:
        raise ConfigError(f"override '{dotted}' is not key=value")
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(paths: str | Path | list | None, overrides: list[str] = ()) -> TrainConfig:
    """Later files are merged over earlier ones (e.g. a model config, then configs/deepspeed/zero3.yaml)."""
    tree: dict = {}
    for path in [paths] if isinstance(paths, str | Path) else paths or []:
        layer = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{path} does not hold a mapping")
        tree = _merge(tree, layer)
    for o in overrides:
        apply_override(tree, o)
    cfg = build(TrainConfig, tree)
    check_vocabulary(cfg)
    return cfg


def check_vocabulary(cfg: TrainConfig) -> None:
    """The tokenizer's pieces against the model's embedding, when the config loads rather than at the first batch
    (`token id 8187 is outside the vocabulary`). A tokenizer not built yet (a sweep planned before its data) is
    checked by the loader when it opens it."""
    path = Path(cfg.data.tokenizer)
    if not path.is_file():
        return
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    if pieces > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {path} has {pieces} pieces but model.vocab_size={cfg.model.vocab_size}: its ids would "
            f"fall outside the embedding; set model.vocab_size={pieces} (or more)"
        )
    if cfg.model.vocab_size > 2 * pieces:
        warnings.warn(
            f"model.vocab_size={cfg.model.vocab_size} is over twice the tokenizer's {pieces} pieces ({path}): the "
            f"extra rows are parameters that never see a token",
            stacklevel=2,
        )


def to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data (tuples as lists)."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


__all__ = ["ConfigError", "SourceConfig", "TrainConfig", "apply_override", "build", "load_config", "to_dict"]
