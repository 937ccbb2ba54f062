"""vLLM's CPU build timed like every other peer. Runs inside vLLM's own virtualenv (it pins its
own transformers), so it imports nothing from qwenkit: `python vllm_runner.py SPEC.json`.

The spec carries the HF-format directory (the same weights as the other peers), the dtype and
the exact prompt ids. vLLM's offline API has no separate prefill and decode calls, so:
prefill/TTFT is a generate() of one token; decode time is a generate() of 1 + N tokens minus
that prefill time (prefix caching off, so every repeat prefills again).
"""

import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: its peak RSS is the peer's


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) * 1024


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch

    torch.set_num_threads(spec["threads"])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["hf_dir"], dtype=spec["dtype"], skip_tokenizer_init=True, enable_prefix_caching=False,
              max_model_len=spec["prompt_len"] + spec["new_tokens"] + 16, max_num_seqs=max(8, spec["batch"]),
              seed=0)
    load_s = time.perf_counter() - t0
    one = [TokensPrompt(prompt_token_ids=p) for p in spec["one"]]
    many = [TokensPrompt(prompt_token_ids=p) for p in spec["many"]]

    def timed(prompts, n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, outs

    new, repeats = spec["new_tokens"], spec["repeats"]
    timed(one, 1)  # warm-up
    prefill = [timed(one, 1)[0] for _ in range(repeats)]
    p1 = statistics.median(prefill)
    full1 = [timed(one, new + 1) for _ in range(repeats)]
    p8 = statistics.median(timed(many, 1)[0] for _ in range(max(1, repeats - 1)))
    full8 = [timed(many, new + 1)[0] for _ in range(max(1, repeats - 1))]
    result = {
        "load_s": load_s,
        "prefill_tok_s": spec["prompt_len"] / p1,
        "ttft_s": p1,
        "decode_b1_tok_s": new / (statistics.median(t for t, _ in full1) - p1),
        f"decode_b{spec['batch']}_tok_s": spec["batch"] * new / (statistics.median(full8) - p8),
        "greedy_tokens": list(full1[0][1][0].outputs[0].token_ids[:16]),
        "samples": {"prefill_s": prefill, "decode_b1_total_s": [t for t, _ in full1], "decode_bN_total_s": full8},
        "peak_rss_bytes": _peak_rss_bytes(),
        "version": __import__("vllm").__version__,
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
