"""`python -m dlfast train <model>`: short training recipes on real data."""

from __future__ import annotations

import argparse

import torch

RECIPES = ("bigram",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=RECIPES, help="the recipe to run")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the neural model")
    parser.add_argument(
        "--seed", type=int, default=2147483647, help="seed of the samples and the initialisation"
    )
    parser.add_argument("--samples", type=int, default=20, help="how many samples to print")


def run(args: argparse.Namespace) -> int:
    return {"bigram": _bigram}[args.model](args)


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
    neural.fit(words, steps=args.steps, progress=True)
    print(f"neural bigram model after {args.steps} steps: NLL {neural.nll(words):.4f} per bigram")
    samples = neural.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    return 0
