"""Baselines in the same harness: their math (float64), their configs, a learning run."""

from __future__ import annotations

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from omegaconf import OmegaConf
from torch import Tensor, nn

from metalearn.bilevel import fit_linear_heads
from metalearn.bilevel.maml import gradient_descent, maml_episodes
from metalearn.checkpoint import check_resumable, learner_class, read_checkpoint, run_differences
from metalearn.data.episodes import EpisodeBatch, EpisodeSampler, FixedEpisodes
from metalearn.errors import ConfigError
from metalearn.lightning import (
    ANIL,
    MAML,
    ClassicalJointTraining,
    HyperRepresentation,
    PrototypicalNetwork,
)
from metalearn.lightning.protonet import prototype_logits
from metalearn.pipeline import evaluate, model_from_checkpoint, train

ALGORITHMS = {
    "protonet": PrototypicalNetwork,
    "maml": MAML,
    "anil": ANIL,
    "classical": ClassicalJointTraining,
    "hyper_representation": HyperRepresentation,
}

#: A small conv backbone (per-episode BatchNorm without scale, as the paper's) on 8x8 images.
TINY_CONV = {
    "_target_": "metalearn.models.ConvBackbone",
    "in_channels": 1,
    "channels": 3,
    "depth": 2,
    "stride": 2,
    "image_size": 8,
}


class FlatFeatures(nn.Module):
    """Features = the flattened pixels: a backbone without parameters (linear models)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(-3)


FLAT = {"_target_": "test_baselines.FlatFeatures", "feature_dim": 4}


def random_batch(
    episodes: int, ways: int, shots: int, queries: int, side: int, seed: int = 0
) -> EpisodeBatch:
    """Random uint8 episodes, class-major labels."""
    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> Tensor:
        return torch.randint(0, 256, (episodes, count, 1, side, side), generator=generator).to(
            torch.uint8
        )

    labels = torch.arange(ways)
    return EpisodeBatch(
        support=images(ways * shots),
        support_labels=labels.repeat_interleave(shots).expand(episodes, -1).contiguous(),
        query=images(ways * queries),
        query_labels=labels.repeat_interleave(queries).expand(episodes, -1).contiguous(),
        episode_ids=torch.arange(episodes),
        ways=ways,
    )


# -- math ----------------------------------------------------------------------------------
def test_prototype_logits_are_minus_squared_distances():
    generator = torch.Generator().manual_seed(0)
    support = torch.randn(3, 6, 7, generator=generator, dtype=torch.float64)
    query = torch.randn(3, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]).expand(3, -1)
    logits = prototype_logits(support, labels, query, ways=3)
    for b in range(3):
        prototypes = torch.stack([support[b, labels[b] == n].mean(0) for n in range(3)])
        expected = -(torch.cdist(query[b], prototypes) ** 2)
        torch.testing.assert_close(logits[b], expected)


def test_protonet_episode_forward_is_the_query_cross_entropy():
    model = PrototypicalNetwork(TINY_CONV).double()
    batch = random_batch(2, ways=3, shots=2, queries=4, side=8)
    loss, accuracy, curve = model.episode_forward(batch, 0, per_step=True)
    support, query = model.embed(batch.support, batch.query)
    logits = prototype_logits(support, batch.support_labels, query, 3)
    expected = F.cross_entropy(logits.transpose(1, 2), batch.query_labels, reduction="none")
    torch.testing.assert_close(loss, expected.mean(1))
    assert curve is not None and curve.shape == (2, 1) and model.eval_steps == 0
    torch.testing.assert_close(curve[:, 0], accuracy)


def test_maml_linear_model_one_step_is_the_hand_computation():
    torch.manual_seed(0)
    model = MAML(FLAT, ways=3, inner_steps=1, inner_lr=0.7).double()
    with torch.no_grad():
        model.head_weight.normal_()
        model.head_bias.normal_()
    batch = random_batch(2, ways=3, shots=2, queries=3, side=2)
    loss, _, _ = model.episode_forward(batch, 1)
    loss.sum().backward()

    # By hand: one gradient step of the linear softmax head on the support set.
    w0 = model.head_weight.detach().clone().requires_grad_()
    b0 = model.head_bias.detach().clone().requires_grad_()
    xs = batch.support.double().div(255).flatten(-3)
    xq = batch.query.double().div(255).flatten(-3)
    expected = []
    for e in range(2):
        y = F.one_hot(batch.support_labels[e], 3).double()
        residual = (torch.softmax(xs[e] @ w0 + b0, -1) - y) / xs.shape[1]
        w1, b1 = w0 - 0.7 * xs[e].T @ residual, b0 - 0.7 * residual.sum(0)
        expected.append(F.cross_entropy(xq[e] @ w1 + b1, batch.query_labels[e]))
    torch.stack(expected).sum().backward()
    torch.testing.assert_close(loss, torch.stack(expected).detach())
    torch.testing.assert_close(model.head_weight.grad, w0.grad)
    torch.testing.assert_close(model.head_bias.grad, b0.grad)


def _tiny_maml_problem(first_order: bool):
    """A float64 MAML problem on the tiny conv net: the meta-loss as a function of θ_0."""
    torch.manual_seed(0)
    model = MAML(TINY_CONV, ways=3, inner_steps=2, inner_lr=0.5).double()
    with torch.no_grad():
        model.head_weight.normal_(std=0.3)
        model.head_bias.normal_(std=0.3)
    batch = random_batch(2, ways=3, shots=2, queries=2, side=8)
    names = list(model.initial_params(3))
    support, query = model._to_float(batch.support), model._to_float(batch.query)

    def meta_loss(*values: Tensor) -> Tensor:
        loss, _, _ = maml_episodes(
            model.predict,
            dict(zip(names, values, strict=True)),
            support,
            batch.support_labels,
            query,
            batch.query_labels,
            steps=2,
            lr=0.5,
            first_order=first_order,
        )
        return loss.sum()

    values = tuple(p.detach().clone().requires_grad_() for p in model.initial_params(3).values())
    return meta_loss, values, (model, names, support, query, batch)


def test_maml_second_order_gradient_matches_finite_differences():
    meta_loss, values, _ = _tiny_maml_problem(first_order=False)
    # The backbone's BatchNorm runs inside vmap and torch.func.grad, differentiated twice.
    # fast_mode: the gradient checked along random directions (a few meta-loss evaluations).
    assert torch.autograd.gradcheck(
        meta_loss, values, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True
    )


def test_maml_first_order_gradient_is_the_query_gradient_at_the_adapted_parameters():
    second_loss, values, _ = _tiny_maml_problem(first_order=False)
    first_loss, _, (model, names, support, query, batch) = _tiny_maml_problem(first_order=True)
    torch.testing.assert_close(first_loss(*values), second_loss(*values))  # same forward
    second = torch.autograd.grad(second_loss(*values), values)
    first = torch.autograd.grad(first_loss(*values), values)
    assert max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True)) > 1e-4
    # By hand, episode by episode: adapt (no graph), then the query gradient there, summed.
    expected = [torch.zeros_like(v) for v in values]
    for e in range(2):
        params = dict(zip(names, (v.detach() for v in values), strict=True))
        adapted = gradient_descent(
            lambda p, e=e: F.cross_entropy(model.predict(p, support[e]), batch.support_labels[e]),
            params,
            steps=2,
            lr=0.5,
        )
        leaves = [a.detach().requires_grad_() for a in adapted.values()]
        logits = model.predict(dict(zip(names, leaves, strict=True)), query[e])
        grads = torch.autograd.grad(F.cross_entropy(logits, batch.query_labels[e]), leaves)
        expected = [x + g for x, g in zip(expected, grads, strict=True)]
    for got, want in zip(first, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_maml_evaluation_builds_no_graph_and_gives_a_curve():
    model = MAML(TINY_CONV, ways=3, inner_steps=1, eval_inner_steps=3)
    batch = random_batch(4, ways=3, shots=1, queries=2, side=8)
    with torch.no_grad():
        loss, accuracy, curve = model.episode_forward(batch, model.eval_steps, per_step=True)
    assert not loss.requires_grad and curve is not None and curve.shape == (4, 4)
    torch.testing.assert_close(curve[:, -1], accuracy)
    # t = 0 is the (zero) initial head: all logits equal, every query predicted as class 0.
    torch.testing.assert_close(curve[:, 0], torch.full((4,), 1 / 3))
    chunked = MAML(TINY_CONV, ways=3, episode_chunk=1)
    chunked.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(chunked.episode_forward(batch, 3)[0], loss)


def test_maml_rejects_other_batch_stats_and_mismatched_ways():
    for other in ("episode", "meta_batch", "running"):
        with pytest.raises(ConfigError, match=r"batch_stats must be split .* or support"):
            MAML(TINY_CONV, batch_stats=other)
    model = MAML(TINY_CONV, ways=5)
    with pytest.raises(ConfigError, match="head_init=zero"):
        model.episode_forward(random_batch(1, ways=3, shots=1, queries=1, side=8), 1)
    zero = MAML(TINY_CONV, ways=5, head_init="zero")
    zero.episode_forward(random_batch(1, ways=3, shots=1, queries=1, side=8), 1)


@pytest.mark.parametrize("first_order, center", [(False, False), (True, False), (False, True)])
def test_anil_with_zero_head_init_is_the_hyper_representation(first_order, center):
    """ANIL = hyper-representation + a learned head initialization (Sec. 3 of the paper)."""
    torch.manual_seed(0)
    settings = {
        "inner_steps": 5,
        "inner_lr": 0.3,
        "learn_inner_lr": True,
        "first_order": first_order,
        "center_features": center,
    }
    hyper = HyperRepresentation(TINY_CONV, **settings).double()
    anil = ANIL(TINY_CONV, head_init="zero", eval_inner_steps=5, **settings).double()
    anil.load_state_dict(hyper.state_dict())
    batch = random_batch(3, ways=3, shots=2, queries=3, side=8)
    outputs = []
    for model in (hyper, anil):
        loss, accuracy, curve = model.episode_forward(batch, 5, per_step=True)
        loss.sum().backward()
        outputs.append((loss, accuracy, curve, [p.grad for p in model.parameters()]))
    (loss_h, acc_h, curve_h, grads_h), (loss_a, acc_a, curve_a, grads_a) = outputs
    torch.testing.assert_close(loss_a, loss_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc_a, acc_h)
    torch.testing.assert_close(curve_a, curve_h)
    for grad_a, grad_h in zip(grads_a, grads_h, strict=True):
        torch.testing.assert_close(grad_a, grad_h, rtol=1e-10, atol=1e-12)


def test_linear_heads_from_a_zero_init_are_the_default_and_learn_a_given_init():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64)
    labels = torch.arange(3).repeat(2).expand(4, -1)
    expected = fit_linear_heads(features, labels, 3, steps=4, lr=0.5, l2=0.1)
    zero = (torch.zeros(5, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    got = fit_linear_heads(features, labels, 3, steps=4, lr=0.5, l2=0.1, init=zero)
    torch.testing.assert_close(got, expected)
    # A learned initialization (d, N) (ANIL): its gradient through the 4 steps, against gradcheck.
    weight = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)

    def outer(w: Tensor, b: Tensor) -> Tensor:
        heads = fit_linear_heads(features, labels, 3, steps=4, lr=0.5, init=(w, b))
        return torch.baddbmm(heads[1].unsqueeze(1), features, heads[0]).logsumexp(-1).sum()

    assert torch.autograd.gradcheck(outer, (weight, bias))
    with pytest.raises(ValueError, match="head initialization has shapes"):
        fit_linear_heads(features, labels, 3, steps=4, lr=0.5, init=(weight[:, :2], bias))


def test_classical_trains_pool_heads_jointly_and_fits_new_heads_at_test():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 5, 1, 8, 8), dtype=torch.uint8)
    sampler = EpisodeSampler(images, ways=3, shots=1, query_shots=2, seed=0, split="train")
    model = ClassicalJointTraining(TINY_CONV, ways=3, pool_episodes=4, eval_inner_steps=7)
    model.pool_sampler = sampler
    stream = sampler.sample([5, 6])  # stream ids beyond the pool -> pool episodes 1 and 2
    pooled = model.pool_batch(stream)
    assert pooled.episode_ids.tolist() == [1, 2]
    torch.testing.assert_close(pooled.support, sampler.sample([1, 2]).support)
    loss, _ = model.training_loss(pooled)
    loss.mean().backward()
    # Only the heads of the episodes in the batch get a gradient; the backbone gets one too.
    touched = model.head_weight.grad.flatten(1).abs().sum(1) > 0
    assert touched.tolist() == [False, True, True, False]
    assert all(p.grad is not None for p in model.backbone.parameters())
    # Support and query examples both enter the training loss of head j.
    support, query = model.embed(pooled.support, pooled.query)
    logits = torch.cat([support, query], 1) @ model.head_weight[[1, 2]] + model.head_bias[
        [1, 2]
    ].unsqueeze(1)
    labels = torch.cat([pooled.support_labels, pooled.query_labels], 1)
    expected = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(1)
    torch.testing.assert_close(loss, expected)
    # Evaluation: a new head by fit_linear_heads on frozen features; any number of ways.
    batch = random_batch(2, ways=4, shots=2, queries=2, side=8)
    with torch.no_grad():
        _, accuracy, curve = model.episode_forward(batch, model.eval_steps, per_step=True)
    assert curve is not None and curve.shape == (2, 8)
    torch.testing.assert_close(curve[:, -1], accuracy)


# -- the real pipeline -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "experiment", ["omniglot_5w1s", "omniglot_20w5s_paper", "miniimagenet_5w1s"]
)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_algorithm_composes_with_every_experiment(
    algorithm, experiment, tmp_path, data_dir, real_cache_dir
):
    cfg = compose_config(
        "train",
        [f"experiment={experiment}", f"algorithm={algorithm}"],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    # The experiment's data and backbone, the algorithm's learner.
    model = hydra.utils.instantiate(cfg.model)
    assert type(model) is ALGORITHMS[algorithm]
    expected_backbone = "SnailResNet" if experiment.startswith("miniimagenet") else "ConvBackbone"
    assert type(model.backbone).__name__ == expected_backbone
    if algorithm in ("maml", "anil", "classical"):
        assert model.hparams.ways == cfg.data.ways
    if algorithm in ("maml", "anil"):  # a learned head fixes the ways: train on the test geometry
        assert cfg.data.train_ways is None


@pytest.mark.parametrize("algorithm", ["protonet", "maml", "anil", "classical"])
def test_algorithm_trains_tests_and_evaluate_rebuilds_it(
    algorithm, tmp_path, data_dir, real_cache_dir
):
    """Two training steps through train.py's pipeline on real Omniglot (training,
    validation, best checkpoint, test: what fast_dev_run checks, plus a checkpoint), then
    evaluate.py's pipeline rebuilds the model from the checkpoint."""
    overrides = [
        "experiment=omniglot_5w1s",
        f"algorithm={algorithm}",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_episodes=4",
        "data.test_episodes=8",
        "data.eval_meta_batch=4",
    ]
    if algorithm == "classical":
        overrides += ["model.pool_episodes=3", "model.eval_inner_steps=5"]  # stream 4..7 -> pool
    run = tmp_path / "run"
    metrics = train(compose_config("train", overrides, run, data_dir, real_cache_dir))
    assert 0.0 <= metrics["train/acc"] <= 1.0
    checkpoint_path = next((run / "checkpoints").glob("best-*.ckpt"))
    checkpoint = read_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    assert type(model) is ALGORITHMS[algorithm]
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[key], value)
    cfg = compose_config(
        "eval",
        [f"ckpt_path={checkpoint_path}", "episodes=8"],
        tmp_path / "eval",
        data_dir,
        real_cache_dir,
    )
    report = evaluate(cfg)
    # Same checkpoint, same fixed test episodes: the number train.py reported.
    assert report["accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
    assert report["inner_steps"] == model.eval_steps


def test_protonet_learns_on_real_omniglot(tmp_path, data_dir, real_cache_dir):
    """5-way 1-shot, 150 steps on 5-way training episodes: well above chance (20%) on
    held-out characters (73.1% measured)."""
    cfg = compose_config(
        "train",
        [
            "experiment=omniglot_5w1s",
            "algorithm=protonet",
            "data.train_ways=null",
            "logger=none",
            "trainer.max_steps=150",
            "trainer.val_check_interval=150",
            "data.val_episodes=100",
            "test=false",
        ],
        tmp_path,
        data_dir,
        real_cache_dir,
    )
    metrics = train(cfg)
    assert metrics["val/acc_best"] >= 0.6, metrics


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ("metalearn.lightning.module.HyperRepresentation", HyperRepresentation),
        ("metalearn.lightning.baselines.ANIL", ANIL),
        ("metalearn.lightning.baselines.MAML", MAML),
        ("metalearn.lightning.baselines.PrototypicalNetwork", PrototypicalNetwork),
        ("metalearn.lightning.baselines.ClassicalJointTraining", ClassicalJointTraining),
        ("metalearn.lightning.ANIL", ANIL),
        (None, HyperRepresentation),
    ],
    ids=str,
)
def test_a_checkpoint_names_its_learner_by_the_public_path(recorded, expected):
    """Checkpoints record ``metalearn.lightning.<Name>``, whichever file holds the class;
    those written when the learners lived in ``module.py`` / ``baselines.py`` (and before
    ``model_target`` existed) still resolve."""
    checkpoint = {} if recorded is None else {"model_target": recorded}
    assert learner_class(checkpoint) is expected
    saved: dict = {}
    settings = {"pool_episodes": 2} if expected is ClassicalJointTraining else {}
    model = expected(TINY_CONV, **settings)
    model.on_save_checkpoint(saved)
    assert saved["model_target"] == f"metalearn.lightning.{expected.__name__}"


def test_a_learner_given_omegaconf_containers_says_to_convert_them():
    """Hyperparameters go into checkpoints that load with weights_only: an OmegaConf
    container there is refused with the setting that fixes it (``_convert_: all``)."""
    with pytest.raises(ConfigError, match=r"model.backbone is an OmegaConf DictConfig.*_convert_"):
        HyperRepresentation(OmegaConf.create(TINY_CONV))


@pytest.mark.parametrize("learner", [HyperRepresentation, ANIL], ids=lambda c: c.__name__)
def test_a_setting_a_checkpoint_predates_takes_the_learners_default(learner, tmp_path):
    """A checkpoint written before ``head_init`` / ``inner_lr_param`` existed resumes with
    a config that states their defaults, and still differs where a setting really does."""
    model = learner(TINY_CONV, ways=3) if learner is ANIL else learner(TINY_CONV)
    saved: dict = {}
    model.on_save_checkpoint(saved)
    hyper_parameters = dict(model.hparams)
    for key in ("head_init", "inner_lr_param", "truncate"):
        hyper_parameters.pop(key, None)
    checkpoint = {**saved, "hyper_parameters": hyper_parameters}
    config = {
        "_target_": f"metalearn.lightning.{learner.__name__}",
        "_recursive_": False,
        "_convert_": "all",
        **dict(model.hparams),
    }
    assert check_resumable(checkpoint, config) == []
    assert run_differences(checkpoint, config, {}) == []
    other = "zero" if learner is ANIL else "learned"
    config["head_init"], config["ways"] = other, 3
    differences = run_differences(checkpoint, config, {})
    assert any(d.startswith("model.head_init: checkpoint") for d in differences)
    config["_target_"] = "metalearn.lightning.PrototypicalNetwork"
    with pytest.raises(ConfigError, match="the checkpoint holds a"):
        check_resumable(checkpoint, config)
    assert run_differences(checkpoint, config, {})[0].startswith("model: checkpoint")


@pytest.mark.parametrize("learner", list(ALGORITHMS.values()), ids=lambda c: c.__name__)
def test_what_loggers_log_is_what_checkpoints_hold(learner):
    """The logged hyperparameters (``hparams_initial``) equal the checkpoint's, with the
    default optimizer filled in and no setting the learner does not use (a zero head has
    no ``ways``, which would contradict the data module's)."""
    settings = {"pool_episodes": 2} if learner is ClassicalJointTraining else {}
    model = learner(TINY_CONV, **settings)
    assert dict(model.hparams_initial) == dict(model.hparams)
    assert model.hparams["optimizer"]["_target_"] == "torch.optim.Adam"
    if learner is HyperRepresentation:
        assert "ways" not in model.hparams


def test_a_ranks_padding_episode_counts_nowhere():
    """A rank left without evaluation episodes evaluates one padding episode (id -1) so
    that it takes part in the reduction; it adds no row to what is reduced."""
    images = torch.randint(0, 256, (6, 5, 1, 8, 8), dtype=torch.uint8)
    sampler = EpisodeSampler(images, ways=3, shots=1, query_shots=2, seed=0, split="val")
    padding = FixedEpisodes(sampler, episodes=1, meta_batch=4, rank=1, world_size=2)
    real = FixedEpisodes(sampler, episodes=1, meta_batch=4, rank=0, world_size=2)
    assert len(padding) == 1 and padding[0].episode_ids.tolist() == [-1]
    model = HyperRepresentation(TINY_CONV)
    model._eval_step(padding[0])
    model._eval_step(real[0])
    rows = torch.cat(model._episode_rows)
    assert rows.shape == (1, model.eval_steps + 2)
