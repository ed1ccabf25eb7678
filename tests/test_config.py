import pytest

from mocolab.config import ConfigError, build_config, list_presets, load_preset


def test_method_defaults_follow_the_papers():
    v1 = build_config(method="mocov1")
    assert (v1.head_layers, v1.temperature, v1.augment, v1.lr_schedule) == (1, 0.07, "mocov1", "step")
    v2 = build_config(method="mocov2")
    assert (v2.head_layers, v2.temperature, v2.augment, v2.lr_schedule) == (2, 0.2, "mocov2", "cosine")


def test_explicit_values_win_over_method_defaults():
    assert build_config(method="mocov2", temperature=0.1).temperature == 0.1


@pytest.mark.parametrize("option,value,needle", [
    ("queue_size", -5, "--queue-size"),
    ("queue_size", 0, "--queue-size"),
    ("key_momentum", 1.5, "--key-momentum"),
    ("key_momentum", -0.1, "--key-momentum"),
    ("temperature", 0.0, "--temperature"),
    ("temperature", -1.0, "--temperature"),
    ("batch_size", 102, "--bn-splits"),  # not a multiple of the 4 BN sub-batches
    ("method", "nope", "--method"),
    ("arch", "vgg", "--arch"),
    ("augment", "nope", "--augment"),
    ("lr", 0.0, "--lr"),
    ("compile_views", "yes", "--compile-views"),
])
def test_invalid_values_name_the_option(option, value, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(**{option: value})


def test_presets_load_and_are_valid():
    names = list_presets()
    assert "mocov2-fashion-mnist" in names and "mocov2-imagenet" in names
    for name in names:
        build_config(name)
    imagenet = build_config("mocov2-imagenet")
    assert imagenet.queue_size == 65536 and imagenet.key_momentum == 0.999
    assert imagenet.temperature == 0.2 and imagenet.epochs == 200 and imagenet.lr == 0.03


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="mocov2-imagenet"):
        load_preset("does-not-exist")
