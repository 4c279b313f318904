"""Golden tests: the ``paper`` split and the fixed evaluation episodes behind every number.

Every accuracy metalearn reports is measured on the same 600 validation / test episodes of
the same split. Those are functions of (seed, split, index) drawn with numpy's
``Generator`` (``choice`` and ``random``) and, for the split, the legacy
``RandomState.permutation``. NEP 19 keeps ``RandomState`` frozen but lets a numpy release
change ``Generator`` algorithms; these hashes turn such a change (or any edit of the
sampler or the split) into a failing test instead of silently different episodes. If one
fails, the published numbers were measured on other episodes: pin numpy (pyproject.toml)
rather than update the hash.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from metalearn.data.episodes import EpisodeSampler
from metalearn.data.sets.omniglot import OmniglotCharacters, split_characters

#: sha256 of the JSON {"train"|"val"|"test": ["collection/alphabet/character", ...]} of the
#: paper split (1200 / 100 / 323 characters), sorted keys.
PAPER_SPLIT = "00fa1d708d4edf3e06aefa70e8ea020996ad18aa798d84d2b31da4f8f94ef82f"

#: sha256 of the class, support and query indices (int64) of episodes 0..19, per (split,
#: classes of the split with rotations, ways, shots, disjoint); 15 queries, eval seed 0.
EPISODES = {
    ("val", 400, 5, 1, True): "e620b908bbe8ec9589f48668435694633307522491844285c078ea1ee88ecc20",
    ("val", 400, 5, 1, False): "84224fa65b55d0f2ef11ec8cdb8a470281ba2bf44d61d00224a1fbe7a1414068",
    ("val", 400, 20, 5, True): "2ac5934e3681ff862a1f49e8d5c6987b34ae3176424bc8e94d99b188e394fe27",
    ("val", 400, 20, 5, False): "2b29c4533e86d221151cee717e9c1fcd01c2e92ea2057eabf2cc32a17a0a520d",
    ("test", 1292, 5, 1, True): "a92f92eb07b98328f0ef4315359d8ff1aa6dc6e0f75ef2b1575801964e78858d",
    ("test", 1292, 5, 1, False): "e0f4b54af0fc552dd6d172b2dbc5e5e6582525af4f72572491f14f61301c2fbf",
    ("test", 1292, 20, 5, True): "517e19524700d02e43b82b3de6dc575d7543a874523ae6e37aed4b753db674c2",
    (
        "test",
        1292,
        20,
        5,
        False,
    ): "48af66b26b3f060b4a9be558955c200890368e6de109f2e1c8d742bcaab83c82",
}


#: sha256 of the decoded 28x28 uint8 images of all 1623 characters (1623, 20, 28, 28) of the
#: official zips, and of the JSON list of their (collection, alphabet, character) names: the
#: tensor every Omniglot number was measured on (taken before the move onto the shared cache).
IMAGES_28PX = "d76a1451bb8709f84cd8678e2c1e218339e26c1e23790e402fb39f8144e9a3db"
NAMES = "12dd2a6d690468b7e51d5f53e8cbd36a235c73f1854f0ef390e9414babb6003c"


def test_the_decoded_omniglot_images_are_pinned(real_omniglot: OmniglotCharacters):
    assert tuple(real_omniglot.images.shape) == (1623, 20, 28, 28)
    pixels = np.ascontiguousarray(real_omniglot.images.numpy()).tobytes()
    assert hashlib.sha256(pixels).hexdigest() == IMAGES_28PX
    names = json.dumps([list(name) for name in real_omniglot.names]).encode()
    assert hashlib.sha256(names).hexdigest() == NAMES


def test_the_paper_split_is_pinned(real_omniglot: OmniglotCharacters):
    index = split_characters(real_omniglot.names, "paper")
    lists = {
        part: ["/".join(real_omniglot.names[i]) for i in index[part]]
        for part in ("train", "val", "test")
    }
    assert [len(lists[p]) for p in ("train", "val", "test")] == [1200, 100, 323]
    digest = hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()
    assert digest == PAPER_SPLIT


@pytest.mark.parametrize(("split", "classes", "ways", "shots", "disjoint"), list(EPISODES))
def test_the_first_evaluation_episodes_are_pinned(split, classes, ways, shots, disjoint):
    """The episodes the Omniglot DataModule draws for validation (val, 100 characters x 4
    rotations) and test (test, 323 x 4): only the split's size, 20 images per class, the
    seed and the split name enter the indices, so no image data is needed."""
    images = torch.zeros(classes, 20, 1, 1, 1, dtype=torch.uint8)
    sampler = EpisodeSampler(images, ways, shots, 15, seed=0, split=split, disjoint=disjoint)
    digest = hashlib.sha256()
    for episode in range(20):
        for part in sampler.episode_indices(episode):
            digest.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    assert digest.hexdigest() == EPISODES[(split, classes, ways, shots, disjoint)], (
        f"the fixed {split} episodes changed (numpy {np.__version__}): every published "
        f"number was measured on other episodes"
    )
