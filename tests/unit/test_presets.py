"""configs/*.yaml: every preset loads, matches the registry, and bad files are refused."""

import pytest

from megatron_alp.presets import available_presets, load_preset
from megatron_alp.rl.losses import policy_loss_config

PAPER = ["grpo", "gspo", "seq-bypass", "token-tis", "seq-tis", "token-mis", "seq-mis",
         "token-alp", "seq-alp", "cum-token-alp"]


def test_every_paper_method_has_a_preset():
    assert set(PAPER) <= set(available_presets())


@pytest.mark.parametrize("name", PAPER)
def test_preset_matches_registry(name):
    p = load_preset(name)
    assert p.policy_loss.ratio_level == policy_loss_config(name).ratio_level
    assert p.policy_loss.denominator == policy_loss_config(name).denominator
    assert p.alp.enabled == name.endswith("alp")
    assert p.advantage_estimator == "grpo"


def test_paper_values():
    tok = load_preset("token-alp")
    assert (tok.alp.init_std, tok.alp.lr, tok.policy_loss.kl_coef) == (0.02, 1e-2, 0.001)
    assert (tok.policy_loss.clip_low, tok.policy_loss.clip_high) == (0.5, 3.0)
    seq = load_preset("seq-alp")
    assert (seq.alp.init_std, seq.alp.lr, seq.policy_loss.dual_clip_c) == (1e-6, 5e-4, 3.0)
    assert load_preset("grpo").policy_loss.clip_high == 0.28


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'; available: .*token-alp"):
        load_preset("nope")
    f = tmp_path / "x.yaml"
    f.write_text("policy_loss: {preset: token-alp, clip_hi: 2}\n")
    with pytest.raises(ValueError, match=r"x.yaml: policy_loss: unknown key\(s\) \['clip_hi'\]"):
        load_preset(f)
    f.write_text("policy_loss: {preset: grpo}\nalp: {enabled: true}\n")
    with pytest.raises(ValueError, match="alp.enabled=True but policy_loss perturbation='off'"):
        load_preset(f)
    f.write_text("policy_loss: {preset: token-alp}\nalp: {init_std: -1}\n")
    with pytest.raises(ValueError, match="init_std"):
        load_preset(f)
    f.write_text("policy_loss: {preset: grpo}\nadvantages: {estimator: ppo}\n")
    with pytest.raises(ValueError, match="advantages.estimator='ppo'"):
        load_preset(f)
    f.write_text("optimizer: {}\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optimizer'\]"):
        load_preset(f)
