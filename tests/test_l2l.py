"""learn2learn interoperability: our episodes as learn2learn task sets, and back.

Skipped when learn2learn is not installed (``make install-l2l``); CI installs it.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

l2l = pytest.importorskip("learn2learn")

from metalearn.data.datamodule import EpisodicDataModule, with_rotations  # noqa: E402
from metalearn.data.episodes import EpisodeSampler  # noqa: E402
from metalearn.data.l2l import (  # noqa: E402
    L2LDataModule,
    L2LEpisodes,
    L2LEpisodeSource,
    Learn2LearnNotInstalled,
    as_l2l_taskset,
    episode_to_task,
    l2l_tasksets,
    require_learn2learn,
    split_task,
    tasks_to_batch,
)
from metalearn.data.sets.omniglot import OmniglotCharacters  # noqa: E402
from metalearn.errors import ConfigError  # noqa: E402
from metalearn.lightning import HyperRepresentation  # noqa: E402

SIZE = 8
TINY_BACKBONE = {
    "_target_": "metalearn.models.ConvBackbone",
    "channels": 8,
    "depth": 2,
    "image_size": SIZE,
}


def class_images(classes: int, per_class: int, seed: int = 0) -> Tensor:
    """uint8 (classes, per_class, 1, SIZE, SIZE): a pattern per class plus noise per image."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(classes, 1, 1, SIZE, SIZE, generator=g)
    noise = 0.3 * torch.rand(classes, per_class, 1, SIZE, SIZE, generator=g)
    return (0.7 * patterns + noise).mul(255).round().to(torch.uint8)


class GeneratedDataModule(EpisodicDataModule):
    """Our DataModule protocol on small generated splits."""

    def load_splits(self) -> dict[str, Tensor]:
        return {
            split: class_images(classes, 12, seed)
            for seed, (split, classes) in enumerate((("train", 20), ("val", 8), ("test", 8)))
        }


def l2l_taskset(classes: int, per_class: int, ways: int, samples: int, seed: int) -> object:
    """learn2learn's own pipeline over an in-memory data set of float images in [0, 1].

    Every image is distinct (its index is written into its first pixels), so tests can
    tell which ones a task holds. Labels are arbitrary class ids (3 * class + 100).
    """
    images = class_images(classes, per_class, seed).flatten(0, 1).float().div(255)
    index = torch.arange(len(images))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256) / 255, (index // 256) / 255
    labels = torch.arange(classes).repeat_interleave(per_class) * 3 + 100
    dataset = l2l.data.MetaDataset(TensorDataset(images, labels))
    transforms = [
        l2l.data.transforms.NWays(dataset, n=ways),
        l2l.data.transforms.KShots(dataset, k=samples),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
    ]
    return l2l.data.Taskset(dataset, task_transforms=transforms, num_tasks=-1)


def image_key(image: Tensor) -> int:
    """The index written into an image by :func:`l2l_taskset` (its first two pixels)."""
    pixels = (image.float().flatten()[:2] * (255 if image.is_floating_point() else 1)).round()
    return int(pixels[0]) + 256 * int(pixels[1])


# -- our episodes -> learn2learn tasks -> our episodes ---------------------------------------


def test_round_trip_gives_the_same_episodes() -> None:
    sampler = EpisodeSampler(class_images(10, 12), 4, 2, 3, seed=5, split="train")
    taskset = as_l2l_taskset(sampler)
    X, y = taskset[7]
    assert X.shape == (4 * (2 + 3), 1, SIZE, SIZE) and X.dtype == torch.float32
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert y.tolist() == [c for c in range(4) for _ in range(5)]  # class-major

    back = tasks_to_batch([taskset[i] for i in (7, 8)], 4, 2, 3, episode_ids=[7, 8])
    expected = sampler.sample([7, 8])
    assert back.support.dtype == torch.uint8  # k / 255 floats come back losslessly
    for field in ("support", "support_labels", "query", "query_labels", "episode_ids"):
        assert torch.equal(getattr(back, field), getattr(expected, field)), field
    assert back.ways == expected.ways

    # The same through the source that feeds our DataModules, and as raw uint8 tasks.
    source = L2LEpisodeSource(taskset, 4, 2, 3, seed=0)
    assert torch.equal(source.sample([3, 4]).query, sampler.sample([3, 4]).query)
    raw = as_l2l_taskset(sampler, dtype=torch.uint8)[7][0]
    assert torch.equal(raw, episode_to_task(expected, 0, torch.uint8)[0])


def test_taskset_interface_is_deterministic() -> None:
    sampler = EpisodeSampler(class_images(10, 12), 3, 1, 1, seed=0, split="train")
    endless = as_l2l_taskset(sampler)
    assert len(endless) == 1  # as learn2learn's num_tasks=-1
    first, second = endless.sample(), endless.sample()
    assert torch.equal(first[0], endless[0][0]) and torch.equal(second[0], endless[1][0])
    assert not torch.equal(first[0], second[0])

    pool = as_l2l_taskset(sampler, num_tasks=2)
    assert len(pool) == 2 and len(list(pool)) == 2
    drawn = [pool.sample()[0] for _ in range(3)]
    assert torch.equal(drawn[2], drawn[0]) and torch.equal(pool[-1][0], drawn[1])
    with pytest.raises(IndexError):
        pool[2]
    with pytest.raises(ValueError, match="num_tasks"):
        as_l2l_taskset(sampler, num_tasks=0)


# -- learn2learn's MAML on our episodes ------------------------------------------------------


def fast_adapt(batch, learner, loss, adaptation_steps, shots, ways):
    """learn2learn's examples/vision/maml_*.py `fast_adapt`, unchanged but for the device."""
    data, labels = batch
    adaptation_indices = np.zeros(data.size(0), dtype=bool)
    adaptation_indices[np.arange(shots * ways) * 2] = True
    evaluation_indices = torch.from_numpy(~adaptation_indices)
    adaptation_indices = torch.from_numpy(adaptation_indices)
    adaptation_data, adaptation_labels = data[adaptation_indices], labels[adaptation_indices]
    evaluation_data, evaluation_labels = data[evaluation_indices], labels[evaluation_indices]
    for _ in range(adaptation_steps):
        adaptation_error = loss(learner(adaptation_data), adaptation_labels)
        learner.adapt(adaptation_error)
    predictions = learner(evaluation_data)
    evaluation_error = loss(predictions, evaluation_labels)
    accuracy = (predictions.argmax(dim=1) == evaluation_labels).float().mean()
    return evaluation_error, accuracy


def small_classifier(ways: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * (SIZE // 2) ** 2, ways),
    )


def test_l2l_maml_example_loop_runs_on_our_tasksets() -> None:
    ways, shots = 5, 1
    # The example draws train_samples = 2 * shots per class: query_shots = shots.
    datamodule = GeneratedDataModule(ways=ways, shots=shots, query_shots=shots, seed=1)
    tasksets = l2l_tasksets(datamodule)
    assert isinstance(tasksets, l2l.vision.benchmarks.BenchmarkTasksets)
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(small_classifier(ways), lr=0.5, first_order=False)
    opt = torch.optim.Adam(maml.parameters(), 3e-3)
    loss = nn.CrossEntropyLoss(reduction="mean")
    for _ in range(2):  # the example's outer loop, meta-batch 2
        opt.zero_grad()
        for _ in range(2):
            learner = maml.clone()
            error, accuracy = fast_adapt(tasksets.train.sample(), learner, loss, 1, shots, ways)
            error.backward()
            assert 0.0 <= float(accuracy) <= 1.0
            learner = maml.clone()
            fast_adapt(tasksets.validation.sample(), learner, loss, 1, shots, ways)
        grads = [p.grad for p in maml.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)
        for p in maml.parameters():
            assert p.grad is not None
            p.grad.data.mul_(1.0 / 2)
        opt.step()
    # Task i is episode i of the split's stream.
    assert torch.equal(
        tasksets.train[0][0], episode_to_task(datamodule.samplers["train"].sample([0]))[0]
    )


def test_l2l_maml_adapts_on_our_support_sets() -> None:
    """MAML's inner step lowers the support loss of our episodes (split with split_task)."""
    ways, shots, query_shots = 5, 2, 3
    sampler = EpisodeSampler(class_images(20, 12), ways, shots, query_shots, seed=0, split="x")
    tasks = as_l2l_taskset(sampler)
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(small_classifier(ways), lr=0.5)
    before = after = 0.0
    for _ in range(4):
        support, support_labels, query, query_labels = split_task(
            *tasks.sample(), ways, shots, query_shots
        )
        learner = maml.clone()
        first = F.cross_entropy(learner(support), support_labels)
        learner.adapt(first)
        before += float(first.detach())
        after += float(F.cross_entropy(learner(support), support_labels).detach())
        F.cross_entropy(learner(query), query_labels).backward()
    assert after < before
    assert all(p.grad is not None for p in maml.parameters())


def test_l2l_omniglot_cnn_maml_on_real_omniglot_episodes(real_omniglot: OmniglotCharacters) -> None:
    """Real Omniglot episodes look like learn2learn's Omniglot (28x28, ink 1 on background
    0) and train its OmniglotCNN with MAML."""
    ways, shots = 5, 1
    images = with_rotations(real_omniglot.images[:100], rotations=True)
    sampler = EpisodeSampler(images, ways, shots, shots, seed=0, split="train")
    tasks = as_l2l_taskset(sampler)
    X, _ = tasks[0]
    assert X.shape == (2 * ways, 1, 28, 28)
    assert float(X.max()) == 1.0 and float(X.mean()) < 0.5  # mostly background (0)
    torch.manual_seed(0)
    maml = l2l.algorithms.MAML(l2l.vision.models.OmniglotCNN(ways), lr=0.4)
    opt = torch.optim.Adam(maml.parameters(), 1e-3)
    loss = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        for _ in range(2):
            error, _ = fast_adapt(tasks.sample(), maml.clone(), loss, 1, shots, ways)
            error.backward()
            assert torch.isfinite(error)
        opt.step()


# -- learn2learn task sets -> our LightningModule --------------------------------------------


def test_l2l_tasks_become_episodes() -> None:
    ways, shots, query_shots = 5, 2, 3
    taskset = l2l_taskset(12, 10, ways, shots + query_shots, seed=0)
    source = L2LEpisodeSource(taskset, ways, shots, query_shots, seed=3)
    state = random.getstate()
    batch = source.sample([5, 6])
    assert random.getstate() == state  # learn2learn's global generator is left as it was
    assert batch.support.shape == (2, ways * shots, 1, SIZE, SIZE)
    assert batch.query.shape == (2, ways * query_shots, 1, SIZE, SIZE)
    assert batch.support.dtype == torch.uint8
    assert batch.support_labels[0].tolist() == [c for c in range(ways) for _ in range(shots)]
    assert batch.episode_ids.tolist() == [5, 6]
    for b in range(2):  # support and query of a label come from one class, and are disjoint
        keys = [image_key(x) for x in torch.cat([batch.support[b], batch.query[b]])]
        assert len(set(keys)) == len(keys)
        labels = torch.cat([batch.support_labels[b], batch.query_labels[b]]).tolist()
        owner = {}  # our label -> original class (images of class c have keys c*10..c*10+9)
        for key, label in zip(keys, labels, strict=True):
            assert owner.setdefault(label, key // 10) == key // 10
        assert len(set(owner.values())) == ways
    # Episode i is a function of (seed, split, i); another seed or index differs.
    assert torch.equal(source.sample([5]).query[0], batch.query[0])
    assert not torch.equal(source.sample([6]).query[0], batch.query[0])
    other = L2LEpisodeSource(taskset, ways, shots, query_shots, seed=4).sample([5])
    assert not torch.equal(other.query[0], batch.query[0])


def test_task_geometry_and_image_errors() -> None:
    taskset = l2l_taskset(12, 10, 4, 5, seed=0)
    with pytest.raises(ConfigError, match=r"NWays\(n=5\)"):
        L2LEpisodeSource(taskset, 5, 2, 3).sample([0])
    with pytest.raises(ConfigError, match=r"KShots\(k=6\)"):
        L2LEpisodeSource(taskset, 4, 3, 3).sample([0])
    X, y = taskset.sample()
    normalized = (X - 0.5) / 0.25  # not in [0, 1]: stays float under "auto"
    assert tasks_to_batch([(normalized, y)], 4, 2, 3).support.dtype == torch.float32
    assert tasks_to_batch([(X, y)], 4, 2, 3, images="float").support.dtype == torch.float32
    with pytest.raises(ConfigError, match="uint8"):
        tasks_to_batch([(normalized, y)], 4, 2, 3, images="uint8")


def test_l2l_taskset_trains_hyper_representation() -> None:
    ways, shots, query_shots = 5, 1, 2
    tasksets = [l2l_taskset(12, 10, ways, shots + query_shots, seed=s) for s in range(3)]
    datamodule = L2LDataModule(
        tasksets=tasksets,
        ways=ways,
        shots=shots,
        query_shots=query_shots,
        meta_batch=2,
        val_episodes=4,
        test_episodes=4,
        eval_meta_batch=2,
    )
    model = HyperRepresentation(backbone=TINY_BACKBONE, inner_steps=2)
    start = [p.detach().clone() for p in model.backbone.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 3
    assert model.last_eval["episodes"] == 4  # validation ran on the fixed episodes
    assert any(
        not torch.equal(a, b) for a, b in zip(start, model.backbone.parameters(), strict=True)
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert 0.0 <= model.last_eval["accuracy"] <= 1.0


def test_l2l_episodes_stream() -> None:
    taskset = l2l_taskset(12, 10, 5, 3, seed=0)
    stream = L2LEpisodes(taskset, 5, 1, 2, meta_batch=3, steps=2)
    batches = list(DataLoader(stream, batch_size=None))
    assert [b.episode_ids.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5]]
    again = L2LEpisodeSource(taskset, 5, 1, 2, seed=0).sample([4])
    assert torch.equal(batches[1].support[1], again.support[0])


def test_datamodule_needs_one_task_source() -> None:
    with pytest.raises(ConfigError, match="either tasksets or benchmark"):
        L2LDataModule()


def test_datamodule_builds_a_benchmark_for_our_geometry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def get_tasksets(name, **kwargs):  # learn2learn's would download the data set
        calls.append((name, kwargs))
        train = l2l_taskset(12, 10, kwargs["train_ways"], kwargs["train_samples"], seed=0)
        evaluation = [
            l2l_taskset(12, 10, kwargs["test_ways"], kwargs["test_samples"], seed=s) for s in (1, 2)
        ]
        return l2l.vision.benchmarks.BenchmarkTasksets(train, *evaluation)

    monkeypatch.setattr(l2l.vision.benchmarks, "get_tasksets", get_tasksets)
    datamodule = L2LDataModule(
        benchmark="omniglot", root="/nowhere", ways=3, shots=2, query_shots=1, train_ways=4
    )
    datamodule.setup("fit")
    assert calls == [
        (
            "omniglot",
            {
                "train_ways": 4,
                "train_samples": 3,
                "test_ways": 3,
                "test_samples": 3,
                "num_tasks": -1,
                "root": "/nowhere",
            },
        )
    ]
    assert datamodule.samplers["train"].sample([0]).support.shape[1] == 4 * 2
    assert datamodule.samplers["test"].sample([0]).query.shape[1] == 3 * 1


# -- learn2learn stays optional --------------------------------------------------------------


def test_missing_learn2learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # `import learn2learn` fails
    with pytest.raises(Learn2LearnNotInstalled, match="make install-l2l"):
        require_learn2learn()
    with pytest.raises(ImportError):
        l2l_tasksets(GeneratedDataModule(ways=2))


def test_core_imports_do_not_import_learn2learn() -> None:
    code = (
        "import sys, metalearn, metalearn.data, metalearn.lightning, metalearn.data.l2l; "
        "assert 'learn2learn' not in sys.modules, 'learn2learn was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- our MAML / ANIL against learn2learn's (an outside implementation) -------------------
class _HeadOnBackbone(nn.Module):
    """backbone(x) @ W + b: the network our MAML adapts, as one nn.Module for learn2learn."""

    def __init__(self, backbone: nn.Module, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images) @ self.weight + self.bias


def _random_episodes(ways: int, shots: int, queries: int, episodes: int = 2):
    from test_baselines import random_batch

    return random_batch(episodes, ways=ways, shots=shots, queries=queries, side=SIZE, seed=3)


def _nontrivial_head(model: torch.nn.Module, seed: int = 0) -> None:
    """A learned head initialization away from zero, so its gradient is not a special case."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head_weight.copy_(0.3 * torch.randn(model.head_weight.shape, generator=g))
        model.head_bias.copy_(0.1 * torch.randn(model.head_bias.shape, generator=g))


@pytest.mark.parametrize("first_order", [False, True])
def test_our_maml_meta_gradient_equals_learn2learn_maml(first_order: bool) -> None:
    """Same initialization, same episodes, float64: learn2learn's MAML (clone / adapt, one
    episode at a time) and ours (functional, vmapped over the meta-batch) give the same
    query loss and the same meta-gradient of every parameter, second and first order."""
    from metalearn.lightning import MAML

    ways, steps, lr = 3, 2, 0.3
    torch.manual_seed(0)
    ours = MAML(
        TINY_BACKBONE, ways=ways, inner_steps=steps, inner_lr=lr, first_order=first_order
    ).double()
    _nontrivial_head(ours)
    batch = _random_episodes(ways, shots=2, queries=3)
    loss, _, _ = ours.episode_forward(batch, steps)
    loss.mean().backward()

    net = _HeadOnBackbone(copy.deepcopy(ours.backbone), ours.head_weight, ours.head_bias)
    net.zero_grad()
    # The model's η = exp(ρ), ρ stored before .double(): not exactly `lr`.
    maml = l2l.algorithms.MAML(net, lr=ours.inner_lr.item(), first_order=first_order)
    support, query = batch.support.double() / 255, batch.query.double() / 255
    losses = []
    for e in range(len(support)):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support[e]), batch.support_labels[e]))
        losses.append(F.cross_entropy(learner(query[e]), batch.query_labels[e]))
    reference = torch.stack(losses)
    reference.mean().backward()

    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=0)
    pairs = [(ours.head_weight, net.weight), (ours.head_bias, net.bias)]
    pairs += list(zip(ours.backbone.parameters(), net.backbone.parameters(), strict=True))
    for a, b in pairs:
        assert a.grad is not None and b.grad is not None
        assert float(b.grad.abs().max()) > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13)


def test_our_anil_meta_gradient_equals_learn2learn_maml_on_the_head() -> None:
    """ANIL as learn2learn's examples write it (MAML on the head, features from the shared
    backbone) equals our ANIL (the batched closed-form head loop) in loss and meta-gradient."""
    from metalearn.lightning import ANIL

    ways, steps, lr = 3, 3, 0.4
    torch.manual_seed(0)
    ours = ANIL(
        TINY_BACKBONE, ways=ways, inner_steps=steps, inner_lr=lr, batch_stats="split"
    ).double()
    _nontrivial_head(ours, seed=1)
    batch = _random_episodes(ways, shots=2, queries=3)
    loss, _, _ = ours.episode_forward(batch, steps)
    loss.mean().backward()

    backbone = copy.deepcopy(ours.backbone)
    head = nn.Linear(ours.head_weight.shape[0], ways).double()
    with torch.no_grad():
        head.weight.copy_(ours.head_weight.T)
        head.bias.copy_(ours.head_bias)
    maml = l2l.algorithms.MAML(head, lr=ours.inner_lr.item())  # η = exp(ρ), as stored
    support, query = batch.support.double() / 255, batch.query.double() / 255
    losses = []
    for e in range(len(support)):
        learner = maml.clone()
        support_features, query_features = backbone(support[e]), backbone(query[e])
        for _ in range(steps):
            learner.adapt(F.cross_entropy(learner(support_features), batch.support_labels[e]))
        losses.append(F.cross_entropy(learner(query_features), batch.query_labels[e]))
    reference = torch.stack(losses)
    reference.mean().backward()

    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=0)
    assert ours.head_weight.grad is not None and head.weight.grad is not None
    torch.testing.assert_close(ours.head_weight.grad, head.weight.grad.T, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(ours.head_bias.grad, head.bias.grad, rtol=1e-9, atol=1e-13)
    for a, b in zip(ours.backbone.parameters(), backbone.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13)
