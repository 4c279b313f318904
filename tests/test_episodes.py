"""Episode sampling and the Omniglot DataModule: shapes, determinism, disjointness, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_omniglot import fixture_expected_characters, make_omniglot_fixture
from torch.utils.data import DataLoader

from metalearn.data import (
    EpisodeSampler,
    FixedEpisodes,
    OmniglotDataModule,
    TrainEpisodes,
)
from metalearn.data.datamodule import with_rotations
from metalearn.errors import ConfigError, DataError


def toy_images(classes=12, per_class=20, side=4):
    """Each image holds its own (class, position) id, so gathers can be checked exactly."""
    ids = torch.arange(classes * per_class).view(classes, per_class)
    return (ids % 251).to(torch.uint8)[:, :, None, None, None].expand(-1, -1, 1, side, side).clone()


def test_batch_shapes_and_labels():
    sampler = EpisodeSampler(toy_images(), ways=5, shots=2, query_shots=3, seed=0, split="train")
    batch = sampler.sample(range(4))
    assert batch.support.shape == (4, 10, 1, 4, 4) and batch.support.dtype == torch.uint8
    assert batch.query.shape == (4, 15, 1, 4, 4)
    assert batch.support_labels.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.query_labels[0].tolist() == [c for c in range(5) for _ in range(3)]
    assert batch.episode_ids.tolist() == [0, 1, 2, 3] and batch.ways == 5


def test_episode_content_matches_indices_and_is_disjoint():
    images = toy_images()
    sampler = EpisodeSampler(images, ways=4, shots=5, query_shots=15, seed=3, split="val")
    batch = sampler.sample([7])
    classes, support, query = sampler.episode_indices(7)
    assert len(set(classes.tolist())) == 4
    for n, cls in enumerate(classes):
        got_support = batch.support[0, n * 5 : (n + 1) * 5, 0, 0, 0]
        got_query = batch.query[0, n * 15 : (n + 1) * 15, 0, 0, 0]
        assert torch.equal(got_support, images[cls, torch.from_numpy(support[n]), 0, 0, 0])
        assert torch.equal(got_query, images[cls, torch.from_numpy(query[n]), 0, 0, 0])
        # 5 + 15 = 20: every image of the class used exactly once, support ∩ query = ∅.
        assert sorted(support[n].tolist() + query[n].tolist()) == list(range(20))


def test_paper_sampler_may_repeat_support_in_query():
    sampler = EpisodeSampler(
        toy_images(), ways=5, shots=5, query_shots=15, seed=0, split="train", disjoint=False
    )
    overlaps = 0
    for i in range(20):
        _, support, query = sampler.episode_indices(i)
        overlaps += sum(len(set(s) & set(q)) for s, q in zip(support, query, strict=True))
        assert all(len(set(q)) == 15 for q in query)  # no repeat inside the query set
    assert overlaps > 0


def test_episode_is_pure_function_of_seed_split_index():
    images = toy_images()
    a = EpisodeSampler(images, 5, 1, 5, seed=0, split="train")
    b = EpisodeSampler(images, 5, 1, 5, seed=0, split="train")
    batch = a.sample([3, 10, 11])
    alone = b.sample([10])
    assert torch.equal(batch.support[1], alone.support[0])
    assert torch.equal(batch.query[1], alone.query[0])
    other_split = EpisodeSampler(images, 5, 1, 5, seed=0, split="val").sample([10])
    other_seed = EpisodeSampler(images, 5, 1, 5, seed=1, split="train").sample([10])
    assert not torch.equal(other_split.query[0], alone.query[0])
    assert not torch.equal(other_seed.query[0], alone.query[0])


def test_train_stream_same_for_ranks_workers_and_resume():
    sampler = EpisodeSampler(toy_images(), 3, 1, 2, seed=0, split="train")
    single = list(TrainEpisodes(sampler, meta_batch=4, end_step=6))
    assert [b.episode_ids.tolist() for b in single[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    ranks = [list(TrainEpisodes(sampler, 4, end_step=6, rank=r, world_size=2)) for r in (0, 1)]
    for step, full in enumerate(single):
        joined = torch.cat([ranks[0][step].query, ranks[1][step].query])
        assert torch.equal(joined, full.query)
        ids = ranks[0][step].episode_ids.tolist() + ranks[1][step].episode_ids.tolist()
        assert ids == full.episode_ids.tolist()
    workers = list(
        DataLoader(TrainEpisodes(sampler, 4, end_step=6), batch_size=None, num_workers=2)
    )
    assert [b.episode_ids.tolist() for b in workers] == [b.episode_ids.tolist() for b in single]
    assert all(torch.equal(w.support, s.support) for w, s in zip(workers, single, strict=True))
    resumed = list(TrainEpisodes(sampler, 4, start_step=4, end_step=6))
    assert torch.equal(resumed[0].support, single[4].support)
    with pytest.raises(ConfigError, match="divisible"):
        TrainEpisodes(sampler, 3, world_size=2)


def test_fixed_episodes_cover_exactly_n():
    sampler = EpisodeSampler(toy_images(), 3, 1, 2, seed=0, split="test")
    fixed = FixedEpisodes(sampler, episodes=7, meta_batch=3)
    ids = [i for j in range(len(fixed)) for i in fixed[j].episode_ids.tolist()]
    assert ids == list(range(7))
    assert torch.equal(fixed[2].support, FixedEpisodes(sampler, 7, 3)[2].support)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ways=13), "more than the 12 classes"),
        (dict(shots=6, query_shots=15), "data.shots \\+ data.query_shots = 6 \\+ 15"),
        (dict(ways=1), "ways must be an integer >= 2"),
        (dict(shots=0), "shots must be an integer >= 1"),
        (dict(query_shots=0), "query_shots must be an integer >= 1"),
    ],
)
def test_sampler_errors(kwargs, match):
    args = dict(ways=5, shots=1, query_shots=15)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match) as err:
        EpisodeSampler(toy_images(), seed=0, split="train", **args)
    assert "\n" not in str(err.value)


def test_rotations_are_distinct_classes():
    images = torch.randint(0, 256, (3, 20, 5, 5), dtype=torch.uint8)
    turned = with_rotations(images, True)
    assert turned.shape == (12, 20, 1, 5, 5)
    for k in range(4):
        assert torch.equal(turned[4 + k, :, 0], torch.rot90(images[1], k, dims=(-2, -1)))
    assert with_rotations(images, False).shape == (3, 20, 1, 5, 5)


# -- the DataModule -------------------------------------------------------------------------


def real_module(data_dir: Path, cache_dir: Path, **kwargs) -> OmniglotDataModule:
    dm = OmniglotDataModule(data_dir=data_dir, cache_dir=cache_dir, download=False, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "split, characters", [("paper", (1200, 100, 323)), ("vinyals", (1028, 172, 423))]
)
def test_real_omniglot_splits_as_rotated_classes(data_dir, real_cache_dir, split, characters):
    dm = real_module(
        data_dir, real_cache_dir, split=split, split_dir=data_dir / "omniglot/splits/vinyals"
    )
    for name, count in zip(("train", "val", "test"), characters, strict=True):
        sampler = dm.samplers[name]
        assert sampler.images.shape == (4 * count, 20, 1, 28, 28)
    # Held-out characters: no image of a training class appears in the test classes.
    train = dm.samplers["train"].images[::4, 0].flatten(1)
    test = dm.samplers["test"].images[::4, 0].flatten(1)
    assert not (torch.cdist(train.float(), test.float()) == 0).any()


def test_real_omniglot_loaders(data_dir, real_cache_dir):
    dm = real_module(
        data_dir, real_cache_dir, ways=20, shots=5, meta_batch=2, val_episodes=5, eval_meta_batch=2
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch.support.shape == (2, 100, 1, 28, 28)
    assert batch.query.shape == (2, 300, 1, 28, 28)
    val = list(dm.val_dataloader())
    assert [b.episode_ids.tolist() for b in val] == [[0, 1], [2, 3], [4]]
    again = list(
        real_module(
            data_dir, real_cache_dir, ways=20, shots=5, seed=123, val_episodes=5, eval_meta_batch=2
        ).val_dataloader()
    )
    # validation episodes do not depend on the training seed
    assert all(torch.equal(a.query, b.query) for a, b in zip(val, again, strict=True))
    pixels = batch.support.float() / 255
    assert 0.0 < pixels.mean() < 0.5  # ink = 1 on a background of 0


def test_datamodule_errors_before_training(tmp_path, data_dir, real_cache_dir):
    with pytest.raises(ConfigError, match="unknown Omniglot split 'foo'"):
        OmniglotDataModule(split="foo")
    with pytest.raises(ConfigError, match="meta_batch must be >= 1"):
        OmniglotDataModule(meta_batch=0)
    with pytest.raises(ConfigError, match="more than the 400 classes of the 'val' split"):
        real_module(data_dir, real_cache_dir, ways=401)
    with pytest.raises(ConfigError, match="more than the 20 images per class"):
        real_module(data_dir, real_cache_dir, shots=10, query_shots=15)
    missing = OmniglotDataModule(data_dir=tmp_path / "nowhere", cache_dir=tmp_path, download=False)
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")) as err:
        missing.prepare_data()
    assert "\n" not in str(err.value)


def test_datamodule_on_generated_fixture(tmp_path):
    data_dir = make_omniglot_fixture(tmp_path / "data", alphabets_per_collection=(3, 2))
    dm = OmniglotDataModule(
        data_dir=data_dir,
        cache_dir=tmp_path / "cache",
        split="paper",
        ways=3,
        shots=1,
        query_shots=2,
        meta_batch=2,
        download=False,
        expected_characters=fixture_expected_characters((3, 2)),
    )
    dm.prepare_data()
    dm.setup("fit")
    sizes = {k: s.num_classes for k, s in dm.samplers.items()}
    assert sum(sizes.values()) == 4 * 20 and all(v > 0 for v in sizes.values())
    batch = next(iter(dm.train_dataloader()))
    assert batch.support.shape == (2, 3, 1, 28, 28)
    assert np.isin(batch.support_labels.numpy(), [0, 1, 2]).all()


def reference_batch(sampler: EpisodeSampler, images: torch.Tensor, indices) -> dict:
    """The definition, episode by episode: images[class, position] of episode_indices."""
    support, query = [], []
    for i in indices:
        classes, s, q = sampler.episode_indices(i)
        support.append(
            torch.stack([images[c, p] for c, row in zip(classes, s, strict=True) for p in row])
        )
        query.append(
            torch.stack([images[c, p] for c, row in zip(classes, q, strict=True) for p in row])
        )
    return {"support": torch.stack(support), "query": torch.stack(query)}


@pytest.mark.parametrize("disjoint", [True, False])
def test_one_index_array_per_meta_batch_gathers_the_defined_episodes(disjoint):
    """draw() packs a meta-batch's positions and ids in one int64 array; gather() on it
    gives exactly the episodes of episode_indices, labels and ids included."""
    images = toy_images()
    sampler = EpisodeSampler(images, 4, 2, 3, seed=7, split="val", disjoint=disjoint)
    indices = [5, 0, 99, 12]
    drawn = sampler.draw(indices)
    assert drawn.dtype == np.int64 and drawn.shape == (4 * 4 * (2 + 3) + 4,)
    batch = sampler.gather(drawn)
    expected = reference_batch(sampler, images, indices)
    assert torch.equal(batch.support, expected["support"])
    assert torch.equal(batch.query, expected["query"])
    assert batch.episode_ids.tolist() == indices
    assert batch.support_labels.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 4
    assert batch.query_labels.tolist() == [[c for c in range(4) for _ in range(3)]] * 4


def test_classes_of_different_sizes_gather_the_defined_episodes():
    from metalearn.data.storage import ClassImages

    counts = [5, 9, 6, 7, 12]
    flat = torch.arange(sum(counts), dtype=torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2)
    store = ClassImages(flat.clone(), np.concatenate([[0], np.cumsum(counts)]))
    sampler = EpisodeSampler(store, 3, 1, 4, seed=1, split="train")
    batch = sampler.sample(range(6))
    for row, i in enumerate(range(6)):
        classes, s, q = sampler.episode_indices(i)
        starts = store.offsets[classes]
        assert batch.support[row, :, 0, 0, 0].tolist() == (starts[:, None] + s).ravel().tolist()
        assert batch.query[row, :, 0, 0, 0].tolist() == (starts[:, None] + q).ravel().tolist()


def test_the_training_stream_draws_the_next_meta_batch_in_the_background(monkeypatch):
    """While step s is handed out, the indices of step s + 1 are drawn on another thread;
    the stream is exactly sample(episode_ids(s)) for s in [start, end)."""
    import threading

    sampler = EpisodeSampler(toy_images(), 3, 1, 2, seed=3, split="train")
    threads: list[str] = []
    draw = sampler.draw

    def recording_draw(indices):
        threads.append(threading.current_thread().name)
        return draw(indices)

    monkeypatch.setattr(sampler, "draw", recording_draw)
    stream = TrainEpisodes(sampler, meta_batch=4, start_step=2, end_step=7)
    batches = list(stream)
    assert len(batches) == 5 and len(threads) == 5
    assert all(name.startswith("episode-draw") for name in threads)
    for step, batch in zip(range(2, 7), batches, strict=True):
        expected = sampler.gather(draw(stream.episode_ids(step)))
        for got, want in zip(batch[:-1], expected[:-1], strict=True):
            assert torch.equal(got, want)
