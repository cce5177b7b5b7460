"""The course models built from dlfast layers: each against its plain-PyTorch twin
(dlfast.nn.revert, same weights), and a few training steps that lower the loss."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import skip_reason, tol

import dlfast
from dlfast.models.cnn import CNNClassifier, SimpleResNet
from dlfast.models.gpt import GPT, get_batch
from dlfast.train import minibatches

pytestmark = pytest.mark.skipif(
    skip_reason("cpu", "cpu") is not None, reason="the C++ extension did not load"
)


def quadrant_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose label is the brightest quadrant (0-3): a task a CNN learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * half : (r + 1) * half, c * half : (c + 1) * half] += 1.0
    return x, labels


def assert_twin_matches(model: torch.nn.Module, inputs: tuple, loss_fn) -> None:
    """model on dlfast's C++ kernels and its reverted plain-PyTorch twin: same outputs and grads."""
    twin = dlfast.nn.revert(copy.deepcopy(model))
    fused = (
        dlfast.nn.Conv2dReLU,
        dlfast.nn.CausalSelfAttention,
        dlfast.nn.LayerNorm,
        dlfast.nn.MultiheadAttention,
    )
    assert not any(type(m) in fused for m in twin.modules())
    with dlfast.use_backend("cpu"):
        ours = loss_fn(model(*inputs))
        ours.backward()
    theirs = loss_fn(twin(*inputs))
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def train_steps(model, batches, loss_fn, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with dlfast.use_backend("cpu"):
        for step in range(steps):
            inputs, target = batches(step)
            loss = loss_fn(model(*inputs), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "make",
    [
        lambda: CNNClassifier(channels=(8, 16), image_size=8, num_classes=4),
        lambda: SimpleResNet(image_size=8, num_classes=4),
    ],
    ids=["cnn", "resnet"],
)
def test_conv_classifiers_match_their_twin_and_learn(make):
    torch.manual_seed(0)
    model = make().eval()  # no dropout: the twin comparison needs the same function
    x, y = quadrant_images(16, 8)
    assert_twin_matches(model, (x,), lambda logits: F.cross_entropy(logits, y))
    model.train()
    x, y = quadrant_images(256, 8, seed=1)
    losses = train_steps(
        model,
        minibatches((x,), y, 64),
        F.cross_entropy,
        steps=30,
        lr=3e-3,
    )
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_notes_cnn_shapes():
    assert CNNClassifier()(torch.randn(2, 1, 100, 100)).shape == (2, 1)  # Linear(1250, 1) as in the notes
    assert SimpleResNet().fc1.in_features == 9216


def test_gpt_matches_its_twin_learns_and_generates():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    data = torch.arange(600) % 11  # a periodic sequence: the next token is predictable
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(data, 16, 8, generator=g)
    assert_twin_matches(model, (x, y), lambda out: out[1])
    losses = train_steps(
        model,
        lambda s: (get_batch(data, 16, 16, generator=g), None),
        lambda out, _: out[1],
        steps=40,
        lr=3e-3,
    )
    assert losses[-1] < 0.5 * losses[0], losses
    with dlfast.use_backend("cpu"):
        out = model.eval().generate(torch.zeros(2, 1, dtype=torch.long), 20, top_k=3, generator=g)
    assert out.shape == (2, 21) and int(out.max()) < 11
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_mlp_language_model_starts_uniform_and_learns():
    from test_bigram_lm import generated_words

    from dlfast.models.mlp_lm import MLPLanguageModel, context_windows

    X, Y = context_windows(["ab"], 3)
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]] and Y.tolist() == [1, 2, 0]
    words = generated_words()
    torch.manual_seed(0)
    model = MLPLanguageModel()
    # The notes' initialisation: no character favoured at first, loss near -ln(1/27).
    assert model.nll(words) == pytest.approx(-torch.tensor(1 / 27).log().item(), abs=0.05)
    losses = model.fit(words, steps=400, generator=torch.Generator().manual_seed(0))
    assert model.nll(words) < 2.6 and sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert len(model.sample(3, generator=torch.Generator().manual_seed(0))) == 3


def test_mlp_language_model_learning_rate_search():
    from test_bigram_lm import generated_words

    from dlfast.models.mlp_lm import MLPLanguageModel

    torch.manual_seed(0)
    model = MLPLanguageModel()
    initial = copy.deepcopy(model.state_dict())
    exponents, losses = model.lr_search(generated_words(), n=100, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.tensor(exponents), torch.linspace(-3, 0, 100))
    assert len(losses) == 100 and all(0 < loss < 10 for loss in losses)
    # Rates of 10^-3 barely move the loss from -ln(1/27); by 10^-1 the steps have lowered it.
    assert sum(losses[60:80]) / 20 < sum(losses[:10]) / 10 - 0.2, losses
    for name, weight in model.state_dict().items():  # the search leaves the weights as they were
        torch.testing.assert_close(weight, initial[name], rtol=0, atol=0, msg=name)


def test_unet_matches_its_twin_and_learns_to_segment():
    from dlfast.data import shapes_with_masks
    from dlfast.models.unet import UNet, iou

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = UNet(in_channels=1, num_classes=2, channels=(8, 16, 32))
    x, masks = shapes_with_masks(4, 16, generator=g)
    assert model(x).shape == (4, 2, 16, 16)
    assert_twin_matches(model, (x,), lambda logits: F.cross_entropy(logits, masks))
    x, masks = shapes_with_masks(64, 16, generator=g)
    losses = train_steps(
        model,
        minibatches((x,), masks, 16),
        F.cross_entropy,
        steps=40,
        lr=1e-2,
    )
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    with torch.no_grad(), dlfast.use_backend("cpu"):
        assert iou(model(x).argmax(1) == 1, masks == 1) > 0.5
    assert iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 1.0


def _padded_sequences(n: int, max_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Token ids in [1, vocab) with 0-padding at the end of each row (every row keeps >= 2 tokens)."""
    ids = torch.randint(1, vocab, (n, max_len), generator=generator)
    lengths = torch.randint(2, max_len + 1, (n,), generator=generator)
    return ids.masked_fill(torch.arange(max_len) >= lengths.unsqueeze(1), 0)


def test_transformer_encoder_classifier_matches_its_twin_and_learns():
    from dlfast.models.transformer import EncoderClassifier

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = EncoderClassifier(12, 2, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0)
    idx = _padded_sequences(8, 10, 12, g)
    labels = (idx == 5).any(1).long()  # does token 5 occur (padding never counts)?
    assert_twin_matches(model.eval(), (idx,), lambda logits: F.cross_entropy(logits, labels))
    idx = _padded_sequences(256, 10, 12, g)
    labels = (idx == 5).any(1).long()
    losses = train_steps(
        model.train(),
        minibatches((idx,), labels, 32),
        F.cross_entropy,
        steps=60,
        lr=1e-3,
    )
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


def test_transformer_encoder_regressor_matches_its_twin_and_learns():
    from dlfast.models.transformer import EncoderClassifier, EncoderRegressor

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = EncoderRegressor(12, d_model=32, n_heads=4, n_layers=2, d_ff=64, dropout=0.0)
    # The same body as the classifier: only the head's width differs.
    classifier_keys = EncoderClassifier(12, 3, d_model=32, n_heads=4, n_layers=2, d_ff=64).state_dict()
    assert model.state_dict().keys() == classifier_keys.keys() and model.head.out_features == 1

    def share_of_fives(idx):  # (B, 1): the fraction of the real (non-0) tokens that are 5
        return (idx == 5).sum(1, keepdim=True) / (idx != 0).sum(1, keepdim=True)

    idx = _padded_sequences(8, 10, 12, g)
    assert model(idx).shape == (8, 1)
    assert_twin_matches(model.eval(), (idx,), lambda out: F.mse_loss(out, share_of_fives(idx)))
    idx = _padded_sequences(256, 10, 12, g)
    target = share_of_fives(idx)
    losses = train_steps(model.train(), minibatches((idx,), target, 32), F.mse_loss, steps=40, lr=1e-3)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8, losses
    # Better than the best constant (the target's variance): it counts the fives.
    assert sum(losses[-8:]) / 8 < 0.5 * target.var().item(), losses


def test_transformer_decoder_lm_and_encoder_decoder_match_their_twins_and_learn():
    from dlfast.models.transformer import DecoderLM, EncoderDecoder

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    small = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 64, "dropout": 0.0}
    lm = DecoderLM(11, **small)
    data = torch.arange(400) % 11
    x, y = get_batch(data, 12, 8, generator=g)
    assert_twin_matches(lm.eval(), (x,), lambda logits: F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    lm_loss = lambda logits, target: F.cross_entropy(logits.flatten(0, 1), target.flatten())  # noqa: E731

    def lm_batch(_step):
        x, y = get_batch(data, 12, 16, generator=g)
        return (x,), y

    losses = train_steps(lm.train(), lm_batch, lm_loss, steps=40, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses

    # Reverse a padded source: target = [BOS=1] + reversed tokens (ids 2..9), teacher forcing.
    seq2seq = EncoderDecoder(10, 10, **small)
    src = _padded_sequences(8, 6, 10, g).clamp_min(0)
    src = torch.where(src > 0, src.clamp_min(2), src)
    tgt_in = torch.cat([torch.ones(8, 1, dtype=torch.long), src.flip(1)[:, :-1]], dim=1)
    assert_twin_matches(seq2seq.eval(), (src, tgt_in), lambda logits: lm_loss(logits, src.flip(1)))
    src = _padded_sequences(128, 6, 10, g)
    src = torch.where(src > 0, src.clamp_min(2), src)
    tgt_in = torch.cat([torch.ones(128, 1, dtype=torch.long), src.flip(1)[:, :-1]], dim=1)
    losses = train_steps(
        seq2seq.train(), minibatches((src, tgt_in), src.flip(1), 32), lm_loss, steps=30, lr=3e-3
    )
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def _blob_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [0, 1] with one Gaussian blob each: structure an autoencoder can compress."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(n, 2, generator=generator) * size
    d2 = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    return torch.exp(-d2 / (2 * (size / 6) ** 2)).unsqueeze(1)


def test_autoencoders_learn_and_the_denoiser_matches_its_twin():
    from dlfast.models.autoencoder import VAE, Autoencoder, DenoisingAutoencoder, TinyAutoencoder

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    clean = _blob_images(64, 28, g)
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    denoiser = DenoisingAutoencoder()
    assert denoiser(noisy).shape == clean.shape
    assert_twin_matches(denoiser, (noisy[:8],), lambda out: F.mse_loss(out, clean[:8]))
    mse = lambda out, target: F.mse_loss(out, target)  # noqa: E731
    for model, data in ((denoiser, (noisy, clean)), (Autoencoder(), (clean, clean))):
        losses = train_steps(
            model,
            minibatches((data[0],), data[1], 16),
            mse,
            steps=30,
            lr=3e-3,
        )
        assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), (type(model).__name__, losses)
    vae = VAE()
    losses = train_steps(
        vae,
        minibatches((clean, g), clean, 16),
        lambda out, target: F.binary_cross_entropy(out[0], target, reduction="sum") + out[1],
        steps=30,
        lr=3e-3,
    )
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert vae.sample(4, generator=g).shape == (4, 1, 28, 28)
    tiny = TinyAutoencoder()
    points = torch.rand(64, 3, generator=g)
    losses = train_steps(tiny, lambda s: ((points,), points), mse, steps=200, lr=3e-2)
    assert losses[-1] < losses[0]


def test_7x7_denoiser_matches_its_twin_and_learns():
    from dlfast.models.autoencoder import DenoisingAutoencoder7x7

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # RGB blobs, each channel its own brightness: the notes' three-channel photos in miniature.
    clean = _blob_images(32, 16, g) * torch.rand(32, 3, 1, 1, generator=g)
    noisy = clean + 0.5 * torch.rand(clean.shape, generator=g)  # the notes' uniform noise
    denoiser = DenoisingAutoencoder7x7()
    assert denoiser.encoder(noisy).shape == (32, 2, 4, 4)  # two 7 x 7 convs: 16 -> 10 -> 4
    assert denoiser(noisy).shape == clean.shape
    assert_twin_matches(denoiser, (noisy[:8],), lambda out: F.mse_loss(out, clean[:8]))
    losses = train_steps(denoiser, minibatches((noisy,), clean, 16), F.mse_loss, steps=20, lr=1e-2)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


def test_basic_models_learn():
    from dlfast.data import c_shapes, semicircle
    from dlfast.models.basic import DeepNarrowTanh, GaussianBasisRegression, MLPClassifier

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = semicircle(generator=g)
    basis = GaussianBasisRegression()
    losses = train_steps(basis, lambda s: ((x,), y), F.mse_loss, steps=300, lr=0.05)
    assert losses[-1] < 0.01 < losses[0]
    points, labels = c_shapes(200, generator=g)
    narrow = DeepNarrowTanh()
    # The notes' network: seven Linear(2, 2) and nothing after them but the softmax.
    assert [tuple(p.shape) for p in narrow.parameters()] == [(2, 2), (2,)] * 7
    losses = train_steps(narrow, minibatches((points,), labels, 400), F.cross_entropy, steps=300, lr=0.02)
    assert losses[-1] < 0.6 * losses[0] and len(narrow.activations) == 8
    assert torch.equal(narrow(points), narrow.activations[-1])  # the last tanh layer gives the scores
    mlp = MLPClassifier(2, 2)
    losses = train_steps(mlp, minibatches((points,), labels, 100), F.cross_entropy, steps=100, lr=1e-2)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_recurrent_forecasters_learn(kind):
    from dlfast.data import noisy_seasonal_series
    from dlfast.models.rnn import SeqToVec, windows

    torch.manual_seed(0)
    X, y = windows(noisy_seasonal_series(generator=torch.Generator().manual_seed(0)), 20)
    assert X.shape == (580, 20, 1) and y.shape == (580,)
    losses = train_steps(SeqToVec(kind), minibatches((X,), y, 64), F.mse_loss, steps=60, lr=1e-2)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses


@pytest.mark.parametrize("kind", ["linear", "dcgan"])
def test_gans_train_adversarially(kind):
    from dlfast.models.gan import DCGANDiscriminator, DCGANGenerator, Discriminator, Generator, gan_step

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        gen, disc, z_shape = (
            Generator(z_dim=8, im_dim=64, hidden=16),
            Discriminator(im_dim=64, hidden=16),
            (32, 8),
        )
        real = _blob_images(32, 8, g).flatten(1)
    else:
        gen, disc = DCGANGenerator(z_dim=8, widths=(32, 16)), DCGANDiscriminator(widths=(16, 32))
        z_shape, real = (32, 8, 1, 1), _blob_images(32, 16, g) * 2 - 1
        assert gen(torch.randn(z_shape)).shape == real.shape
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.999))
    losses = [
        gan_step(gen, disc, real, torch.randn(z_shape, generator=g), opt_g, opt_d, kind == "dcgan")
        for _ in range(15)
    ]
    assert all(torch.isfinite(torch.tensor(pair)).all() for pair in losses)
    # The discriminator has learned something about real against generated images.
    assert losses[-1][0] < losses[0][0], losses


def test_multi_input_and_multi_output_models_learn():
    from dlfast.models.multi import TwoInputClassifier, TwoOutputClassifier, weighted_loss

    torch.manual_seed(0)
    images, quadrant = quadrant_images(128, 8, seed=2)
    alphabet = quadrant // 2  # two "alphabets" of two "characters" each
    one_hot = F.one_hot(alphabet, 2).float()
    two_in = TwoInputClassifier(num_alphabets=2, num_classes=4)
    assert_twin_matches(
        two_in, (images[:8], one_hot[:8]), lambda logits: F.cross_entropy(logits, quadrant[:8])
    )
    losses = train_steps(
        two_in, minibatches((images, one_hot), quadrant, 32), F.cross_entropy, steps=30, lr=3e-3
    )
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    two_out = TwoOutputClassifier(num_characters=4, num_alphabets=2)
    assert_twin_matches(
        two_out, (images[:8],), lambda outputs: weighted_loss(outputs, quadrant[:8], alphabet[:8])
    )
    targets = torch.stack([quadrant, alphabet], dim=1)
    losses = train_steps(
        two_out,
        minibatches((images,), targets, 32),
        lambda outputs, t: weighted_loss(outputs, t[:, 0], t[:, 1]),
        steps=30,
        lr=3e-3,
    )
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def test_detector_utilities_and_training():
    from dlfast.data import images_with_boxes
    from dlfast.models.detector import RegionDetector, box_iou, detection_loss, nms

    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 2, 2.1], [5, 5, 6, 6]], dtype=torch.float)
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(1 / 7)
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.5).tolist() == [0, 1, 3]
    torch.manual_seed(0)
    images, boxes, labels = images_with_boxes(128, generator=torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int64 and set(labels.tolist()) == {0, 1}
    detector = RegionDetector()
    assert_twin_matches(
        detector, (images[:8],), lambda out: detection_loss(out, labels[:8], boxes[:8], box_weight=10.0)
    )
    targets = torch.cat([boxes, labels.unsqueeze(1).float()], dim=1)
    losses = train_steps(
        detector,
        minibatches((images,), targets, 32),
        lambda out, t: detection_loss(out, t[:, 4].long(), t[:, :4], box_weight=10.0),
        steps=40,
        lr=3e-3,
    )
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    with torch.no_grad(), dlfast.use_backend("cpu"):
        class_logits, box_offsets = detector(images)
    # Both heads learned: filled from outlined rectangles, and where the rectangles are.
    assert (class_logits.argmax(1) == labels).float().mean() > 0.9
    assert box_iou(torch.sigmoid(box_offsets), boxes).diagonal().mean() > 0.5
