"""The sampler on hand-made logits: each filter, penalty and logprob against what it must do."""

import math

import pytest
import torch

from qwenkit.engine.output import IncrementalText
from qwenkit.engine.sampler import Sampler
from qwenkit.engine.sampling_params import SamplingParams
from qwenkit.engine.sequence import Sequence
from qwenkit.errors import RequestError

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, -1.0, 2.9])


def draw(params: SamplingParams, n: int = 300, logits=LOGITS, prompt=(4,), output=()) -> list[int]:
    sampler = Sampler(seed=0)
    seq = Sequence(list(prompt), params)
    seq.token_ids += list(output)
    return [sampler(logits[None], [seq])[0].token_id for _ in range(n)]


def test_greedy_takes_argmax():
    assert set(draw(SamplingParams(temperature=0), n=3)) == {1}


def test_top_k_top_p_min_p_restrict_candidates():
    assert set(draw(SamplingParams(top_k=2))) == {1, 5}
    # probs ~ .40 .36 .15 ...: top_p 0.5 keeps the best two
    assert set(draw(SamplingParams(top_p=0.5))) == {1, 5}
    assert set(draw(SamplingParams(min_p=0.3))) == {1, 5, 2}
    assert set(draw(SamplingParams(temperature=1.0))) >= {0, 1, 2, 3, 5}


def test_low_temperature_is_nearly_greedy():
    assert draw(SamplingParams(temperature=0.01), n=50).count(1) >= 49


@pytest.mark.parametrize("tiny", [dict(temperature=1e-40), dict(temperature=9e-6), dict(top_p=1e-300),
                                  dict(top_p=1e-45), dict(temperature=1e-40, top_p=1e-300)])
def test_vanishing_temperature_or_top_p_is_greedy(tiny):
    # Dividing by 1e-40 overflows the logits and 1e-300 is 0 in float32: the draw used to land on
    # arbitrary tokens, often the least likely one. Both are the greedy choice instead.
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert set(draw(SamplingParams(**tiny), n=50, logits=logits)) == {int(logits.argmax())}


def test_top_k_beyond_the_vocabulary_is_off():
    assert draw(SamplingParams(top_k=10**30)) == draw(SamplingParams(top_k=len(LOGITS))) == draw(SamplingParams())


def test_penalties_and_logit_bias_change_the_argmax():
    greedy = SamplingParams(temperature=0)
    assert draw(greedy.replace(logit_bias={3: 10.0}), n=1) == [3]
    assert draw(greedy.replace(presence_penalty=0.2), n=1, output=[1]) == [5]
    assert draw(greedy.replace(frequency_penalty=0.1), n=1, output=[1]) == [1]
    assert draw(greedy.replace(frequency_penalty=0.1), n=1, output=[1, 1]) == [5]
    assert draw(greedy.replace(repetition_penalty=1.2), n=1, prompt=[1]) == [5]


def test_repetition_penalty_multiplies_negative_logits():
    logits = torch.tensor([-1.0, -1.1])
    assert draw(SamplingParams(temperature=0, repetition_penalty=1.2), n=1, logits=logits, prompt=[0]) == [1]


def test_logprobs_are_the_models_distribution():
    sampler = Sampler()
    seq = Sequence([0], SamplingParams(temperature=0, logprobs=2))
    s = sampler(LOGITS[None], [seq])[0]
    expected = LOGITS.log_softmax(-1)
    assert s.token_id == 1 and math.isclose(s.logprob, float(expected[1]), rel_tol=1e-6)
    assert [i for i, _ in s.top_logprobs] == [1, 5]


def test_seeded_draws_repeat():
    p = SamplingParams(temperature=1.0, seed=42)
    a, b = Sampler(), Sampler()
    seqs = [Sequence([0], p), Sequence([0], p)]
    assert [a(LOGITS[None], seqs[:1])[0].token_id for _ in range(20)] == \
           [b(LOGITS[None], seqs[1:])[0].token_id for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0),
                                 dict(logprobs=21), dict(presence_penalty=3), dict(stop=[1]), dict(stop=[""]),
                                 dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(top_p=float("nan")), dict(temperature="0.7"), dict(top_k=2.0),
                                 dict(seed=2**64), dict(seed="7")])
def test_invalid_params_are_request_errors(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_unseeded_draws_follow_torch_manual_seed():
    seq = Sequence([0], SamplingParams(temperature=1.0))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        sampler = Sampler()
        runs.append([sampler(LOGITS[None], [seq])[0].token_id for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_qwen_recommended_settings():
    p = SamplingParams.qwen_recommended(thinking=True, max_tokens=10)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 20, 10)


class Pieces:
    """A stream decoder over single-character tokens."""
    def push(self, token_id):
        return chr(token_id)

    def flush(self):
        return ""


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    text = IncrementalText(Pieces(), stop=("END",))
    pieces = [text.push(ord(c)) for c in "abcENxEND tail"]
    assert text.stopped and "".join(pieces) + text.finish() == "abcENx"
    assert "E" not in "".join(pieces[:3])


def test_candidates_shortlist_gives_the_full_sort_distribution():
    """Rows without top-k first look at a shortlist; where their filters cut inside it, the
    distribution is the one a sort of all V gives, and where they do not, all of V is used."""
    from qwenkit.engine.sampler import SHORTLIST, _filtered, candidates

    g = torch.Generator().manual_seed(0)
    V = 5000
    logits = torch.randn(6, V, generator=g) * 3
    logits[1] *= 0.01  # nearly flat: top_p 0.9 keeps far past the shortlist
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(top_p=0.9),
              SamplingParams(min_p=0.05), SamplingParams(top_k=20), SamplingParams(top_k=3000, top_p=0.95),
              SamplingParams(temperature=1.3, top_p=0.5)]

    def in_token_space(probs, order):
        return torch.zeros(len(order), V).scatter_(1, order, probs / probs.sum(-1, keepdim=True))

    for rows in ([0, 2, 3, 5], [0, 1], [4, 5], [1]):
        sub = [params[i] for i in rows]
        top_k = [p.top_k if p.top_k > 0 else V for p in sub]
        temps = torch.tensor([p.temperature for p in sub])[:, None]
        want = in_token_space(*_filtered(logits[rows] / temps, V, top_k, sub))
        got = in_token_space(*candidates(logits[rows], sub))
        assert torch.allclose(got, want, atol=1e-6), rows
    uncut = candidates(logits[:2], [SamplingParams(), SamplingParams(temperature=0.5)])
    assert uncut[0].shape == (2, V) and torch.allclose(uncut[0].sum(-1), torch.ones(2))
    assert SHORTLIST < V
