"""Next-token prediction over the loader's packed batches: pretraining (`objective: lm`) and fine-tuning on chats
(`objective: sft`, the same step on chat samples whose prompts are not targets).

Per step (the loop has set the LR): `grad_accum` micro-batches through the engine and the optimizer step (train/step.py:
the NaN/Inf guard runs on the device, so the step adds no wait for the GPU); metrics every `logging.every` steps
(the only host sync of the loop, which also raises on too many skipped steps in a row); validation and task scores
every `eval.every`.
"""

from __future__ import annotations

import json
import time

from data.handoff import SideCopy
from data.pipeline import DataError, source_samples
from data.rows import open_loader, rows_needed
from model import IGNORE, flops_per_token, param_count
from train.engine import engine_kind, step_clip
from train.evaluate import validate
from train.graphed_step import GraphedStep
from train.metrics import memory_gb, peak_flops
from train.objective import Log, Objective
from train.profile import StepProfiler
from train.step import LOSSES, TrainStep, target_weights
from train.task_eval import TaskEval


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN or Inf loss."""


def data_epochs(counts: dict, sizes: dict, world: int) -> dict:
    """Epochs of each training source the run read: this rank's samples read times the ranks (the streams split
    every source evenly), over the source's samples; a source without a manifest is left out."""
    return {name: counts.get(f"source/{name}", 0) * world / n for name, n in sizes.items() if n}


class NextToken(Objective):
    counters = {"tokens": 0, "flops": 0.0, "flops_6n": 0.0, "skipped_steps": 0}

    def __init__(self, cfg, run, engine, optimizer, model, device, rank, world, group, saved):
        super().__init__(cfg, run, engine, optimizer, model, device, rank, world, group, saved)
        self.loader = open_loader(cfg.data, rank, world, (saved or {}).get("data"), pin_memory=device.type == "cuda")
        self.copy = SideCopy(device)
        mc, self.G, self.B, self.T = cfg.model, cfg.deepspeed.grad_accum, cfg.data.batch_size, cfg.data.seq_len
        if cfg.data.rows and self.loader.capacity() < cfg.steps * self.G:  # before training, not at the run's end
            raise DataError(
                f"the row store {cfg.data.rows} holds {self.loader.capacity()} batches of {self.B} rows for rank "
                f"{rank}; {cfg.steps} steps x {self.G} micro-batches need {cfg.steps * self.G}: build it with "
                f"--rows {rows_needed(cfg.steps * self.G * world, self.loader.store.streams, self.B)} or more"
            )
        self.tokens_per_step = world * self.G * self.B * self.T
        self.fpt, self.fpt_6n = flops_per_token(mc, self.T), flops_per_token(mc, self.T, attention=False)
        self.peak = peak_flops(device, cfg.deepspeed.bf16 or cfg.deepspeed.autocast, cfg.logging.peak_tflops)
        self.inject, self.inject_ranks = set(cfg.nan.inject_steps), set(cfg.nan.inject_ranks or range(world))
        self.sample_log = open(run / f"samples_rank{rank}.jsonl", "a") if cfg.logging.sample_log else None  # noqa: SIM115
        self.task_eval = TaskEval(cfg, rank, world)
        step_kind = GraphedStep if cfg.deepspeed.cuda_graph else TrainStep
        self.run_step = step_kind(engine, optimizer, device, clip=step_clip(cfg, engine_kind(cfg, world)))
        self.profiler = StepProfiler(cfg.logging.profile, run, device, rank)
        self.window_steps, self.window_t0, self.head_rows = 0, time.perf_counter(), 0
        self.last_loss = None  # the latest logged training loss, for the summary

    def banner(self) -> str:
        cfg, mc = self.cfg, self.cfg.model
        sources = ", ".join(f"{x.name} {x.weight:g}" for x in cfg.data.sources)
        return (
            f"model   {param_count(mc) / 1e6:.2f}M parameters ({param_count(mc, embeddings=False) / 1e6:.2f}M "
            f"without embeddings), depth {mc.n_layers}, width {mc.d_model}\n"
            f"batch   {self.tokens_per_step:,} tokens a step ({self.world} rank(s) x {self.G} micro-batch(es) x "
            f"{self.B} rows x {self.T}), {cfg.steps} steps\n"
            f"data    {sources}"
        )

    def rank_state(self) -> dict:
        return {"data": self.loader.state_dict()}

    def step(self, state: dict, lr: float, log: Log) -> None:
        cfg, model, step = self.cfg, self.model, state["step"]
        self.profiler.before(step)
        log_now = (step + 1) % cfg.logging.every == 0 or step + 1 == cfg.steps
        telemetry = log_now and cfg.logging.telemetry_every and (step + 1) % cfg.logging.telemetry_every == 0
        model.track_attention_logits(bool(telemetry))
        batches, counts = [], []
        for micro in range(self.G):
            cpu_batch = next(self.loader)
            counts.append(int((cpu_batch["targets"] != IGNORE).sum()))  # on the host: no wait for the GPU
            batches.append(self.copy(cpu_batch))  # one copy, beside the step before (data.handoff)
            if self.sample_log:  # flushed per line: the log must survive the crash it may be needed to explain
                self.sample_log.write(json.dumps({"step": step, "micro": micro, "rows": self.loader.last_pieces}))
                self.sample_log.write("\n")
                self.sample_log.flush()
        weights = target_weights(counts, self.group)
        inject = step in self.inject and self.rank in self.inject_ranks
        first = self.run_step(batches, step, inject_nan=inject, weights=weights)
        self.head_rows += self.run_step.head_rows(batches)
        model.track_attention_logits(False)
        model.check_inputs = False  # the first step proved the data fits the model; spare a sync per forward
        state["tokens"] += self.tokens_per_step
        state["flops"] += self.fpt * self.tokens_per_step
        state["flops_6n"] += self.fpt_6n * self.tokens_per_step
        self.window_steps += 1
        self.profiler.after(step)
        done = step + 1
        if log_now:
            self._log_window(state, lr, telemetry, first, log)
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.steps:
            eval_t0 = time.perf_counter()
            val = validate(self.engine, cfg.data, cfg.eval.max_batches, self.device, self.rank, self.world)
            if val:
                log(done, val, prefix="val/")
            scores = self.task_eval(model)
            if scores:
                log(done, scores)
            self.window_t0 += time.perf_counter() - eval_t0  # tokens/s counts training time only

    def _log_window(self, state, lr, telemetry, first, log: Log) -> None:
        """The metrics of the steps since the last log: the only host sync of a training step."""
        cfg, mc = self.cfg, self.cfg.model
        window = self.run_step.take()
        state["skipped_steps"] += window["skipped"]
        if window["max_streak"] >= cfg.nan.max_consecutive:
            raise NonFiniteLoss(
                f"{window['max_streak']} consecutive steps had a NaN/Inf loss (last at step {window['last_bad']}); "
                "stopping. Lower optim.lr, check the data with `python -m data.check`, or resume from an earlier "
                "checkpoint."
            )
        dt = time.perf_counter() - self.window_t0
        tps = self.window_steps * self.tokens_per_step / dt
        grad_norm = self.run_step.grad_norm()
        head_share = self.head_rows / (self.window_steps * self.G * self.B * self.T)
        fpt_run = flops_per_token(mc, self.T, head_share=head_share)  # "MFU run": the head where it ran
        peak, world = self.peak, self.world
        record = {
            **{k: window[k] for k in LOSSES},
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            "tokens_per_s": tps,
            "mfu": self.fpt * tps / (peak * world) if peak else None,
            "mfu_run": fpt_run * tps / (peak * world) if peak else None,
            "memory_gb": memory_gb(self.device),
            **{k: state[k] for k in self.counters},  # tokens and FLOPs so far: loss against compute, from the log
        }
        if telemetry:
            record["max_attn_logit"] = float(self.model.max_attention_logit())
            record["logit_norm"] = float(first.logit_norm)
        self.last_loss = record["loss"]
        log(state["step"] + 1, record)
        self.window_steps, self.window_t0, self.head_rows = 0, time.perf_counter(), 0

    def finish(self, state: dict, log: Log) -> dict:
        cfg, mc = self.cfg, self.cfg.model
        last_val = validate(self.engine, cfg.data, cfg.eval.max_batches, self.device, self.rank, self.world)
        final_tasks = self.task_eval(self.model)
        log(state["step"], last_val, prefix="val/")
        if final_tasks:
            log(state["step"], final_tasks)
        counts = self.loader.skip_counts()
        return {
            "params": param_count(mc),
            "params_non_embedding": param_count(mc, embeddings=False),
            "flops_per_token": self.fpt,
            "flops_per_token_6n": self.fpt_6n,
            "final_train_loss": self.last_loss,
            "final_val": last_val,
            "val_text_loss": last_val.get("text_loss"),
            "final_tasks": final_tasks,
            "data_counts": counts,
            "data_epochs": data_epochs(counts, source_samples(cfg.data), self.world),
        }

    def close(self) -> None:
        self.loader.close()
        if self.sample_log:
            self.sample_log.close()
