"""`python -m dlfast train <model>`: short training recipes on real data."""

from __future__ import annotations

import argparse

import torch

RECIPES = ("bigram", "mlp_lm", "gpt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=RECIPES, help="the recipe to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument(
        "--seed", type=int, default=2147483647, help="seed of the samples and the initialisation"
    )
    parser.add_argument("--samples", type=int, default=20, help="how many samples to print")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    return {"bigram": _bigram, "mlp_lm": _mlp_lm, "gpt": _gpt}[args.model](args)


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


def _gpt(args: argparse.Namespace) -> int:
    """The character GPT on Shakespeare, a CPU-sized model by default (--device cuda and --steps
    for the notes' 384-wide, 6-layer one: construct GPT() with its defaults)."""
    from tqdm import tqdm

    from dlfast.data import shakespeare
    from dlfast.models.gpt import GPT, get_batch

    text = shakespeare()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    block_size, batch_size = 64, 32
    model = GPT(len(chars), block_size=block_size, n_embd=128, n_head=4, n_layer=4, dropout=0.1).to(
        args.device
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = [
            model(*(t.to(args.device) for t in get_batch(val, block_size, batch_size, g)))[1]
            for _ in range(10)
        ]
        model.train()
        return float(torch.stack(losses).mean())

    print(f"{len(text)} characters, vocabulary {len(chars)}; initial val loss {val_loss():.3f}")
    for _ in tqdm(range(args.steps or 1000), desc="gpt", unit="step"):
        x, y = (t.to(args.device) for t in get_batch(train, block_size, batch_size, g))
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"val loss {val_loss():.3f} (cross-entropy per character)")
    start = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    sample = model.eval().generate(
        start, 300, top_k=10, generator=torch.Generator(args.device).manual_seed(args.seed)
    )
    print("".join(chars[i] for i in sample[0].tolist()))
    return 0
