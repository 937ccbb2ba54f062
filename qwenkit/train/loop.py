"""The one training loop, for every objective: seeded data order, gradient accumulation, AdamW with
warmup + cosine decay, clipping, autocast, held-out evaluation, atomic checkpoints and resume,
metrics (JSONL + loss curve) and a progress bar with tokens/s and an ETA.

Per optimizer step: the global batch (run.batch_size examples) is cut into one slice per rank
and micro-batches per slice. Each micro-batch's loss *sum* is divided by the number of loss units
in the whole global batch, so accumulation and data parallelism reproduce the single big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from . import checkpoint as C
from .config import TrainConfig
from .data import Order
from .distributed import Dist, all_reduce_sum, gradient_sync, unwrap
from ..model.lora import lora_modules
from .metrics import MetricsLog, plot_losses


def make_optimizer(model, cfg: TrainConfig):
    """AdamW with weight decay on matrices only (not norms, biases or 1-d tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=False)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps (as a factor of lr)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.run.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """One run: `Trainer(cfg, setup, wrapped_model, dist).fit()`."""

    def __init__(self, cfg: TrainConfig, setup, model, d: Dist, log=print):
        self.cfg, self.setup, self.model, self.dist, self.log = cfg, setup, model, d, log
        self.out = Path(cfg.run.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.optimizer, self.scheduler = make_optimizer(model, cfg)
        self.order = Order(len(setup.train), cfg.run.seed)
        self.step, self.position = 0, 0
        self.lora = bool(lora_modules(unwrap(model)))
        per_rank = cfg.run.batch_size // d.world
        if per_rank * d.world != cfg.run.batch_size or per_rank % cfg.run.micro_batch_size:
            from ..errors import ConfigError

            raise ConfigError(f"run.batch_size ({cfg.run.batch_size}) must split into {d.world} rank(s) of "
                              f"whole micro-batches of {cfg.run.micro_batch_size}")
        self.per_rank = per_rank

    # ---- state -----------------------------------------------------------------------------
    def model_config(self) -> dict:
        return unwrap(self.model).config.to_hf_dict()

    def resume(self) -> int | None:
        path = C.resolve_resume(self.cfg.run.resume, self.ckpt_dir)
        if path is None:
            return None
        state = C.load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                  model_config=self.model_config(), lora=self.lora)
        self.step, self.position = state["step"], state["position"]
        self.log(f"resumed from {path} at step {self.step}")
        return self.step

    def save(self) -> None:
        C.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                          position=self.position, model_config=self.model_config(),
                          train_config=self.cfg.to_dict(), lora=self.lora, rank=self.dist.rank,
                          keep=self.cfg.run.keep_checkpoints)

    # ---- one step --------------------------------------------------------------------------
    def micro_batches(self) -> list[dict]:
        idx = self.order.indices(self.position, self.cfg.run.batch_size)
        self.position += self.cfg.run.batch_size
        mine = idx[self.dist.rank * self.per_rank : (self.dist.rank + 1) * self.per_rank]
        mb = self.cfg.run.micro_batch_size
        return [self.setup.collate([self.setup.train[i] for i in mine[j : j + mb]]) for j in range(0, len(mine), mb)]

    def train_step(self) -> dict:
        # Per-step seeding makes sampling and dropout a function of (seed, step, rank), so a
        # resumed run draws exactly what the uninterrupted one drew.
        torch.manual_seed(self.cfg.run.seed * 100_003 + self.step * 1_009 + self.dist.rank)
        objective, device = self.setup.objective, self.dist.device
        batches = [to_device(b, device) for b in self.micro_batches()]
        (total,) = all_reduce_sum([sum(objective.count(b) for b in batches)], self.dist)
        sums: dict[str, float] = {}
        tokens = 0
        for k, b in enumerate(batches):
            with gradient_sync(self.model, k == len(batches) - 1), autocast(self.cfg, device):
                loss_sum, metrics = objective.loss(self.model, b)
            (loss_sum * (self.dist.world / total)).backward()
            tokens += objective.tokens(b)
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
        grad_norm = self.clip()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [tokens], self.dist)
        row = {k: v / total for k, v in zip(keys, reduced)}
        row.update(step=self.step, lr=lr, grad_norm=grad_norm, tokens=int(reduced[-1]))
        return row

    def clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        limit = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return float(norm)

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        held, objective = self.setup.eval, self.setup.objective
        if len(held) == 0:
            return {}
        mb, limit = self.cfg.run.micro_batch_size, self.cfg.run.eval_batches * self.cfg.run.micro_batch_size
        examples = [held[i] for i in range(min(len(held), limit))]
        if hasattr(objective, "evaluate"):
            return objective.evaluate(self.model, [e["row"] for e in examples], [e["prompt_ids"] for e in examples])
        self.model.eval()
        total, count, torch_state = 0.0, 0, torch.get_rng_state()
        for j in range(0, len(examples), mb):
            b = to_device(self.setup.collate(examples[j : j + mb]), self.dist.device)
            with autocast(self.cfg, self.dist.device):
                loss_sum, _ = objective.loss(self.model, b)
            total, count = total + float(loss_sum), count + objective.count(b)
        self.model.train()
        torch.set_rng_state(torch_state)
        return {"eval_loss": total / max(1, count)}

    # ---- the run ---------------------------------------------------------------------------
    def fit(self) -> dict:
        start = self.resume()
        main = self.dist.is_main
        log = MetricsLog(self.out / "metrics.jsonl", start) if main else None
        run = self.cfg.run
        if start is None and run.eval_every:  # the baseline every later evaluation compares to
            self._log_eval(log)
        bar = _progress(run.max_steps, self.step, main)
        t0, tokens0, last = time.perf_counter(), 0, {}
        while self.step < run.max_steps:
            row = self.train_step()
            tokens0 += row["tokens"]
            row["tokens_per_s"] = tokens0 / (time.perf_counter() - t0)
            row["elapsed_s"] = time.perf_counter() - t0
            last = row
            if main and (self.step % run.log_every == 0 or self.step == run.max_steps):
                log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            self._periodic(log, last)
        bar.close()
        if main:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", f"qwenkit {self.cfg.objective}")
        return last

    def _log_eval(self, log) -> dict:
        result = self.evaluate()
        if result and log is not None:
            log.write({"step": self.step, **result})
            self.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def _periodic(self, log, row: dict) -> None:
        run, final = self.cfg.run, self.step == self.cfg.run.max_steps
        if final or (run.eval_every and self.step % run.eval_every == 0):
            row.update(self._log_eval(log))
        if final or (run.checkpoint_every and self.step % run.checkpoint_every == 0):
            self.save()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # smoothing=0: the rate (and ETA) averages the whole run so far, evaluations and saves included.
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", smoothing=0, dynamic_ncols=True)
