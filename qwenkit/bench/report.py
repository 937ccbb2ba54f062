"""Bench results as a table with fractions of the physical bound and ratios against each peer."""

from __future__ import annotations

import json
import os
from pathlib import Path

def columns(batch: int) -> list[tuple[str, str]]:
    return [("prefill_tok_s", "prefill tok/s"), ("ttft_s", "TTFT s"), ("decode_b1_tok_s", "decode b1"),
            (f"decode_b{batch}_tok_s", f"decode b{batch}"), ("peak_rss_bytes", "peak RSS GB")]


def bounds(results: dict) -> dict:
    """Per qwenkit config: decode bound (bandwidth / bytes per token), prefill bound (GEMM / FLOPs)."""
    bw = min(results["probe_before"]["read_GBps"], results["probe_after"]["read_GBps"]) * 1e9
    out = {}
    for name, r in results["configs"].items():
        if "weight_bytes_per_token" in r:
            key = f"{prefill_gemm(name)}_gemm_GFLOPs"
            gemm = max(results["probe_before"][key], results["probe_after"][key]) * 1e9
            out[name] = {"decode_bound_tok_s": bw / r["weight_bytes_per_token"],
                         "prefill_bound_tok_s": gemm / r["prefill_flops_per_token"]}
    return out


def prefill_gemm(name: str) -> str:
    """The GEMM a qwenkit config's prefill runs, "bf16" or "fp32", whose probed peak bounds it:
    the model's dtype, except for weights kept quantized or in bf16 (`:int8`, `:auto`, ...),
    which meet the GEMM of the host's `PREFILL_DTYPE` (bf16 where the CPU has it natively)."""
    from ..backends.quant import PREFILL_DTYPE

    _, dtype, *quant = name.split(":")
    if quant or dtype == "auto":
        return "bf16" if PREFILL_DTYPE.itemsize == 2 else "fp32"
    return "fp32" if dtype == "float32" else "bf16"


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "peak_rss_bytes":
        return f"{value / 1e9:.2f}"
    return f"{value:.3f}" if key == "ttft_s" else f"{value:.1f}"


def render(results: dict) -> str:
    cols = columns(results.get("batch", 8))
    lines = [f"model: {results['model']}; host: {results.get('host', '?')}",
             "probe before: {read_GBps:.1f} GB/s read, GEMM {bf16_gemm_GFLOPs:.0f} GFLOP/s bf16, {fp32_gemm_GFLOPs:.0f} fp32, {threads} threads".format(**results["probe_before"]),
             "probe after:  {read_GBps:.1f} GB/s read, GEMM {bf16_gemm_GFLOPs:.0f} GFLOP/s bf16, {fp32_gemm_GFLOPs:.0f} fp32".format(**results["probe_after"]),
             "", "| config | " + " | ".join(h for _, h in cols) + " | decode b1 / bound | prefill / bound |",
             "|---" * (len(cols) + 3) + "|"]
    b = bounds(results)
    for name, r in results["configs"].items():
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error']} |")
            continue
        frac = b.get(name, {})
        d = f"{r['decode_b1_tok_s'] / frac['decode_bound_tok_s']:.0%}" if frac else "-"
        p = f"{r['prefill_tok_s'] / frac['prefill_bound_tok_s']:.0%}" if frac else "-"
        lines.append(f"| {name} | " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + f" | {d} | {p} |")
    lines += ["", ratios(results), "", default_ratios(results), "", agreement(results)]
    return "\n".join(lines)


def counterpart(name: str) -> str:
    """The qwenkit config holding the same weights in the same precision as config `name`: a
    peer's dtype; bf16 weights under fp32 arithmetic for llama.cpp's bf16 GGUF; int4 for the
    (4-bit) GGUF file as it is; a quantized qwenkit config against its unquantized dtype."""
    peer, dtype, *_ = name.split(":")
    if peer == "llama.cpp":
        return "qwenkit:float32:" + ("bf16" if dtype == "bf16" else "int4")
    return "qwenkit:" + dtype


def agreement(results: dict) -> str:
    """Whether each config's batch-1 greedy tokens equal its qwenkit counterpart's."""
    ok = {n: r for n, r in results["configs"].items() if "error" not in r and "greedy_tokens" in r}
    lines = ["greedy tokens (batch 1) against qwenkit on the same weights:"]
    for name, r in ok.items():
        ref_name = counterpart(name)
        ref = ok.get(ref_name)
        if ref is None or name == ref_name:
            continue
        same = next((i for i, (a, b) in enumerate(zip(r["greedy_tokens"], ref["greedy_tokens"])) if a != b), None)
        verdict = f"all {len(r['greedy_tokens'])} equal" if same is None else f"first differs at token {same}"
        lines.append(f"  {name:24s} vs {ref_name}: {verdict}")
    return "\n".join(lines)


def default_ratios(results: dict) -> str:
    """The default configuration (`qwenkit:auto`, what `--dtype auto` loads) against transformers
    in bf16: the figures the defaults are held to."""
    ok = {n: r for n, r in results["configs"].items() if "error" not in r}
    auto, peer = ok.get("qwenkit:auto"), ok.get("transformers:bfloat16")
    if auto is None or peer is None:
        return "(qwenkit:auto or transformers:bfloat16 did not run: no default-configuration ratios)"
    keys = ["prefill_tok_s", "decode_b1_tok_s", f"decode_b{results.get('batch', 8)}_tok_s"]
    return "default configuration (qwenkit:auto) / transformers:bfloat16: " + ", ".join(
        f"{k.removesuffix('_tok_s').replace('_', ' ')} {auto[k] / peer[k]:.2f}x" for k in keys)


def ratios(results: dict) -> str:
    """qwenkit's best config in each column divided by each peer's value (>1: qwenkit ahead)."""
    ok = {n: r for n, r in results["configs"].items() if "error" not in r}
    ours = {n: r for n, r in ok.items() if n.startswith("qwenkit:")}
    peers = {n: r for n, r in ok.items() if not n.startswith("qwenkit:")}
    if not ours or not peers:
        return "(no peer ran: no ratios)"
    lines = ["ratios, qwenkit on the peer's weights in its precision (and the best qwenkit config) / peer; "
             ">1: qwenkit ahead"]
    for key, label in columns(results.get("batch", 8))[:4]:
        lower_better = key == "ttft_s"
        pick = min if lower_better else max
        best = pick(ours.values(), key=lambda r: r[key])
        f = (lambda a, b: b / a) if lower_better else (lambda a, b: a / b)
        for pname, pr in peers.items():
            same = ours.get(counterpart(pname))
            base = f"{f(same[key], pr[key]):.2f}x ({counterpart(pname).removeprefix('qwenkit:')})" if same else "-"
            lines.append(f"  {label:14s} vs {pname:24s} like for like {base:>22s}   best {f(best[key], pr[key]):.2f}x")
    return "\n".join(lines)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "bounds": bounds(results)}
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "bench.json")
    try:
        _plot(results, out / "bench.png")
    except ImportError:
        pass  # matplotlib is optional (the eval/train extras bring it)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: r for n, r in results["configs"].items() if "error" not in r}
    keys = ["prefill_tok_s", "decode_b1_tok_s", f"decode_b{results.get('batch', 8)}_tok_s"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key in zip(axes, keys):
        ax.barh(list(ok), [r[key] for r in ok.values()], color=["C0" if n.startswith("qwenkit") else "C1" for n in ok])
        ax.set_title(key.replace("_", " "))
    fig.suptitle(f"{results['model']}: tokens/s (blue: qwenkit)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
