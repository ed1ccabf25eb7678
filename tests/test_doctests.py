"""The ``Examples:`` of the public parts a user composes run, and give what they show.

Each module's doctests run as one test (``doctest.testmod``); the parts named in the issue
(``info_nce``, ``Queue``, ``MemoryBank``, ``MomentumEncoder``, ``ViewGenerator``,
``load_encoder``) must each have examples, so a deleted example fails too.
"""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = {
    "mocolab.losses": ["info_nce", "barlow_twins_loss", "dense_correspondence"],
    "mocolab.infomax": ["jsd_mi"],
    "mocolab.dictionaries": ["Queue", "MemoryBank", "nearest_neighbours"],
    "mocolab.momentum": ["MomentumEncoder"],
    "mocolab.distributed": ["on_shuffled_batch"],
    "mocolab.features": ["cpu_features"],
    "mocolab.masking": ["random_masking", "block_masks", "multiblock_masks"],
    "mocolab.augment.views": ["ViewGenerator"],
    "mocolab.encoder": ["load_encoder"],
    "mocolab.errors": ["unknown_name"],
    "mocolab.option": [],
    "mocolab.loggers": ["parse"],
    "mocolab.device": [],
    "mocolab.data": [],
    "mocolab.factory": ["create_method", "create_backbone", "list_methods"],
    "mocolab.transforms": ["transforms", "Views"],
    "mocolab.results": ["results"],
    "mocolab.evaluate.knn": ["knn_accuracy"],
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_examples_run(name, one_thread):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    tests = {t.name.rsplit(".", 1)[-1]: t for t in finder.find(module) if t.examples}
    for part in MODULES[name]:
        assert part in tests, f"{name}.{part} has no runnable Examples"
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests.values():
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{result.failed} example(s) failed"
