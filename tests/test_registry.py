"""The method registry: options per method, flags generated from them with one meaning each,
flat presets routed, old names and old checkpoint configs still read, and the method contract
(``backbone``, ``momentum_encoder``, ``dictionary``; what ``on_step_end`` needs in ``carry``)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from mocolab.backbones import resnet
from mocolab.cli import main
from mocolab.config import ConfigError, PretrainConfig, build_config, config_from_dict, field_names
from mocolab.methods import (
    BuildContext,
    MethodOptions,
    build_method,
    method_names,
    register_method,
    registry,
)
from mocolab.methods.registry import _REGISTRY, get_method, load_methods

PACKAGE = Path(__file__).resolve().parent.parent / "mocolab"


def test_every_method_module_registers_itself_and_no_central_list_remains():
    names = set(method_names())
    assert names >= {
        "mocov1",
        "mocov2",
        "mocov3",
        "simclr",
        "simclr2",
        "byol",
        "simsiam",
        "instdisc",
        "invaspread",
        "swav",
        "dino",
        "cpc",
        "cmc",
    }
    for path in PACKAGE.rglob("*.py"):  # no tuple of method names outside the method modules
        if path.parent.name == "methods":
            continue
        text = path.read_text()
        assert '"mocov1", "mocov2", "mocov3"' not in text, path
        assert "METHOD_DEFAULTS" not in text, path


def test_a_flag_shared_by_methods_has_one_type_and_one_meaning():
    """Same name → same type and help text (each method keeps its paper's default); no
    method option shadows a run-level one."""
    seen: dict[str, tuple[str, object, str]] = {}
    for spec in load_methods().values():
        for f in dataclasses.fields(spec.options):
            assert f.name not in field_names(), f"{spec.name}.{f.name} shadows a run-level option"
            assert f.metadata.get("help"), f"{spec.name}.{f.name} has no help text"
            if f.name in seen:
                owner, kind, help_ = seen[f.name]
                assert (f.type, f.metadata["help"]) == (kind, help_), (
                    f"--{f.name}: {owner} and {spec.name} give it two meanings"
                )
            else:
                seen[f.name] = (spec.name, f.type, f.metadata["help"])
            assert spec.options().__dict__[f.name] == f.default  # plain defaults, no factories


def test_defaults_are_each_papers():
    dino = build_config(method="dino").options
    assert (
        dino.out_dim,
        dino.temperature,
        dino.teacher_temperature,
        dino.warmup_teacher_temperature,
        dino.center_momentum,
        dino.key_momentum,
        dino.num_local_crops,
    ) == (65536, 0.1, 0.07, 0.04, 0.9, 0.996, 8)
    swav = build_config(method="swav").options
    assert (
        swav.prototypes,
        swav.temperature,
        swav.sinkhorn_epsilon,
        swav.sinkhorn_iterations,
        swav.num_local_crops,
        swav.freeze_prototypes_niters,
    ) == (3000, 0.1, 0.05, 3, 6, 313)
    byol = build_config(method="byol")
    assert (
        byol.dim,
        byol.head_layers,
        byol.options.key_momentum,
        byol.options.momentum_schedule,
    ) == (256, 2, 0.996, "cosine")
    assert build_config(method="mocov3").options.temperature == 1.0
    assert build_config(method="cmc").options.nce_k == 16384


def test_an_option_of_another_method_is_one_clear_error():
    with pytest.raises(
        ConfigError,
        match=r"'queue_size' \(--queue-size\) is not an option of "
        r"--method byol: it is an option of densecl, mocov1, mocov2, nnclr, simclr2",
    ):
        build_config(method="byol", queue_size=64)
    with pytest.raises(ConfigError, match=r"'nope' .* no method has it"):
        build_config(method="mocov2", nope=1)


def test_presets_route_flat_keys_and_a_bad_key_names_it_and_the_method(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("method: swav\nprototypes: 64\nepochs: 2\n")
    cfg = build_config(str(preset))
    assert cfg.options.prototypes == 64 and cfg.epochs == 2
    preset.write_text("method: swav\nqueue_size: 64\n")
    assert main(["pretrain", "--preset", str(preset), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "'queue_size'" in err and "--method swav" in err and "Traceback" not in err


def test_dino_old_names_are_read_with_a_warning():
    with pytest.warns(FutureWarning) as caught:
        cfg = build_config(method="dino", prototypes=64, freeze_prototypes_niters=3)
    assert ["'prototypes' is now 'out_dim'" in str(w.message) for w in caught] == [True, False]
    assert (cfg.options.out_dim, cfg.options.freeze_last_layer_niters) == (64, 3)
    assert "prototypes" not in cfg.to_dict() and cfg.to_dict()["out_dim"] == 64


def test_an_old_flat_checkpoint_config_maps_onto_the_new_configs():
    """A config dict as mocolab 0.1.0 saved it (every method's option, ``None`` where unused):
    other methods' options are dropped, DINO's renamed."""
    old = {
        "method": "dino",
        "data": "synthetic",
        "arch": "resnet18",
        "width": 8,
        "dim": 32,
        "head_layers": 3,
        "queue_size": 4096,
        "key_momentum": 0.99,
        "momentum_schedule": "cosine",
        "temperature": 0.2,
        "shuffle_bn": True,
        "symmetric": False,
        "nce_k": None,
        "loss": None,
        "prototypes": 128,
        "freeze_prototypes_niters": 7,
        "num_local_crops": 2,
        "swav_queue": 0,
        "bank_init": "random",
        "simclr2_memory": False,
        "lr_steps": [0.6, 0.8],
        "crop_scale": None,
    }
    cfg = config_from_dict(old)
    assert (
        cfg.options.out_dim,
        cfg.options.freeze_last_layer_niters,
        cfg.options.key_momentum,
        cfg.options.temperature,
        cfg.options.num_local_crops,
    ) == (128, 7, 0.99, 0.2, 2)
    assert cfg.lr_steps == (0.6, 0.8)
    assert config_from_dict(cfg.to_dict()) == cfg  # the new format round-trips


def test_cli_help_shows_the_methods_own_options_and_plain_help_the_default_methods(capsys):
    def help_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["pretrain", *args, "--help"])
        assert exit_.value.code == 0
        return capsys.readouterr().out

    dino = help_of("--method", "dino")
    assert "dino options" in dino and "--out-dim" in dino and "--teacher-temperature" in dino
    assert "--queue-size" not in dino and "--sinkhorn-epsilon" not in dino and "--epochs" in dino
    plain = help_of()  # the default method's (mocov2's) own options
    assert "--epochs" in plain and "--out-dim" not in plain and "--queue-size" in plain
    assert "mocov2 options" in plain and "dino options" not in plain
    assert "--method NAME --help" in plain and "dino" in plain


def test_a_new_method_is_one_registration():
    """The shortest complete method (README, "Add a method"): registered, built, flagged."""

    @dataclasses.dataclass
    class ToyOptions(MethodOptions):
        temperature: float = registry.temperature(0.5)

    from mocolab.methods import SimCLR

    @register_method(
        "toy-test", options=ToyOptions, defaults={"head_layers": 2, "dim": 16, "augment": "simclr"}
    )
    def build(
        backbone: torch.nn.Module, cfg: PretrainConfig, o: ToyOptions, ctx: BuildContext
    ) -> SimCLR:
        return SimCLR(backbone, dim=cfg.dim, head_layers=cfg.head_layers, temperature=o.temperature)

    try:
        cfg = build_config(method="toy-test", temperature=0.3, width=8, stem="compact")
        model = build_method(cfg, 1, "compact")
        assert isinstance(model, SimCLR) and model.temperature == 0.3 and cfg.augment == "simclr"
        assert get_method("toy-test").option_names() == ["temperature"]
    finally:
        del _REGISTRY["toy-test"]


def _tiny(name: str):
    torch.manual_seed(0)
    backbone = resnet("resnet18", in_channels=1, stem="compact", width=4)
    small = {"dim": 8, "hidden_dim": 16}
    if name == "dino":
        small.update(out_dim=12, num_local_crops=0)
    cfg = (
        build_config(method=name, width=4, stem="compact", queue_size=16, **small)
        if name in ("mocov2",)
        else build_config(method=name, width=4, stem="compact", **small)
    )
    return get_method(name).build(backbone, cfg, cfg.options, BuildContext(num_images=32))


@pytest.mark.parametrize(
    "name,part",
    [
        ("mocov2", "key_encoder"),
        ("mocov3", "key_encoder"),
        ("byol", "target_encoder"),
        ("dino", "teacher_encoder"),
        ("simclr", None),
        ("simsiam", None),
    ],
)
def test_momentum_encoder_is_the_papers_part(name, part):
    model = _tiny(name)
    assert model.momentum_encoder is (getattr(model, part) if part else None)
    assert model.backbone is model.query_encoder.backbone


@pytest.mark.parametrize(
    "name,part", [("mocov2", "queue"), ("instdisc", "memory_bank"), ("byol", None)]
)
def test_dictionary_is_the_papers_part(name, part):
    model = _tiny(name)
    assert model.dictionary is (getattr(model, part) if part else None)


def test_no_hidden_state_between_forward_and_on_step_end():
    """What on_step_end needs travels in the output: two forwards, then the first output's
    step end enqueues the first output's keys."""
    model = _tiny("mocov2").train()
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 1, 16, 16, generator=g) for _ in range(2)]
    first = model(views)
    model(list(reversed(views)))
    before = set(vars(model))
    model.on_step_end(first, 0, 10)
    torch.testing.assert_close(model.queue.ordered()[-4:], first.carry["keys"])
    assert set(vars(model)) == before
    assert not any(
        k in vars(model) for k in ("_keys", "_index", "_teacher_out", "_features", "_pending")
    )


def test_diagnostics_measure_byol_and_dino_key_agreement():
    from mocolab.augment import ViewGenerator, recipe
    from mocolab.evaluate.diagnostics import training_diagnostics

    images = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    view = ViewGenerator(recipe("simclr", 16, mean=(0.5,), std=(0.5,)))
    for name in ("byol", "dino"):
        out = training_diagnostics(
            _tiny(name), images, [view], size=16, mean=(0.5,), std=(0.5,), seed=0, max_images=8
        )
        assert out["diag_key_agreement"] == pytest.approx(1.0, abs=1e-4)  # θ_target = θ at start


def test_the_add_a_method_example_trains(tmp_path):
    """The "Add a method" example (examples/custom_method.py, shown in the docs' "Add a method"
    page), as written there: registered by importing the user's own file, then a step of
    pretraining through the one loop."""
    import importlib.util

    from mocolab.train import pretrain

    path = PACKAGE.parent / "examples" / "custom_method.py"
    spec = importlib.util.spec_from_file_location("users_own_plainclr", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        cfg = build_config(
            method="plainclr",
            temperature=0.2,
            data="synthetic",
            width=8,
            stem="compact",
            batch_size=16,
            bn_splits=1,
            epochs=1,
            max_steps=2,
            progress=False,
            threads=1,
            diagnostics_every=0,
            out_dir=str(tmp_path),
            run_name="r",
        )
        assert cfg.augment == "simclr" and cfg.options.temperature == 0.2
        assert pretrain(cfg, final_eval=False)["step"] == 2
    finally:
        sys.modules.pop(spec.name, None)
        _REGISTRY.pop("plainclr", None)


def test_a_preset_of_another_method_keeps_only_what_the_chosen_method_has():
    """An ablation's shared base: mocov2-imagenet run as SimCLR drops MoCo's own options (the
    queue, m) and keeps the run-level ones and the options both have (τ); a flag stays strict."""
    cfg = build_config("mocov2-imagenet", method="simclr")
    assert cfg.method == "simclr" and cfg.epochs == 200 and cfg.options.temperature == 0.2
    assert "queue_size" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="'queue_size'"):
        build_config("mocov2-imagenet", method="simclr", queue_size=64)
