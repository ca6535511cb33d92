"""Config per family: a family's own section is valid only for it, and every record round-trips."""

from __future__ import annotations

import pytest
import yaml

from scratchlab.cli import main
from scratchlab.config import (
    FAMILY_SECTIONS,
    CascadeConfig,
    CodecConfig,
    ModelConfig,
    build_config,
    config_record,
    load_config,
    preset_names,
    to_yaml,
)
from scratchlab.errors import UserError
from scratchlab.families.registry import FAMILIES


def test_codec_setting_on_an_lm_config_is_one_line_and_exit_2(capsys):
    assert main(["config", "show", "tiny-lm", "model.codec.pattern=dia"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "error: model.codec is only valid for model.family=codec_lm (this config has model.family=lm); "
        "remove it or set model.family\n"
    )


@pytest.mark.parametrize(("preset", "override", "owner", "family"), [
    ("musicgen-tiny", "model.cascade.n_stages=3", "cascade", "codec_lm"),
    ("cascade-tiny", "model.codec.n_codebooks=4", "codec_lm", "cascade"),
    ("tiny-lm", "model.cascade.recon=l1", "cascade", "lm"),
])
def test_every_foreign_section_is_refused(preset, override, owner, family):
    section = override.split(".")[1]
    with pytest.raises(UserError) as info:
        load_config(preset, [override])
    assert str(info.value) == (
        f"model.{section} is only valid for model.family={owner} (this config has model.family={family}); "
        "remove it or set model.family"
    )


def test_switching_family_by_override_fills_the_new_family_section():
    cfg = load_config("tiny-lm", ["model.family=codec_lm", "model.codec.pattern=dia"])
    assert cfg.model.codec is not None and cfg.model.codec.pattern == "dia"
    assert cfg.model.cascade is None
    cfg = load_config("tiny-lm", ["model.family=cascade"])
    assert cfg.model.cascade == CascadeConfig() and cfg.model.codec is None


def test_a_family_gets_its_section_with_defaults_and_others_none():
    assert ModelConfig().codec is None and ModelConfig().cascade is None
    assert ModelConfig(family="codec_lm").codec == CodecConfig()
    assert ModelConfig(family="cascade").cascade == CascadeConfig()


def test_did_you_mean_follows_the_optional_sections(capsys):
    assert main(["config", "show", "musicgen-tiny", "model.codec.patern=dia"]) == 2
    assert capsys.readouterr().err == "error: unknown config key 'model.codec.patern'; did you mean 'model.codec.pattern'?\n"
    with pytest.raises(UserError, match=r"'model\.cascade\.n_stage'; did you mean 'model\.cascade\.n_stages'\?"):
        load_config("cascade-tiny", ["model.cascade.n_stage=3"])


def test_unknown_family_is_one_line_with_a_guess(capsys):
    assert main(["config", "show", "tiny-lm", "model.family=codec-lm"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown model.family 'codec-lm'; did you mean 'codec_lm'? known: cascade, codec_lm, lm\n"
    )


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_round_trips_through_its_record(preset):
    cfg = load_config(preset)
    text = to_yaml(cfg)
    again = build_config(yaml.safe_load(text))
    assert again == cfg
    assert to_yaml(again) == text
    model = yaml.safe_load(text)["model"]
    for section, owner in FAMILY_SECTIONS.items():  # only the run's own family section is written
        assert (section in model) == (cfg.model.family == owner)
        assert (getattr(cfg.model, section) is not None) == (cfg.model.family == owner)


def test_codec_and_cascade_presets_keep_their_settings():
    dia = load_config("dia-tiny").model.codec
    assert dia is not None and dia.pattern == "dia"
    musicgen = load_config("musicgen-tiny").model.codec
    assert musicgen is not None and musicgen.pattern == "musicgen"
    cascade = load_config("cascade-tiny").model.cascade
    assert cascade is not None and cascade.n_stages == len(cascade.residual_weights)


@pytest.mark.parametrize("preset", ["tiny-lm", "musicgen-tiny", "cascade-tiny"])
def test_records_of_older_versions_still_load(preset):
    # Before sections were per-family, to_yaml wrote every section with its defaults.
    cfg = load_config(preset)
    raw = cfg.model_dump(mode="json")
    raw["model"]["codec"] = raw["model"]["codec"] or CodecConfig().model_dump(mode="json")
    raw["model"]["cascade"] = raw["model"]["cascade"] or CascadeConfig().model_dump(mode="json")
    assert build_config(raw) == cfg
    # ... but a non-default setting in another family's section is still refused
    raw["model"]["codec" if cfg.model.family != "codec_lm" else "cascade"]["n_features" if cfg.model.family
                                                                           == "codec_lm" else "frame_rate"] = 5
    with pytest.raises(UserError, match="is only valid for model.family="):
        build_config(raw)


def test_the_registry_names_the_same_sections():
    assert {spec.config_section: name for name, spec in FAMILIES.items() if spec.config_section} == {
        section: owner for section, owner in FAMILY_SECTIONS.items()
    }
    for name, spec in FAMILIES.items():
        assert spec.name == name


def test_the_trackers_get_the_same_record_as_config_yaml():
    for preset in ("tiny-lm", "musicgen-tiny", "cascade-tiny"):
        cfg = load_config(preset)
        assert config_record(cfg) == yaml.safe_load(to_yaml(cfg))


def test_assigning_the_family_gives_its_section_as_a_section():
    cfg = load_config("tiny-lm")
    cfg.model.family = "codec_lm"
    assert cfg.model.codec == CodecConfig()
    with pytest.raises(ValueError, match="model.cascade is only valid for model.family=cascade"):
        cfg.model.cascade = CascadeConfig()
