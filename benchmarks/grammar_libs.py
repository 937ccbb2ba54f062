"""xgrammar against llguidance on the default model's tokenizer, same run: what chose the library.

For each library: the tokenizer set-up, the compile time of a few JSON schemas (and the regex
and any-JSON grammars), and the time to fill the token masks of 8 rows at once and apply them
to (8, V) logits, along a valid document (medians over its tokens).

    python benchmarks/grammar_libs.py [--rows 8]
"""

import argparse
import json
import statistics
import time

import torch

import qwenkit
from qwenkit.weights.hub import DEFAULT_MODEL, pull

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
               "required": ["name", "age"], "additionalProperties": False},
    "invoice": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "date": {"type": "string", "format": "date"},
        "lines": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "item": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number"}},
            "required": ["item", "qty", "price"]}},
        "status": {"enum": ["open", "paid", "void"]}}, "required": ["id", "lines", "status"]},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "label": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["label"]}}, "$ref": "#/$defs/node"},
}
DOC = {"id": "INV-0042", "date": "2024-05-01", "lines": [{"item": "apples", "qty": 3, "price": 1.25},
       {"item": "pears, ripe", "qty": 12, "price": 0.5}], "status": "paid"}
REGEX = r"\d{3}-\d{4} [A-Z][a-z]+"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab_size):
        import xgrammar as xgr
        self.xgr = xgr
        vocab = [""] * vocab_size
        for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
            vocab[i] = text
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                                      stop_token_ids=tok.eos_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, kind, spec):
        c = self.compiler
        return {"schema": lambda: c.compile_json_schema(json.dumps(spec)), "regex": lambda: c.compile_regex(spec),
                "any_json": c.compile_builtin_json_grammar}[kind]()

    def matchers(self, compiled, n):
        return [self.xgr.GrammarMatcher(compiled) for _ in range(n)]

    def mask_step(self, matchers, bitmask, logits):
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def bitmask(self, n):
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def accept(self, m, token):
        assert m.accept_token(token)


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab_size):
        import llguidance
        import llguidance.torch as lt
        self.llg, self.lt = llguidance, lt
        self.tokenizer = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab_size, eos_token=tok.eos_token_ids)
        self.executor = llguidance.LLExecutor()
        self.vocab_size = vocab_size

    def compile(self, kind, spec):
        M = self.llg.LLMatcher
        grammar = {"schema": lambda: M.grammar_from_json_schema(spec), "regex": lambda: M.grammar_from_regex(spec),
                   "any_json": lambda: M.grammar_from_json_schema({"type": "object"})}[kind]()
        m = M(self.tokenizer, grammar)  # llguidance compiles lazily: the first mask completes the work
        assert not m.is_error(), m.get_error()
        mask = self.bitmask(1)
        self.lt.fill_next_token_bitmask(m, mask, 0)
        return grammar

    def matchers(self, grammar, n):
        return [self.llg.LLMatcher(self.tokenizer, grammar) for _ in range(n)]

    def mask_step(self, matchers, bitmask, logits):
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        self.lt.apply_token_bitmask_inplace(logits, bitmask)

    def bitmask(self, n):
        return self.lt.allocate_token_bitmask(n, self.vocab_size)

    def accept(self, m, token):
        assert m.consume_token(token), m.get_error()


def run(lib, tok, rows: int) -> dict:
    out = {}
    for name, schema in SCHEMAS.items():
        t = time.perf_counter()
        lib.compile("schema", schema)
        out[f"compile {name}"] = time.perf_counter() - t
    for kind, spec in (("regex", REGEX), ("any_json", None)):
        t = time.perf_counter()
        lib.compile(kind, spec)
        out[f"compile {kind}"] = time.perf_counter() - t
    compiled = lib.compile("schema", SCHEMAS["invoice"])
    matchers = lib.matchers(compiled, rows)
    tokens = tok.encode(json.dumps(DOC))
    bitmask, logits = lib.bitmask(rows), torch.randn(rows, lib.vocab_size)
    times = []
    for token in tokens:
        t = time.perf_counter()
        lib.mask_step(matchers, bitmask, logits)
        times.append(time.perf_counter() - t)
        for m in matchers:
            lib.accept(m, token)
    out[f"mask+apply, {rows} rows, median over {len(tokens)} tokens"] = statistics.median(times)
    out["... max"] = max(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = qwenkit.load_tokenizer(pull(DEFAULT_MODEL, progress=False))
    vocab_size = tok.vocab_size
    for cls in (Xgrammar, Llguidance):
        t = time.perf_counter()
        lib = cls(tok, vocab_size)
        setup = time.perf_counter() - t
        print(f"{cls.name}: tokenizer set-up {ms(setup)}")
        for key, value in run(lib, tok, args.rows).items():
            print(f"  {key}: {ms(value)}")


if __name__ == "__main__":
    main()
