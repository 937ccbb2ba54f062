"""GRPO: for each prompt sample a group of completions with qwenkit's own generation, score them
with a reward function, normalise rewards within the group into advantages, and take a
policy-gradient step with a KL penalty to the reference model.

Loss per completion o_i (Shao et al. 2024, one update per rollout so the ratio is 1 in value):
    mean_t [ -exp(lp - lp.detach()) * A_i + beta * (exp(ref - lp) - (ref - lp) - 1) ]
The reference is the model before training: with LoRA, the same weights with the adapters
switched off; otherwise a frozen copy.
"""

from __future__ import annotations

import contextlib

import torch

from ..generate import generate
from .data import IGNORE, collate_masked, masked_example
from .distributed import unwrap
from ..model.lora import lora_disabled, lora_modules
from .objectives import token_logprobs


class GRPO:
    def __init__(self, cfg, tokenizer, reward_fn, reference=None):
        self.cfg, self.tokenizer, self.reward_fn = cfg, tokenizer, reward_fn
        self.reference = reference  # None: the policy with its LoRA adapters disabled
        self.stop_ids = list(tokenizer.eos_token_ids)

    def count(self, batch: dict) -> int:
        return len(batch["rows"]) * self.cfg.group_size

    def tokens(self, batch: dict) -> int:
        return batch.get("tokens", 0)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        completions, rewards, advantages = self.rollouts(model, batch)
        seqs = collate_masked([self._example(p, c) for p, c in completions])
        batch["tokens"] = seqs["input_ids"].numel()
        device = unwrap(model).device
        x, labels = seqs["input_ids"].to(device), seqs["labels"].to(device)
        lp = token_logprobs(model, x, labels)  # (N, T)
        with torch.no_grad():
            ref = token_logprobs(self._reference(model), x, labels)  # (N, T)
        mask = (labels != IGNORE).float()
        diff = ref - lp
        kl = torch.exp(diff) - diff - 1  # (N, T), k3 estimator, >= 0
        adv = advantages.to(device)[:, None]
        per_token = -torch.exp(lp - lp.detach()) * adv + self.cfg.kl_coef * kl
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1)  # (N,)
        seq_kl = (kl * mask).sum(-1) / mask.sum(-1)
        lengths = [len(c) for _, c in completions]
        metrics = {"loss": float(per_seq.detach().sum()), "reward": float(rewards.sum()), "kl": float(seq_kl.detach().sum()),
                   "length": float(sum(lengths))}
        return per_seq.sum(), metrics

    def _reference(self, model):
        return self.reference if self.reference is not None else _ReferenceView(unwrap(model))

    def _example(self, prompt: list[int], completion: list[int]) -> dict:
        ids = prompt + completion
        mask = [0] * len(prompt) + [1] * len(completion)
        return masked_example(ids, mask, len(ids))

    @torch.no_grad()
    def rollouts(self, model, batch: dict):
        """G sampled completions per prompt, their rewards (N,) and group-normalised advantages (N,)."""
        policy = unwrap(model)
        was_training = policy.training
        policy.eval()
        c = self.cfg
        prompts = [p for p in batch["prompt_ids"] for _ in range(c.group_size)]
        rows = [r for r in batch["rows"] for _ in range(c.group_size)]
        outs = self.sample(policy, prompts)
        policy.train(was_training)
        completions = list(zip(prompts, outs))
        rewards = [self.reward_fn(self.tokenizer.decode(o, skip_special_tokens=True), row) for o, row in zip(outs, rows)]
        r = torch.tensor(rewards, dtype=torch.float32).view(-1, c.group_size)  # (prompts, G)
        adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + 1e-4)
        return completions, r.flatten(), adv.flatten()

    def sample(self, policy, prompts: list[list[int]]) -> list[list[int]]:
        """One sampled completion per prompt; seeds come from the (per-step seeded) torch RNG."""
        c = self.cfg
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        if c.rollout == "generate":
            return [generate(policy, p, c.max_new_tokens, c.temperature, c.top_k or None, c.top_p, self.stop_ids, s)
                    for p, s in zip(prompts, seeds)]
        from ..engine import SamplingParams

        params = [SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                 top_p=c.top_p, seed=s, stop_token_ids=tuple(self.stop_ids)) for s in seeds]
        # A fresh engine per rollout: its prefix cache must not outlive the weights it was computed with.
        llm = _engine_for(policy, self.tokenizer, prompts, c.max_new_tokens)
        return [out.token_ids for out in llm.generate(prompts, params)]

    @torch.no_grad()
    def evaluate(self, model, rows: list[dict], prompts: list[list[int]]) -> dict:
        """Mean reward of greedy completions on held-out prompts."""
        return {"eval_reward": mean_reward(unwrap(model), self.tokenizer, prompts, rows, self.reward_fn,
                                           self.cfg.max_new_tokens)}


class _ReferenceView(torch.nn.Module):
    """Calls the policy with its adapters switched off (the reference without a second copy)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = [policy]  # a list, so the policy is not registered as a submodule

    def forward(self, *args, **kwargs):
        policy = self.policy[0]
        ctx = lora_disabled(policy) if lora_modules(policy) else contextlib.nullcontext()
        with ctx:
            return policy(*args, **kwargs)


def _engine_for(model, tokenizer, prompts: list[list[int]], max_new_tokens: int):
    """An engine with just the KV blocks these prompts need, all of them decoded together."""
    from ..engine import LLM, EngineSettings

    blocks = sum(-(-(len(p) + max_new_tokens + 1) // 16) for p in prompts) + 2
    return LLM(model, tokenizer, EngineSettings(num_blocks=blocks, max_num_seqs=len(prompts)))


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0) -> list[str]:
    """One reply to every prompt, batched in qwenkit's engine: greedy, or sampled at
    `temperature` with a seed per prompt derived from `seed` (reproducible)."""
    from ..engine import SamplingParams

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed * 1_000_003 + i,
                             stop_token_ids=tuple(tokenizer.eos_token_ids)) for i in range(len(prompts))]
    outs = _engine_for(model, tokenizer, prompts, max_new_tokens).generate(prompts, params)
    model.train(was_training)
    return [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]


def mean_reward(model, tokenizer, prompts: list[list[int]], rows: list[dict], reward_fn,
                max_new_tokens: int) -> float:
    """The mean reward of the greedy replies."""
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens)
    return sum(reward_fn(a, row) for a, row in zip(answers, rows)) / max(1, len(rows))
