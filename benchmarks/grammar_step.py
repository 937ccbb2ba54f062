"""What a grammar costs a batch-8 decode step of the engine, on the default model (auto dtype).

Two engines on the one loaded model: one decodes 8 unconstrained rows, the other 8 rows held to
a JSON schema (a long array of objects, so no row can finish while it is timed). Their decode
steps alternate in the same run; the table gives the medians, the mask cost (constrained -
unconstrained step) and its share of the unconstrained step. The sampler's grammar part is also
timed on its own (its `_guide`: each row's llguidance mask, the bit unpack and the apply), as is
the rest of the sampler. On a busy host the step difference is mostly noise: the sampler
lines say what the grammar itself adds.

    python benchmarks/grammar_step.py [--steps 30] [--rows 8] [--temperature 0]
"""

import argparse
import statistics
import time

import torch

import qwenkit
from qwenkit.engine import EngineSettings
from qwenkit.engine.engine import Engine
from qwenkit.engine.sampling_params import SamplingParams, StructuredOutputs
from qwenkit.weights.hub import DEFAULT_MODEL, pull

SCHEMA = {"type": "object", "required": ["orders"], "properties": {"orders": {
    "type": "array", "minItems": 500, "items": {"type": "object", "required": ["item", "qty", "note"],
                                                 "properties": {"item": {"type": "string"},
                                                                "qty": {"type": "integer", "minimum": 1},
                                                                "note": {"type": "string"}}}}}}
PROMPT = "List the orders of the day as JSON: item, quantity and a note for each."


class Timed:
    """Wraps owner.name (a method, or a callable object) and records how long each call took."""

    def __init__(self, owner, name: str):
        self.inner, self.times = getattr(owner, name), []
        setattr(owner, name, self)

    def __getattr__(self, name):  # a wrapped object's other attributes (the sampler's release, ...)
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.times.append(time.perf_counter() - t)
        return out


def engine(model, tokenizer, rows: int, structured: StructuredOutputs | None, temperature: float) -> Engine:
    e = Engine(model, EngineSettings(num_blocks=64 * rows, block_size=16, enable_prefix_caching=False), tokenizer)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True)
    for i in range(rows):
        e.add_request(prompt, SamplingParams(max_tokens=4000, temperature=temperature, seed=i, structured=structured,
                                             ignore_eos=structured is None))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in e.scheduler.running + list(e.scheduler.waiting)):
        e.step()  # prefill (and the first tokens), untimed
    for _ in range(3):
        e.step()  # warm-up decode steps
    return e


def timed_step(e: Engine) -> float:
    t = time.perf_counter()
    outs = e.step()
    assert len(outs) == len(e.scheduler.running), "a row finished or waited: the batch is not whole"
    return time.perf_counter() - t


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy rows (the sampler's own sort aside)")
    args = ap.parse_args()
    path = pull(DEFAULT_MODEL, progress=False)
    model, tokenizer = qwenkit.load_model(path), qwenkit.load_tokenizer(path)
    plain = engine(model, tokenizer, args.rows, None, args.temperature)
    guided = engine(model, tokenizer, args.rows, StructuredOutputs(json=SCHEMA), args.temperature)
    guide = Timed(guided.runner.sampler, "_guide")
    sampled = {name: Timed(e.runner, "sampler") for name, e in (("plain", plain), ("guided", guided))}
    steps = {"plain": [], "guided": []}
    engines = {"plain": plain, "guided": guided}
    for i in range(args.steps):
        for name in ("plain", "guided") if i % 2 == 0 else ("guided", "plain"):  # neither always goes first
            steps[name].append(timed_step(engines[name]))
    p, g = statistics.median(steps["plain"]), statistics.median(steps["guided"])
    mask = statistics.median(guide.times[-args.steps:])
    sp, sg = (statistics.median(sampled[k].times[-args.steps:]) for k in ("plain", "guided"))
    print(f"{DEFAULT_MODEL}, {model.dtype}, batch {args.rows}, median of {args.steps} alternating decode steps, "
          f"{torch.get_num_threads()} threads")
    print(f"  unconstrained step      {ms(p)}")
    print(f"  json_schema step        {ms(g)}")
    print(f"  difference              {ms(g - p)}  ({100 * (g - p) / p:.1f}% of the unconstrained step)")
    print(f"  sampler, unconstrained  {ms(sp)}")
    print(f"  sampler, json_schema    {ms(sg)}  (+{ms(sg - sp).strip()}: {100 * (sg - sp) / p:.1f}% of the unconstrained step)")
    print(f"  of it, the grammar part {ms(mask)}  ({100 * mask / p:.1f}% of the unconstrained step)")
    text = tokenizer.decode(guided.scheduler.running[0].output_ids)
    print(f"  row 0 so far: {text[:100]!r}")


if __name__ == "__main__":
    main()
