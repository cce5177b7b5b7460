"""`python -m dlfast train <model>`: short training recipes on real data."""

from __future__ import annotations

import argparse

import torch

RECIPES = (
    "bigram",
    "mlp_lm",
    "gpt",
    "cnn",
    "resnet",
    "autoencoder",
    "vae",
    "denoise",
    "unet",
    "detector",
    "rnn",
    "basis",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=RECIPES, help="the recipe to run")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument(
        "--seed", type=int, default=2147483647, help="seed of the samples and the initialisation"
    )
    parser.add_argument("--samples", type=int, default=20, help="how many samples to print")
    parser.add_argument("--device", default="cpu", help="where to train (cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    recipes = {
        "bigram": _bigram,
        "mlp_lm": _mlp_lm,
        "gpt": _gpt,
        "cnn": _digits_classifier,
        "resnet": _digits_classifier,
        "autoencoder": _digits_autoencoder,
        "vae": _digits_autoencoder,
        "denoise": _digits_autoencoder,
        "unet": _unet,
        "detector": _detector,
        "rnn": _rnn,
        "basis": _basis,
    }
    return recipes[args.model](args)


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


def minibatches(inputs: tuple, target: torch.Tensor, size: int, device: str | torch.device | None = None):
    """batches(step) -> (inputs, target): the step-th of the consecutive `size`-row slices of the
    tensors in inputs and of target, cycling, moved to device; non-tensor inputs pass as they are."""
    rows = len(target)

    def batch(step: int):
        i = step * size % rows

        def pick(t):
            return t[i : i + size].to(device) if isinstance(t, torch.Tensor) else t

        return tuple(pick(t) for t in inputs), pick(target)

    return batch


def _fit(model, batches, loss_fn, steps: int, lr: float, desc: str) -> list[float]:
    """Adam over `steps` batches(step) -> (inputs tuple, target), with a progress bar."""
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


def _unet(args: argparse.Namespace) -> int:
    """U-Net on generated shapes with masks: mean IoU of the shape class on held-out images."""
    import torch.nn.functional as F

    from dlfast.models.unet import UNet, iou, shapes_with_masks

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, masks = shapes_with_masks(512, 32, generator=g)
    test_x, test_masks = shapes_with_masks(64, 32, generator=g)
    model = UNet(in_channels=1, num_classes=2, channels=(16, 32, 64)).to(args.device)
    batch = minibatches((x,), masks, 32, args.device)
    _fit(model, batch, F.cross_entropy, args.steps or 300, 3e-3, "unet")
    with torch.no_grad():
        pred = model.eval()(test_x.to(args.device)).argmax(1).cpu()
    scores = [iou(p == 1, m == 1) for p, m in zip(pred, test_masks, strict=True)]
    print(f"held-out mean IoU {sum(scores) / len(scores):.3f}")
    return 0


def _detector(args: argparse.Namespace) -> int:
    """Region detector's box head on generated boxes: mean IoU of predicted and true boxes."""
    import torch.nn.functional as F

    from dlfast.models.detector import RegionDetector, box_iou, images_with_boxes

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, boxes = images_with_boxes(1024, generator=g)
    test_x, test_boxes = images_with_boxes(128, generator=g)
    model = RegionDetector().to(args.device)
    batch = minibatches((x,), boxes, 64, args.device)
    _fit(
        model, batch, lambda out, t: F.mse_loss(torch.sigmoid(out[1]), t), args.steps or 400, 3e-3, "detector"
    )
    with torch.no_grad():
        pred = torch.sigmoid(model.eval()(test_x.to(args.device))[1]).cpu()
    print(f"held-out mean box IoU {box_iou(pred, test_boxes).diagonal().mean():.3f}")
    return 0


def _rnn(args: argparse.Namespace) -> int:
    """RNN, LSTM and GRU forecasters on a noisy seasonal series: held-out MSE of each."""
    import torch.nn.functional as F

    from dlfast.models.rnn import SeqToVec, noisy_seasonal_series, windows

    torch.manual_seed(args.seed)
    X, y = windows(noisy_seasonal_series(1200, generator=torch.Generator().manual_seed(args.seed)), 30)
    cut = int(0.8 * len(X))
    for kind in ("rnn", "lstm", "gru"):
        model = SeqToVec(kind).to(args.device)
        batch = minibatches((X[:cut],), y[:cut], 64, args.device)
        _fit(model, batch, F.mse_loss, args.steps or 300, 1e-2, kind)
        with torch.no_grad():
            mse = F.mse_loss(model.eval()(X[cut:].to(args.device)).cpu(), y[cut:])
        print(f"{kind}: held-out MSE {mse:.4f}")
    return 0


def _basis(args: argparse.Namespace) -> int:
    """Gaussian basis-function regression of the semicircle: the fitted curve's MSE."""
    import torch.nn.functional as F

    from dlfast.models.basic import GaussianBasisRegression, semicircle

    torch.manual_seed(args.seed)
    x, y = semicircle(generator=torch.Generator().manual_seed(args.seed))
    model = GaussianBasisRegression()
    losses = _fit(model, lambda s: ((x,), y), F.mse_loss, args.steps or 500, 0.05, "basis")
    print(f"MSE {losses[0]:.4f} -> {losses[-1]:.5f}")
    return 0


def _digits_classifier(args: argparse.Namespace) -> int:
    """The notes' CNN or small ResNet on scikit-learn's 8 x 8 digits: held-out accuracy."""
    import torch.nn.functional as F

    from dlfast.data import digits
    from dlfast.models.cnn import CNNClassifier, SimpleResNet

    images, labels = digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    torch.manual_seed(args.seed)
    if args.model == "cnn":
        model = CNNClassifier(channels=(16, 32), image_size=8, num_classes=10)
    else:
        model = SimpleResNet(image_size=8, num_classes=10)
    model = model.to(args.device)
    _fit(
        model,
        minibatches((images[train],), labels[train], 64, args.device),
        F.cross_entropy,
        args.steps or 300,
        3e-3,
        args.model,
    )
    with torch.no_grad():
        predicted = model.eval()(images[test].to(args.device)).argmax(1).cpu()
    print(f"held-out accuracy {(predicted == labels[test]).float().mean():.3f} on {len(test)} digits")
    return 0


def _digits_autoencoder(args: argparse.Namespace) -> int:
    """The MLP autoencoder, the VAE (8 x 8 digits, 2-D latent) or the convolutional denoiser
    (digits upsampled to its 28 x 28, Gaussian noise 0.3) on scikit-learn's digits: held-out
    reconstruction MSE against the clean images."""
    import torch.nn.functional as F

    from dlfast.data import digits
    from dlfast.models.autoencoder import VAE, Autoencoder, DenoisingAutoencoder

    images, _labels = digits()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    if args.model == "denoise":
        images = F.interpolate(images, size=28, mode="bilinear", align_corners=False)
    order = torch.randperm(len(images), generator=g)
    cut = int(0.8 * len(images))
    clean = {"train": images[order[:cut]], "test": images[order[cut:]]}
    noisy = {k: (v + 0.3 * torch.randn(v.shape, generator=g)).clamp(0, 1) for k, v in clean.items()}
    inputs = noisy if args.model == "denoise" else clean
    model = {
        "autoencoder": lambda: Autoencoder(s_img=8),
        "vae": lambda: VAE(s_img=8),
        "denoise": DenoisingAutoencoder,
    }[args.model]().to(args.device)

    def loss_fn(out, target):
        if args.model == "vae":  # the notes' loss: reconstruction (summed BCE) + KL
            return F.binary_cross_entropy(out[0], target, reduction="sum") + out[1]
        return F.mse_loss(out, target)

    batches = minibatches((inputs["train"],), clean["train"], 64, args.device)
    _fit(model, batches, loss_fn, args.steps or 1000, 3e-3, args.model)
    with torch.no_grad():
        out = model.eval()(inputs["test"].to(args.device))
        reconstruction = (out[0] if args.model == "vae" else out).cpu()
    mse = F.mse_loss(reconstruction, clean["test"])
    line = f"held-out reconstruction MSE {mse:.4f}"
    if args.model == "denoise":
        line += f" (the noisy input's: {F.mse_loss(inputs['test'], clean['test']):.4f})"
    print(line)
    return 0
