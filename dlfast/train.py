"""`python -m dlfast train <model>`: short training recipes on real data.

Each recipe trains with a progress bar, prints the metric the course notes use, and writes a
loss curve (loss.png) and, where the notes show one, a picture or samples into --out/<model>/.
Defaults finish in minutes on 2 CPU cores; --device cuda and --steps scale them up. The GPT
recipe also runs under `torchrun --nproc_per_node=N` with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from dlfast import plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=RECIPES, help="the recipe to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument(
        "--seed", type=int, default=2147483647, help="seed of the samples and the initialisation"
    )
    parser.add_argument("--samples", type=int, default=20, help="how many samples to print")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")
    parser.add_argument(
        "--lr-search",
        type=int,
        nargs="?",
        const=1000,
        default=None,
        metavar="N",
        help="mlp_lm: first run the notes' learning-rate search, N rates from 10^-3 to 10^0 "
        "(default 1000), and draw its loss against the exponent (lr_search.png)",
    )
    parser.add_argument(
        "--out", default="runs", help="folder for the loss curve and pictures (default: runs/<model>/)"
    )


def run(args: argparse.Namespace) -> int:
    return RECIPES[args.model](args)


def _path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) / args.model / name


def _write_text(args: argparse.Namespace, name: str, text: str) -> None:
    path = _path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"wrote {path}")


def minibatches(inputs: tuple, target: torch.Tensor, size: int, device: str | torch.device | None = None):
    """batches(step) -> (inputs, target): the step-th of the consecutive `size`-row slices of the
    tensors in inputs and of target, cycling, moved to device; non-tensor inputs pass as they are.
    The rows after the last whole slice are left out (a batch of one row would break BatchNorm)."""
    whole = max(1, len(target) // size)

    def batch(step: int):
        i = step % whole * size

        def pick(t):
            return t[i : i + size].to(device) if isinstance(t, torch.Tensor) else t

        return tuple(pick(t) for t in inputs), pick(target)

    return batch


def _fit(model, batches, loss_fn, steps: int, lr: float, desc: str) -> list[float]:
    """Adam over `steps` batches(step) -> (inputs tuple, target), with a progress bar; returns the
    loss per step."""
    from tqdm import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in tqdm(range(steps), desc=desc, unit="step"):
        inputs, target = batches(step)
        loss = loss_fn(model(*inputs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _split(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """A seeded random permutation of range(n) cut into consecutive parts of the given fractions
    (the last part takes the rest)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts = [int(sum(fractions[: i + 1]) * n) for i in range(len(fractions) - 1)]
    return list(torch.tensor_split(order, cuts))


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1).cpu() == labels.cpu()).float().mean())


# ---------------------------------------------------------------------------------------------
# Language models: names and Shakespeare


def _bigram(args: argparse.Namespace) -> int:
    """The counting bigram model (+1 smoothing) and the neural one on first names: NLL per
    bigram, samples, and the neural model's loss against the counting model's NLL."""
    from dlfast.data import names
    from dlfast.models.bigram import CountingBigramLM, NeuralBigramLM

    words = names()
    counting = CountingBigramLM(smoothing=1.0).fit(words, device=args.device)
    counting_nll = counting.nll(words)
    print(f"{len(words)} names; counting bigram model (+1 smoothing): NLL {counting_nll:.4f} per bigram")
    samples = counting.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    neural = NeuralBigramLM(generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    steps = args.steps or 200
    losses = neural.fit(words, steps=steps, progress=True)
    print(f"neural bigram model after {steps} steps: NLL {neural.nll(words):.4f} per bigram")
    neural_samples = neural.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(neural_samples))
    plots.lines(
        _path(args, "loss.png"),
        {"neural bigram (with L2 penalty)": losses, "counting model NLL": [counting_nll] * len(losses)},
        ylabel="NLL per bigram",
    )
    _write_text(args, "samples.txt", "\n".join(["# counting", *samples, "# neural", *neural_samples]))
    return 0


def _mlp_lm(args: argparse.Namespace) -> int:
    """Bengio et al.'s MLP language model on the names: 90% to train, 10% held out. With
    --lr-search, the notes' learning-rate search first (the weights restored after it)."""
    from dlfast.data import names
    from dlfast.models.mlp_lm import MLPLanguageModel

    words = names()
    train_idx, held_out_idx = _split(len(words), (0.9, 0.1), args.seed)
    train, held_out = [words[i] for i in train_idx], [words[i] for i in held_out_idx]
    torch.manual_seed(args.seed)
    model = MLPLanguageModel().to(args.device)
    print(f"initial NLL {model.nll(train):.4f} (uniform: 3.2958)")
    if args.lr_search:
        exponents, search_losses = model.lr_search(
            train, n=args.lr_search, generator=torch.Generator().manual_seed(args.seed), progress=True
        )
        # The minibatch losses are noisy: the lowest of their running mean over ~1/20 of the rates.
        window = max(1, len(search_losses) // 20)
        smoothed = torch.tensor(search_losses).unfold(0, window, 1).mean(1)
        best = exponents[int(smoothed.argmin()) + window // 2]
        print(f"learning-rate search: lowest loss near lr 10^{best:.2f} = {10**best:.3g} (training uses 0.1)")
        plots.lines(
            _path(args, "lr_search.png"),
            {"minibatch loss": (exponents, search_losses)},
            xlabel="learning-rate exponent (lr = 10^x)",
            ylabel="NLL per character",
        )
    losses = model.fit(
        train, steps=args.steps or 20000, generator=torch.Generator().manual_seed(args.seed), progress=True
    )
    print(f"NLL per character: train {model.nll(train):.4f}, held out {model.nll(held_out):.4f}")
    samples = model.sample(args.samples, generator=torch.Generator().manual_seed(args.seed))
    print("samples:", " ".join(samples))
    plots.lines(_path(args, "loss.png"), {"minibatch loss": losses}, ylabel="NLL per character", log=True)
    _write_text(args, "samples.txt", "\n".join(samples))
    return 0


def train_gpt(
    model,
    data: torch.Tensor,
    steps: int,
    block_size: int,
    batch_size: int,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """AdamW over `steps` batches of random block_size windows of the token stream `data`;
    returns the loss per step.

    Inside an initialised torch.distributed process group (torchrun) the model trains under
    DistributedDataParallel: each rank draws its own batches (give each its own generator), the
    gradients are averaged across ranks, and every rank ends with the same weights, those of one
    model trained on world_size x batch_size windows a step."""
    from tqdm import tqdm

    from dlfast.models.gpt import get_batch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    net = model
    if distributed:
        device_ids = [torch.device(device)] if torch.device(device).type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    show = progress and (not distributed or torch.distributed.get_rank() == 0)
    losses = []
    for _ in tqdm(range(steps), desc="gpt", unit="step", disable=not show):
        x, y = (t.to(device) for t in get_batch(data, block_size, batch_size, generator))
        _, loss = net(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _join_torchrun(device: str) -> tuple[int, str]:
    """(rank, device): under torchrun (WORLD_SIZE > 1) joins the process group, NCCL for CUDA
    and gloo for the CPU, and gives each rank its own GPU; else (0, device) unchanged."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, device
    cuda = torch.device(device).type == "cuda"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return torch.distributed.get_rank(), device


def _gpt(args: argparse.Namespace) -> int:
    """The character GPT on Shakespeare, a CPU-sized model by default (--device cuda and --steps
    for the notes' 384-wide, 6-layer one: construct GPT() with its defaults). Under
    `torchrun --nproc_per_node=N -m dlfast train gpt` it trains with DistributedDataParallel."""
    from dlfast.data import shakespeare
    from dlfast.models.gpt import GPT, get_batch

    rank, device = _join_torchrun(args.device)
    text = shakespeare()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    g = torch.Generator().manual_seed(args.seed + rank)  # but each rank its own batches
    block_size, batch_size = 64, 32
    model = GPT(len(chars), block_size=block_size, n_embd=128, n_head=4, n_layer=4, dropout=0.1).to(device)

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = [
            model(*(t.to(device) for t in get_batch(val, block_size, batch_size, g)))[1] for _ in range(10)
        ]
        model.train()
        return float(torch.stack(losses).mean())

    say = print if rank == 0 else lambda *a, **k: None
    say(f"{len(text)} characters, vocabulary {len(chars)}; initial val loss {val_loss():.3f}")
    losses = train_gpt(model, train, args.steps or 1000, block_size, batch_size, generator=g, device=device)
    say(f"val loss {val_loss():.3f} (cross-entropy per character)")
    if rank == 0:
        start = torch.zeros(1, 1, dtype=torch.long, device=device)
        sample = model.eval().generate(
            start, 300, top_k=10, generator=torch.Generator(device).manual_seed(args.seed)
        )
        sample_text = "".join(chars[i] for i in sample[0].tolist())
        print(sample_text)
        plots.lines(_path(args, "loss.png"), {"train loss": losses}, ylabel="cross-entropy per character")
        _write_text(args, "sample.txt", sample_text)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------
# Small models: regression, narrow and tabular classifiers, recurrent forecasters


def _basis(args: argparse.Namespace) -> int:
    """Gaussian basis-function regression of the semicircle: the fitted curve's MSE."""
    from dlfast.data import semicircle
    from dlfast.models.basic import GaussianBasisRegression

    torch.manual_seed(args.seed)
    x, y = (t.to(args.device) for t in semicircle(generator=torch.Generator().manual_seed(args.seed)))
    model = GaussianBasisRegression().to(args.device)
    losses = _fit(model, lambda s: ((x,), y), F.mse_loss, args.steps or 500, 0.05, "basis")
    print(f"MSE {losses[0]:.4f} -> {losses[-1]:.5f}")
    plots.lines(_path(args, "loss.png"), {"MSE": losses}, log=True)
    grid = torch.linspace(-1, 1, 200, device=args.device)
    with torch.no_grad():
        x, y, grid, fitted = (t.cpu() for t in (x, y, grid, model(grid)))
    plots.lines(_path(args, "fit.png"), {"data": (x, y), "fitted": (grid, fitted)}, xlabel="x", ylabel="y")
    return 0


def _narrow(args: argparse.Namespace) -> int:
    """The deep narrow tanh network (7 x Linear(2, 2) + tanh) on two interlocking C shapes:
    accuracy, and a picture of what each layer makes of the points."""
    from dlfast.data import c_shapes
    from dlfast.models.basic import DeepNarrowTanh

    torch.manual_seed(args.seed)
    points, labels = (
        t.to(args.device) for t in c_shapes(500, generator=torch.Generator().manual_seed(args.seed))
    )
    model = DeepNarrowTanh().to(args.device)
    losses = _fit(model, lambda s: ((points,), labels), F.cross_entropy, args.steps or 2000, 5e-3, "narrow")
    with torch.no_grad():
        logits = model(points)
    print(f"training accuracy {_accuracy(logits, labels):.3f} on {len(labels)} points")
    plots.lines(_path(args, "loss.png"), {"cross-entropy": losses})
    layers = {"input" if i == 0 else f"layer {i}": a.cpu() for i, a in enumerate(model.activations)}
    plots.point_clouds(_path(args, "layers.png"), layers, labels.cpu())
    return 0


def fit_early_stopping(
    model, train: tuple, val: tuple, steps: int, lr: float, weight_decay: float, patience: int, desc: str
) -> tuple[dict[str, list[float]], int]:
    """Full-batch AdamW (weight decay) on train = (x, y) with cross-entropy, the validation loss
    checked every step: stops after `patience` steps without a new best and restores the best
    weights. Returns ({"train": losses, "validation": losses}, the best step)."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    curves: dict[str, list[float]] = {"train": [], "validation": []}
    best, best_step, best_state = float("inf"), 0, None
    for step in tqdm(range(steps), desc=desc, unit="step"):
        model.train()
        loss = F.cross_entropy(model(train[0]), train[1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(val[0]), val[1]).item()
        curves["train"].append(loss.item())
        curves["validation"].append(val_loss)
        if val_loss < best:
            best, best_step, best_state = val_loss, step, copy.deepcopy(model.state_dict())
        elif step - best_step >= patience:
            break
    model.load_state_dict(best_state)
    return curves, best_step


def _mlp(args: argparse.Namespace) -> int:
    """MLP classifiers (ReLU, dropout 0.2, weight decay, early stopping) on scikit-learn's iris,
    wine and breast cancer sets: 60% train, 20% validation (early stopping), 20% test accuracy."""
    from dlfast.data import TABULAR, tabular
    from dlfast.models.basic import MLPClassifier

    curves = {}
    for name in TABULAR:
        x, y = tabular(name)
        train, val, test = _split(len(y), (0.6, 0.2, 0.2), args.seed)
        mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)  # train statistics only
        x = ((x - mean) / std).to(args.device)
        y = y.to(args.device)
        torch.manual_seed(args.seed)
        model = MLPClassifier(x.shape[1], int(y.max()) + 1).to(args.device)
        split_curves, best = fit_early_stopping(
            model, (x[train], y[train]), (x[val], y[val]), args.steps or 500, 3e-3, 1e-2, 30, name
        )
        with torch.no_grad():
            accuracy = _accuracy(model.eval()(x[test]), y[test])
        print(f"{name}: best validation loss at step {best + 1}; test accuracy {accuracy:.3f} on {len(test)}")
        curves.update({f"{name} {split}": values for split, values in split_curves.items()})
    plots.lines(_path(args, "loss.png"), curves, ylabel="cross-entropy", log=True)
    return 0


def _rnn(args: argparse.Namespace) -> int:
    """RNN, LSTM and GRU forecasters of next year's sunspot number from the 20 years before
    (NOAA's yearly series, 1700-2008, from statsmodels): held-out MSE of each on the last 20% of
    the years, against the naive forecast (this year's value)."""
    from dlfast.data import sunspots
    from dlfast.models.rnn import SeqToVec, windows

    years, series = sunspots()
    scale = series.max()
    X, y = windows(series / scale, 20)  # values in [0, 1]
    cut = int(0.8 * len(X))
    naive = F.mse_loss(X[cut:, -1, 0], y[cut:]) * scale**2
    print(f"{len(series)} years ({years[0]}-{years[-1]}); naive forecast held-out MSE {naive:.1f}")
    curves, predictions = {}, {"observed": (years[20 + cut :], series[20 + cut :])}
    for kind in ("rnn", "lstm", "gru"):
        torch.manual_seed(args.seed)
        model = SeqToVec(kind).to(args.device)
        batch = minibatches((X[:cut],), y[:cut], 32, args.device)
        curves[kind] = _fit(model, batch, F.mse_loss, args.steps or 600, 1e-2, kind)
        with torch.no_grad():
            predicted = model.eval()(X[cut:].to(args.device)).cpu() * scale
        print(f"{kind}: held-out MSE {F.mse_loss(predicted, y[cut:] * scale):.1f}")
        predictions[kind] = (years[20 + cut :], predicted)
    plots.lines(_path(args, "loss.png"), curves, ylabel="MSE (scaled series)", log=True)
    plots.lines(_path(args, "forecast.png"), predictions, xlabel="year", ylabel="sunspot number")
    return 0


# ---------------------------------------------------------------------------------------------
# Vision: scikit-learn's 8 x 8 digits and generated shapes


def _digits_split(args: argparse.Namespace):
    """The digits and a seeded 80/20 train/test split of their indices."""
    from dlfast.data import digits

    images, labels = digits()
    train, test = _split(len(labels), (0.8, 0.2), args.seed)
    return images, labels, train, test


def _digits_classifier(args: argparse.Namespace) -> int:
    """The notes' CNN or small ResNet on scikit-learn's 8 x 8 digits: held-out accuracy."""
    from dlfast.models.cnn import CNNClassifier, SimpleResNet

    images, labels, train, test = _digits_split(args)
    torch.manual_seed(args.seed)
    if args.model == "cnn":
        model = CNNClassifier(channels=(16, 32), image_size=8, num_classes=10)
    else:
        model = SimpleResNet(image_size=8, num_classes=10)
    model = model.to(args.device)
    batches = minibatches((images[train],), labels[train], 64, args.device)
    losses = _fit(model, batches, F.cross_entropy, args.steps or 300, 3e-3, args.model)
    with torch.no_grad():
        accuracy = _accuracy(model.eval()(images[test].to(args.device)), labels[test])
    print(f"held-out accuracy {accuracy:.3f} on {len(test)} digits")
    plots.lines(_path(args, "loss.png"), {"cross-entropy": losses})
    return 0


def _multi(args: argparse.Namespace) -> int:
    """Multi-input and multi-output classifiers on the digits, with derived labels in the roles
    of the notes' characters and alphabets: the digit is the character, and whether it is below
    5 its alphabet. Two inputs: the image and the one-hot alphabet -> the character. Two outputs:
    the image -> character and alphabet, trained on the weighted sum of the two losses."""
    from dlfast.models.multi import TwoInputClassifier, TwoOutputClassifier, weighted_loss

    images, characters, train, test = _digits_split(args)
    alphabets = (characters >= 5).long()
    one_hot = F.one_hot(alphabets, 2).float()
    steps = args.steps or 300
    torch.manual_seed(args.seed)
    two_in = TwoInputClassifier(num_alphabets=2, num_classes=10).to(args.device)
    batches = minibatches((images[train], one_hot[train]), characters[train], 64, args.device)
    curves = {"two inputs": _fit(two_in, batches, F.cross_entropy, steps, 3e-3, "two inputs")}
    torch.manual_seed(args.seed)
    two_out = TwoOutputClassifier(num_characters=10, num_alphabets=2).to(args.device)
    targets = torch.stack([characters, alphabets], dim=1)
    batches = minibatches((images[train],), targets[train], 64, args.device)
    curves["two outputs (weighted)"] = _fit(
        two_out, batches, lambda out, t: weighted_loss(out, t[:, 0], t[:, 1]), steps, 3e-3, "two outputs"
    )
    x = images[test].to(args.device)
    with torch.no_grad():
        two_in_accuracy = _accuracy(two_in.eval()(x, one_hot[test].to(args.device)), characters[test])
        character_logits, alphabet_logits = two_out.eval()(x)
    print(f"two inputs: held-out character accuracy {two_in_accuracy:.3f}")
    print(
        f"two outputs: held-out character accuracy {_accuracy(character_logits, characters[test]):.3f}, "
        f"alphabet accuracy {_accuracy(alphabet_logits, alphabets[test]):.3f}"
    )
    plots.lines(_path(args, "loss.png"), curves)
    return 0


def _digits_autoencoder(args: argparse.Namespace) -> int:
    """The MLP autoencoder, the VAE (8 x 8 digits, 2-D latent) or a convolutional denoiser (004's,
    "denoise", or 000's 7 x 7 one, "denoise7x7"; digits upsampled to 28 x 28, Gaussian noise 0.3)
    on scikit-learn's digits: held-out reconstruction MSE against the clean images, and a picture
    of the reconstructions (and of samples from the VAE's prior)."""
    from dlfast.models.autoencoder import VAE, Autoencoder, DenoisingAutoencoder, DenoisingAutoencoder7x7

    images, _labels, train, test = _digits_split(args)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    denoising = args.model in ("denoise", "denoise7x7")
    if denoising:  # 004's denoiser is built for 28 x 28, and 000's two 7 x 7 convs need 13 x 13
        images = F.interpolate(images, size=28, mode="bilinear", align_corners=False)
    clean = {"train": images[train], "test": images[test]}
    noisy = {k: (v + 0.3 * torch.randn(v.shape, generator=g)).clamp(0, 1) for k, v in clean.items()}
    inputs = noisy if denoising else clean
    model = {
        "autoencoder": lambda: Autoencoder(s_img=8),
        "vae": lambda: VAE(s_img=8),
        "denoise": DenoisingAutoencoder,
        "denoise7x7": lambda: DenoisingAutoencoder7x7(in_channels=1),  # the digits are grey
    }[args.model]().to(args.device)

    def loss_fn(out, target):
        if args.model == "vae":  # the notes' loss: reconstruction (summed BCE) + KL
            return F.binary_cross_entropy(out[0], target, reduction="sum") + out[1]
        return F.mse_loss(out, target)

    batches = minibatches((inputs["train"],), clean["train"], 64, args.device)
    losses = _fit(model, batches, loss_fn, args.steps or 1000, 3e-3, args.model)
    with torch.no_grad():
        out = model.eval()(inputs["test"].to(args.device))
        reconstruction = (out[0] if args.model == "vae" else out).cpu()
    mse = F.mse_loss(reconstruction, clean["test"])
    line = f"held-out reconstruction MSE {mse:.4f}"
    pictures = {"original": clean["test"][:16]}
    if denoising:
        line += f" (the noisy input's: {F.mse_loss(inputs['test'], clean['test']):.4f})"
        pictures["noisy"] = inputs["test"][:16]
    print(line)
    pictures["reconstructed"] = reconstruction[:16]
    if args.model == "vae":
        pictures["sampled from N(0, I)"] = model.sample(32, generator=g)
    plots.lines(_path(args, "loss.png"), {"loss": losses}, log=True)
    plots.image_grid(_path(args, "reconstructions.png"), pictures)
    return 0


def _gan(args: argparse.Namespace) -> int:
    """The linear GAN (8 x 8 digits, Sigmoid output) or the DCGAN (digits upsampled to 32 x 32
    in [-1, 1]) with Adam(lr 2e-4, betas 0.5, 0.999) and binary cross-entropy:
    the discriminator's mean outputs on real and generated images, and a grid of samples."""
    from dlfast.models.gan import (
        DCGANDiscriminator,
        DCGANGenerator,
        Discriminator,
        Generator,
        gan_step,
    )

    images, _labels, train, _test = _digits_split(args)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    dcgan = args.model == "dcgan"
    if dcgan:
        real = F.interpolate(images[train], size=32, mode="bilinear", align_corners=False) * 2 - 1
        gen, disc = DCGANGenerator(), DCGANDiscriminator()  # both N(0, 0.02)-initialised
        z_shape, lr = (100, 1, 1), 2e-4
    else:
        real = images[train].flatten(1)
        gen, disc = Generator(z_dim=16, im_dim=64), Discriminator(im_dim=64)
        z_shape, lr = (16,), 1e-3
    gen, disc = gen.to(args.device), disc.to(args.device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    batches = minibatches((), real, 64, args.device)
    from tqdm import tqdm

    curves: dict[str, list[float]] = {"discriminator": [], "generator": []}
    for step in tqdm(range(args.steps or (600 if dcgan else 2000)), desc=args.model, unit="step"):
        _, batch = batches(step)
        z = torch.randn(len(batch), *z_shape, generator=g).to(args.device)
        d_loss, g_loss = gan_step(gen, disc, batch, z, opt_g, opt_d, probabilities=dcgan)
        curves["discriminator"].append(d_loss)
        curves["generator"].append(g_loss)
    with torch.no_grad():  # in training mode, as the losses above were: BatchNorm on batch statistics
        fake = gen(torch.randn(64, *z_shape, generator=g).to(args.device))
        d_real, d_fake = disc(real[:256].to(args.device)), disc(fake)
        if not dcgan:  # the linear discriminator gives logits
            d_real, d_fake = torch.sigmoid(d_real), torch.sigmoid(d_fake)
    print(
        f"discriminator loss {curves['discriminator'][-1]:.3f}, "
        f"generator loss {curves['generator'][-1]:.3f}; "
        f"D(real) {d_real.mean():.3f}, D(generated) {d_fake.mean():.3f}"
    )
    fake = fake.cpu().view(-1, 1, *(real.shape[-2:] if dcgan else (8, 8)))
    plots.lines(_path(args, "loss.png"), curves, ylabel="binary cross-entropy")
    plots.image_grid(_path(args, "samples.png"), {"generated": (fake + 1) / 2 if dcgan else fake}, columns=16)
    return 0


def _unet(args: argparse.Namespace) -> int:
    """U-Net on generated shapes with masks: mean IoU of the shape class on held-out images, and a
    picture of images, true and predicted masks."""
    from dlfast.data import shapes_with_masks
    from dlfast.models.unet import UNet, iou

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, masks = shapes_with_masks(512, 32, generator=g)
    test_x, test_masks = shapes_with_masks(64, 32, generator=g)
    model = UNet(in_channels=1, num_classes=2, channels=(16, 32, 64)).to(args.device)
    batch = minibatches((x,), masks, 32, args.device)
    losses = _fit(model, batch, F.cross_entropy, args.steps or 300, 3e-3, "unet")
    with torch.no_grad():
        pred = model.eval()(test_x.to(args.device)).argmax(1).cpu()
    scores = [iou(p == 1, m == 1) for p, m in zip(pred, test_masks, strict=True)]
    print(f"held-out mean IoU {sum(scores) / len(scores):.3f}")
    plots.lines(_path(args, "loss.png"), {"cross-entropy": losses})
    low, high = test_x[:12].amin(), test_x[:12].amax()
    plots.image_grid(
        _path(args, "masks.png"),
        {"image": (test_x[:12] - low) / (high - low), "true mask": test_masks[:12], "predicted": pred[:12]},
    )
    return 0


def _detector(args: argparse.Namespace) -> int:
    """The region detector on generated boxes, filled or outlined (the class), both heads trained
    on the notes' summed loss: held-out classification accuracy and mean IoU of the predicted
    and true boxes."""
    from dlfast.data import images_with_boxes
    from dlfast.models.detector import RegionDetector, box_iou, detection_loss

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, boxes, labels = images_with_boxes(1024, generator=g)
    test_x, test_boxes, test_labels = images_with_boxes(128, generator=g)
    model = RegionDetector(num_classes=2).to(args.device)
    targets = torch.cat([boxes, labels.unsqueeze(1).float()], dim=1)  # minibatches takes one target
    batch = minibatches((x,), targets, 64, args.device)
    # Box coordinates in [0, 1] make an MSE some 10x smaller than the cross-entropy: unweighted,
    # the shared backbone serves the (easy) classes first, and the boxes lose IoU 0.80 -> 0.75.
    losses = _fit(
        model,
        batch,
        lambda out, t: detection_loss(out, t[:, 4].long(), t[:, :4], box_weight=10.0),
        args.steps or 400,
        3e-3,
        "detector",
    )
    with torch.no_grad():
        class_logits, box_offsets = (t.cpu() for t in model.eval()(test_x.to(args.device)))
    iou = box_iou(torch.sigmoid(box_offsets), test_boxes).diagonal().mean()
    print(
        f"held-out classification accuracy {_accuracy(class_logits, test_labels):.3f} "
        f"(filled or outlined), mean box IoU {iou:.3f}"
    )
    plots.lines(_path(args, "loss.png"), {"cross-entropy + box MSE": losses}, log=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The Transformer family of week 10 on synthetic sequence tasks

PAD, BOS, SEP, FIRST_SYMBOL, VOCAB = 0, 1, 2, 3, 12  # symbols 3..11


def _symbols(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(FIRST_SYMBOL, VOCAB, (n, length), generator=g)


def _padded(n: int, max_len: int, g: torch.Generator) -> torch.Tensor:
    """Rows of 2..max_len symbols, PAD after them."""
    lengths = torch.randint(2, max_len + 1, (n, 1), generator=g)
    return _symbols(n, max_len, g).masked_fill(torch.arange(max_len) >= lengths, PAD)


def _reverse_padded(src: torch.Tensor) -> torch.Tensor:
    """Each row's symbols in reverse order, PAD still at the end."""
    lengths = (src != PAD).sum(1, keepdim=True)
    index = (lengths - 1 - torch.arange(src.shape[1])).clamp_min(0)
    return src.gather(1, index).masked_fill(torch.arange(src.shape[1]) >= lengths, PAD)


@torch.no_grad()
def greedy_decode(model, src: torch.Tensor, length: int) -> torch.Tensor:
    """The encoder-decoder's greedy output: `length` tokens after BOS, each the argmax given the
    source and the tokens so far."""
    out = torch.full((len(src), 1), BOS, dtype=torch.long, device=src.device)
    for _ in range(length):
        out = torch.cat([out, model(src, out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out[:, 1:]


def _transformer(args: argparse.Namespace) -> int:
    """The three Transformers of week 10 (post-LN, sinusoidal positions, dropout 0.1), small:
    encoder-only with the classification head (are there more 3s than 4s in a padded sequence?)
    and with the regression head (what share of its symbols are 3s?), a decoder-only language
    model that learns to copy (BOS a SEP a), and an encoder-decoder that reverses a padded
    sequence, decoded greedily. Held-out accuracy of each (MSE of the regressor)."""
    from dlfast.models.transformer import DecoderLM, EncoderClassifier, EncoderDecoder, EncoderRegressor

    g = torch.Generator().manual_seed(args.seed)
    small = {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128, "dropout": 0.1}
    steps, device = args.steps or 1000, args.device
    lm_loss = lambda logits, target: F.cross_entropy(logits.flatten(0, 1), target.flatten())  # noqa: E731
    curves = {}

    def classify_data(n):
        x = _padded(n, 16, g)
        return x, ((x == 3).sum(1) > (x == 4).sum(1)).long()

    torch.manual_seed(args.seed)
    classifier = EncoderClassifier(VOCAB, 2, pad_idx=PAD, **small).to(device)
    x, y = classify_data(4096)
    curves["encoder classifier"] = _fit(
        classifier, minibatches((x,), y, 64, device), F.cross_entropy, steps, 1e-3, "encoder"
    )
    x, y = classify_data(512)
    with torch.no_grad():
        print(f"encoder classifier: held-out accuracy {_accuracy(classifier.eval()(x.to(device)), y):.3f}")

    def copy_data(n):
        a = _symbols(n, 8, g)
        seq = torch.cat([torch.full((n, 1), BOS), a, torch.full((n, 1), SEP), a], dim=1)
        return seq[:, :-1], seq[:, 1:]

    torch.manual_seed(args.seed)
    decoder = DecoderLM(VOCAB, **small).to(device)
    x, y = copy_data(4096)
    curves["decoder (copy)"] = _fit(
        decoder, minibatches((x,), y, 64, device), lm_loss, steps, 1e-3, "decoder"
    )
    x, y = copy_data(512)
    with torch.no_grad():
        copied = decoder.eval()(x.to(device))[:, 9:]  # the predictions after SEP
    print(f"decoder-only: held-out accuracy of the copied half {_accuracy(copied, y[:, 9:]):.3f}")

    def reverse_data(n):
        src = _padded(n, 10, g)
        tgt = _reverse_padded(src)
        return src, torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], dim=1), tgt

    torch.manual_seed(args.seed)
    seq2seq = EncoderDecoder(VOCAB, VOCAB, pad_idx=PAD, **small).to(device)
    src, tgt_in, tgt = reverse_data(4096)
    curves["encoder-decoder (reverse)"] = _fit(
        seq2seq, minibatches((src, tgt_in), tgt, 64, device), lm_loss, steps, 1e-3, "encoder-decoder"
    )
    src, _, tgt = reverse_data(512)
    decoded = greedy_decode(seq2seq.eval(), src.to(device), tgt.shape[1]).cpu()
    real = tgt != PAD
    exact = ((decoded == tgt) | ~real).all(1).float().mean()
    tokens = (decoded == tgt)[real].float().mean()
    print(
        f"encoder-decoder: held-out greedy reversal, token accuracy {tokens:.3f}, exact sequences {exact:.3f}"
    )

    def regress_data(n):
        x = _padded(n, 16, g)
        return x, (x == 3).sum(1, keepdim=True) / (x != PAD).sum(1, keepdim=True)

    torch.manual_seed(args.seed)
    regressor = EncoderRegressor(VOCAB, 1, pad_idx=PAD, **small).to(device)
    x, y = regress_data(4096)
    curves["encoder regressor"] = _fit(
        regressor, minibatches((x,), y, 64, device), F.mse_loss, steps, 1e-3, "encoder regressor"
    )
    x, y = regress_data(512)
    with torch.no_grad():
        mse = F.mse_loss(regressor.eval()(x.to(device)).cpu(), y)
    print(f"encoder regressor: held-out MSE {mse:.5f} (the best constant's: {y.var():.5f})")
    plots.lines(_path(args, "loss.png"), curves, ylabel="cross-entropy (the regressor: MSE)", log=True)
    return 0


RECIPES = {
    "bigram": _bigram,
    "mlp_lm": _mlp_lm,
    "gpt": _gpt,
    "basis": _basis,
    "narrow": _narrow,
    "mlp": _mlp,
    "rnn": _rnn,
    "cnn": _digits_classifier,
    "resnet": _digits_classifier,
    "multi": _multi,
    "autoencoder": _digits_autoencoder,
    "vae": _digits_autoencoder,
    "denoise": _digits_autoencoder,
    "denoise7x7": _digits_autoencoder,
    "gan": _gan,
    "dcgan": _gan,
    "unet": _unet,
    "detector": _detector,
    "transformer": _transformer,
}
