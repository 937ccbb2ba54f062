"""Training objectives as loss functions the one loop calls: language modelling (pretrain and SFT,
which differ only in which labels are masked) and DPO. GRPO, which samples, lives in grpo.py.

Every objective returns a *sum* of per-unit losses and says how many units a batch holds
(`count`): the loop divides by the global count, so gradient accumulation and any number of
ranks give the same update as one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IGNORE


def token_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | ids_<=t) (B, T), 0 where the label is IGNORE."""
    logits = model(input_ids)  # (B, T, V)
    flat = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return flat.view(labels.shape)  # (B, T)


class LanguageModel:
    """Next-token cross-entropy over every label that is not IGNORE (pretrain, SFT)."""

    def count(self, batch: dict) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logp = token_logprobs(model, batch["input_ids"], batch["labels"])  # (B, T)
        loss_sum = -logp.sum()
        return loss_sum, {"loss": float(loss_sum.detach())}

    def tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()


class DPO:
    """Direct preference optimisation: -log sigmoid(beta * (policy margin - reference margin)).

    A batch stacks chosen rows then rejected rows; `ref` holds the reference model's sequence
    log-probs, computed once before training (see `reference_logps`).
    """

    def __init__(self, beta: float):
        self.beta = beta

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        seq = token_logprobs(model, batch["input_ids"], batch["labels"]).sum(-1)  # (2B,)
        chosen, rejected = seq.chunk(2)
        ref_chosen, ref_rejected = batch["ref"].chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)  # (B,)
        losses = -F.logsigmoid(self.beta * margin)
        metrics = {"loss": float(losses.detach().sum()), "accuracy": float((margin > 0).sum()),
                   "margin": float(self.beta * margin.detach().sum())}
        return losses.sum(), metrics

    def tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()


@torch.no_grad()
def sequence_logps(model, batches) -> torch.Tensor:
    """Summed label log-probs of every row of every batch, in order (the DPO reference)."""
    was_training = model.training
    model.eval()
    out = [token_logprobs(model, b["input_ids"], b["labels"]).sum(-1) for b in batches]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
