"""The engine: requests in, one scheduled step at a time, per-request outputs out (single-threaded).

`Engine.step()` asks the scheduler for chunks, runs them through the model runner, records the
sampled tokens and returns each request's news as a `RequestOutput`. The offline `LLM` loops over
it; `AsyncEngine` runs it in a background thread for servers and benchmarks.

Several samples of one prompt (a request's `n` choices) share the prompt's K/V: a request added
`after=` another with the same prompt waits until that one's prompt is computed, then is
admitted and finds the prompt's full blocks in the prefix cache (reference-counted, stored
once); only the last, partial block and its own tokens are its alone.
"""

from __future__ import annotations

import time

from ..backends.cpu_kernels import MAX_ROWS
from ..errors import ConfigError, RequestError
from ..model.multi_lora import Adapter, AdapterSet
from ..speculative.verify import num_kept
from .block_manager import BlockManager, StateBlockManager
from .memory import plan_num_blocks, state_slots
from .output import IncrementalText, RequestOutput
from .runner import ModelRunner
from .sampler import Sample, Sampler
from .sampling_params import SamplingParams
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .settings import EngineSettings
from .speculation import Speculation
from .stats import EngineStats
from .structured import Guidance


class Engine:
    def __init__(self, model, settings: EngineSettings = EngineSettings(), tokenizer=None):
        _check_hybrid(model, settings)
        self.model, self.settings, self.tokenizer = model, settings, tokenizer
        self.max_model_len = min(settings.max_model_len or model.config.context_length, model.config.context_length)
        self.vocab_size = model.config.vocab_size
        num_blocks = plan_num_blocks(model, settings, self.max_model_len)
        align = None
        if model.config.is_hybrid:  # a slot per running sequence, and the prefix cache's state snapshots
            self.blocks = StateBlockManager(num_blocks, settings.block_size, settings.max_num_seqs,
                                            settings.num_state_snapshots, settings.state_snapshot_interval)
            align = settings.state_snapshot_interval if settings.num_state_snapshots else None
        else:
            self.blocks = BlockManager(num_blocks, settings.block_size,
                                       settings.enable_prefix_caching and not settings.deterministic)
        self.speculation = Speculation(self.max_model_len, model)
        self.scheduler = Scheduler(self.blocks, settings.max_num_seqs, settings.max_prefill_tokens,
                                   model.eos_token_ids, self.max_model_len, settings.deterministic,
                                   propose=self.speculation.propose, max_rows=MAX_ROWS, align=align)
        # LoRA adapters served beside the base model, chosen per request (None: none can be loaded)
        self.adapters = AdapterSet(model, settings.max_loras, settings.max_lora_rank) if settings.max_loras else None
        # structured outputs and thinking budgets (grammars need the tokenizer's vocabulary)
        self.guidance = Guidance(tokenizer, self.vocab_size, model.eos_token_ids) if tokenizer is not None else None
        sampler = Sampler(guidance=self.guidance, batch_invariant=settings.deterministic)
        self.runner = ModelRunner(model, num_blocks, settings.block_size, sampler, adapters=self.adapters,
                                  deterministic=settings.deterministic,
                                  num_state_slots=state_slots(model, settings))
        if settings.speculative is not None and settings.speculative.method == "mtp":
            try:
                self.speculation.mtp_head()
            except RequestError as e:
                raise ConfigError(f"--speculative mtp: {e}") from None
        self.requests: dict[str, tuple[Sequence, IncrementalText | None]] = {}
        self.followers: dict[str, list[Sequence]] = {}  # request id -> requests waiting for its prompt's K/V
        self.stats = EngineStats(self.max_model_len)

    @property
    def num_context_tokens(self) -> int:
        """How many tokens of K/V the cache holds in all."""
        return self.blocks.num_blocks * self.blocks.block_size

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError if the request can never be served (safe to call from any thread)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty: at least one token is needed")
        # Lengths before the scan of every id: a prompt of millions of ids is refused at once.
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len}")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if any(not 0 <= t < self.vocab_size for t in (*params.logit_bias, *params.stop_token_ids)):
            raise RequestError(f"logit_bias and stop_token_ids keys must be token ids in [0, {self.vocab_size})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                               f"the context of {self.max_model_len} tokens")
        if self.blocks.blocks_for(len(prompt_ids) + params.max_tokens) > self.blocks.num_blocks:
            raise RequestError(f"prompt + max_tokens needs more than the {self.num_context_tokens} tokens of KV cache")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need an engine with a tokenizer")
        if params.structured is not None or params.thinking_budget is not None:
            if self.guidance is None:
                raise RequestError("structured outputs and thinking budgets need an engine with a tokenizer")
            self.guidance.check(params)  # compiles the grammar (cached): a 400 naming what is wrong
        if params.speculative is not None and not self._can_speculate():
            raise RequestError("speculative: not served with tensor parallelism or in deterministic mode")
        if params.speculative is not None and params.speculative.method == "mtp":
            self.speculation.mtp_head()  # RequestError naming the checkpoint when it has no MTP head

    def adapter(self, name: str) -> Adapter:
        """The loaded LoRA adapter called `name` (RequestError naming it when there is none)."""
        if self.adapters is None:
            raise RequestError(f"no LoRA adapter named {name!r}: this engine serves none (max_loras is 0)")
        return self.adapters.get(name)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None, after: str | None = None,
                    adapter: Adapter | str | None = None) -> str:
        """Queue a request; `arrival_time` (time.monotonic) is when a caller got it, for latency metrics.
        `after`: a running request with the same prompt, whose prompt K/V this one shares (it is
        scheduled once that prompt is computed; at once if the prefix cache is off). `adapter`: a
        LoRA adapter (or its name) its tokens run through."""
        adapter = self.adapter(adapter) if isinstance(adapter, str) else adapter
        params = self._with_default_speculation(params, adapter)
        self.validate(prompt_ids, params)
        seq = Sequence(prompt_ids, params, request_id, arrival_time)
        seq.adapter = adapter
        if params.speculative is not None and params.speculative.method == "mtp":
            seq.hidden = []  # the runner keeps the target's hidden states for its MTP proposer
        if seq.adapter is not None and params.speculative is not None:
            raise RequestError("speculative: not served with a LoRA adapter")
        if seq.request_id in self.requests:
            raise RequestError(f"request id {seq.request_id!r} is already in use")
        text = None
        if self.tokenizer is not None:
            text = IncrementalText(self.tokenizer.stream(params.skip_special_tokens), params.stop)
        leader = self.requests.get(after, (None,))[0] if after is not None else None
        if leader is not None and leader.token_ids[:leader.num_prompt_tokens] != seq.token_ids:
            raise RequestError(f"request {after!r} has another prompt: only samples of one prompt share it")
        self.requests[seq.request_id] = (seq, text)
        self.stats.on_add(seq)
        if leader is not None and self.blocks.enable_prefix_caching and not _prompt_computed(leader):
            self.followers.setdefault(leader.request_id, []).append(seq)
        else:
            self.scheduler.add(seq)
        return seq.request_id

    def _with_default_speculation(self, params: SamplingParams, adapter) -> SamplingParams:
        """params with the engine's default speculation where it asks for none and can take it."""
        default = self.settings.speculative
        if (default is None or params.speculative is not None or adapter is not None or params.structured is not None
                or params.thinking_budget is not None or not self._can_speculate()):
            return params
        return params.replace(speculative=default)

    def _can_speculate(self) -> bool:
        return self.runner.broadcast is None and not self.settings.deterministic

    def _release_followers(self, leader: Sequence) -> None:
        """Schedule the requests that waited for leader's prompt, once it is computed (or leader ended)."""
        if leader.request_id in self.followers and (leader.is_finished or _prompt_computed(leader)):
            for seq in self.followers.pop(leader.request_id):
                if not seq.is_finished:
                    self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks; its final output, or None if it is unknown or done."""
        entry = self.requests.get(request_id)
        if entry is None:
            return None
        self.scheduler.finish(entry[0], "abort")
        return self._finish(entry[0], RequestOutput(request_id))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        self.stats.on_step([c.seq for c in chunks], time.monotonic())
        self.runner.copy_states(self.blocks.take_copies())  # a hybrid's state snapshots, kept and restored
        samples, failures = self._run(chunks)
        for chunk, sample in zip(chunks, samples):
            if chunk.draft and sample is not None:
                kept = num_kept([s.token_id for s in sample], chunk.draft)
                self.stats.on_draft(len(chunk.draft), kept)
                self.speculation.saw(chunk.seq, len(chunk.draft), kept)
        self.scheduler.postprocess(chunks, [_token_ids(s) for s in samples])
        for chunk in chunks:
            self._release_followers(chunk.seq)
        now = time.monotonic()
        return failures + [self._output(c.seq, s, now) for c, s in zip(chunks, samples) if s is not None]

    def _output(self, seq: Sequence, sample, now: float) -> RequestOutput:
        """The news of a step's Sample (or, for a drafted chunk, its list of Samples kept)."""
        samples = sample if isinstance(sample, list) else [sample]
        out = RequestOutput(seq.request_id)
        text = self.requests[seq.request_id][1]
        for k, s in enumerate(samples):
            out.token_ids.append(s.token_id)
            self.stats.on_token(seq, now)
            if s.logprob is not None:
                out.logprobs.append((s.token_id, s.logprob, s.top_logprobs))
            if text is not None:
                out.text += text.push(s.token_id)
                if text.stopped and not seq.is_finished:
                    del seq.token_ids[len(seq) - (len(samples) - k - 1):]  # kept tokens after the stop string
                    self.scheduler.finish(seq, "stop")
                    break
        return self._finish(seq, out) if seq.is_finished else self._fill(seq, out)

    def _run(self, chunks: list[Chunk]) -> tuple[list[Sample | None], list[RequestOutput]]:
        """The runner's samples for the chunks, and the final outputs of requests that failed.

        When the batched call fails, each chunk runs alone and only a request that fails by
        itself is failed: one bad request must not take down the batch it shares. (Rerunning a
        chunk rewrites the same K/V; a row sampled before the failure is drawn again.)
        """
        try:
            return self.runner.step(chunks), []
        except Exception as e:
            if len(chunks) == 1:
                return [None], [self._fail(chunks[0].seq, e)]
        samples, failures = [], []
        for chunk in chunks:
            try:
                samples += self.runner.step([chunk])
            except Exception as e:
                samples.append(None)
                failures.append(self._fail(chunk.seq, e))
        return samples, failures

    def _fail(self, seq: Sequence, error: Exception) -> RequestOutput:
        """End a request whose step raised: aborted (counted as such, as /metrics always has), its
        blocks back in the pool, its output carrying the error."""
        self.scheduler.finish(seq, "abort")
        return self._finish(seq, RequestOutput(seq.request_id, error=error))

    def _finish(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        text = self.requests.pop(seq.request_id)[1]
        self._release_followers(seq)
        self.runner.sampler.release(seq)
        self.speculation.release(seq)
        if text is not None:
            out.text += text.finish()
        out.finished, out.finish_reason = True, seq.finish_reason
        self.stats.on_finish(seq, time.monotonic())
        return self._fill(seq, out)

    @staticmethod
    def _fill(seq: Sequence, out: RequestOutput) -> RequestOutput:
        out.num_prompt_tokens, out.num_output_tokens = seq.num_prompt_tokens, seq.num_output_tokens
        out.num_cached_tokens = seq.num_cached_tokens
        return out

    def metrics(self) -> dict[str, float]:
        """Counters and gauges for /metrics (plain numbers; reading them from another thread is safe)."""
        b = self.blocks
        return {**self.stats.values(), "waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "preemptions": self.scheduler.num_preemptions, "kv_blocks_total": b.num_blocks,
                "kv_blocks_used": b.num_used_blocks, "kv_blocks_free": b.num_free_blocks,
                "prefix_cache_queried_tokens": b.prefix_queried_tokens,
                "prefix_cache_hit_tokens": b.prefix_hit_tokens}

    def histograms(self) -> dict[str, tuple[tuple, list[int], float]]:
        """Request latency and size histograms: name -> (bounds, cumulative counts, sum)."""
        return self.stats.snapshot()


def _token_ids(sample):
    """What the scheduler records for a chunk: None, a token id, or (a drafted chunk) the ids kept."""
    if isinstance(sample, list):
        return [s.token_id for s in sample]
    return None if sample is None else sample.token_id


def _prompt_computed(seq: Sequence) -> bool:
    return seq.num_computed_tokens >= seq.num_prompt_tokens


def _check_hybrid(model, settings: EngineSettings) -> None:
    """ConfigError naming what the engine does not run on a hybrid model (Gated DeltaNet layers) yet."""
    if not model.config.is_hybrid:
        return
    unsupported = [(settings.deterministic, "deterministic mode (batch-invariant DeltaNet kernels)"),
                   (settings.max_loras > 0, "LoRA adapters (max_loras > 0)")]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"the batching engine does not run {what} on hybrid models "
                              f"({model.config.model_type}) yet")
    if settings.num_state_snapshots and settings.state_snapshot_interval % settings.block_size:
        raise ConfigError(f"state_snapshot_interval ({settings.state_snapshot_interval}) must be a multiple of "
                          f"block_size ({settings.block_size}): a hybrid's prefix hits end at whole blocks")
