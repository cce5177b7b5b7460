"""`python -m dlfast train <model>`: short training recipes on real data."""

from __future__ import annotations

import argparse

import torch

RECIPES = ("bigram", "mlp_lm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=RECIPES, help="the recipe to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument(
        "--seed", type=int, default=2147483647, help="seed of the samples and the initialisation"
    )
    parser.add_argument("--samples", type=int, default=20, help="how many samples to print")


def run(args: argparse.Namespace) -> int:
    return {"bigram": _bigram, "mlp_lm": _mlp_lm}[args.model](args)


def _bigram(args: argparse.Namespace) -> int:
    from dlfast.data import names
    from dlfast.models.bigram import CountingBigramLM, NeuralBigramLM

    words = names()
    counting = CountingBigramLM(smoothing=1.0).fit(words)
    print(
        f"{len(words)} names; counting bigram model (+1 smoothing): NLL {counting.nll(words):.4f} per bigram"
    )
    samples = counting.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    neural = NeuralBigramLM(generator=torch.Generator().manual_seed(args.seed))
    steps = args.steps or 200
    neural.fit(words, steps=steps, progress=True)
    print(f"neural bigram model after {steps} steps: NLL {neural.nll(words):.4f} per bigram")
    samples = neural.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    return 0


def _mlp_lm(args: argparse.Namespace) -> int:
    """Bengio et al.'s MLP language model on the names: 90% to train, 10% held out."""
    from dlfast.data import names
    from dlfast.models.mlp_lm import MLPLanguageModel

    words = names()
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(args.seed))
    cut = int(0.9 * len(words))
    train, held_out = [words[i] for i in order[:cut]], [words[i] for i in order[cut:]]
    torch.manual_seed(args.seed)
    model = MLPLanguageModel()
    print(f"initial NLL {model.nll(train):.4f} (uniform: 3.2958)")
    model.fit(
        train, steps=args.steps or 20000, generator=torch.Generator().manual_seed(args.seed), progress=True
    )
    print(f"NLL per character: train {model.nll(train):.4f}, held out {model.nll(held_out):.4f}")
    print(
        "samples:", " ".join(model.sample(args.samples, generator=torch.Generator().manual_seed(args.seed)))
    )
    return 0
