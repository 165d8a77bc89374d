"""The Vim checkpoint importer and exporter (adaptor_jax/convert/vim.py): the official key
inventory, exact round trips, the command line, named errors, the stride-8 presets, and the
official model's logits on a micro model.

The fixtures were made once, outside CI, from the official code (github hustvl/Vim:
vim/models_mamba.py with its mamba-1p1p1 mamba_ssm, bimamba_type="v2"), run on CPU in torch with
its compiled kernels replaced by the references the same code ships (selective_scan_ref for
selective_scan_cuda.fwd, F.conv1d for causal_conv1d_cuda, rms_norm_ref for the Triton fused
add + RMSNorm):
  vim_tiny_keys.json      key -> shape of the state_dict of
                          vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_
                          midclstok_div2() (torch.manual_seed(0)), in the official order.
  vim_micro_official.npz  VisionMamba with that factory's flags at embed_dim 8, depth 2,
                          img_size 20, patch 8, stride 4 (4x4 patches), 10 classes:
                          torch.manual_seed(0) init plus noise on every tensor, eval mode, fp32;
                          its state dict ("sd/<key>"), two N(0, 1) images "x" (NCHW) and its
                          "logits".
At full size, vim_tiny, vim_small and vim_tiny_stride8 gave logits within 1.2e-6 of the
official ones after the import (see the README).
"""
import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

import convert_cases as cc
from adaptor_jax.convert import vim as cv
from adaptor_jax.models import registry

SHAPES = cc.official_shapes("vim_tiny_keys.json")


def abstract(name="vim_tiny"):
  return cc.abstract(name)


@functools.cache
def refused_into():
  """One abstract vim_tiny for the tests whose import is refused (before any param is set)."""
  return abstract()


def random_state_dict(seed=0, **shapes):
  return cc.random_state_dict({**SHAPES, **shapes}, seed)


def test_layout_is_the_official_vim_tiny_inventory():
  cc.assert_layout_is(cv, abstract(), SHAPES)


def test_round_trip_is_exact(tmp_path):
  cc.assert_round_trips(cv, "vim_tiny", random_state_dict(), tmp_path / "ckpt")


def test_command_line_import_then_export(tmp_path):
  cc.command_line(cv, "vim_tiny", random_state_dict(seed=1), tmp_path)


@pytest.mark.parametrize("change, message", [
    # missing, unexpected, mis-shaped
    (lambda sd: sd.pop("layers.23.mixer.A_b_log"), "missing keys ['layers.23.mixer.A_b_log']"),
    (lambda sd: sd.update({"layers.0.mixer.x_proj.bias": np.zeros(44)}),
     "unexpected keys ['layers.0.mixer.x_proj.bias']"),
    (lambda sd: sd.update({"layers.5.mixer.conv1d_b.weight": np.zeros((384, 1, 3))}),
     "key 'layers.5.mixer.conv1d_b.weight' has shape (384, 1, 3), this model's is (384, 1, 4)"),
    (lambda sd: sd.update({"cls_token": np.zeros(192)}),
     "key 'cls_token' has shape (192,), this model's is (1, 1, 192)"),
    (lambda sd: sd.update({"pos_embed": np.zeros((1, 730, 192))}),
     "key 'pos_embed' has shape (1, 730, 192), this model's is (1, 197, 192) (14x14 patches + "
     "the cls token against the checkpoint's 27x27 patches + the cls token"),
    # keys of official variants our Vim cannot represent
    (lambda sd: sd.update({"rope.freqs_cos": np.zeros((196, 96))}),
     "keys ['rope.freqs_cos'] (1 in all) are from an official variant this model cannot "
     "represent: rotary position embeddings"),
    (lambda sd: sd.update({f"layers.{i}.norm.bias": np.zeros(192) for i in range(24)}),
     "keys ['layers.0.norm.bias', 'layers.1.norm.bias', 'layers.2.norm.bias', "
     "'layers.3.norm.bias', 'layers.4.norm.bias'] ... (24 in all) are from an official variant "
     "this model cannot represent: LayerNorm"),
    (lambda sd: sd.update({"cls_token_head": np.zeros((1, 1, 192))}), "two cls tokens"),
])
def test_mismatches_name_the_key(change, message):
  state_dict = random_state_dict()
  change(state_dict)
  with pytest.raises(ValueError) as e:
    cv.from_state_dict(refused_into(), state_dict)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_stride8_preset_takes_its_own_pos_embed():
  state_dict = random_state_dict(seed=2, pos_embed=(1, 27 * 27 + 1, 192))
  model = abstract("vim_tiny_stride8")
  cv.from_state_dict(model, state_dict)
  np.testing.assert_array_equal(model.pos_embed.get_value(), state_dict["pos_embed"][0])
  cc.assert_same(cv.to_state_dict(model), state_dict)
  with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 197, 192\), this model's is "
                     r"\(1, 730, 192\) \(27x27 patches"):
    cv.from_state_dict(abstract("vim_tiny_stride8"), random_state_dict())


def test_imported_micro_model_gives_the_official_logits():
  with np.load(os.path.join(cc.FIXTURES, "vim_micro_official.npz")) as f:
    official = {k[len("sd/"):]: f[k] for k in f.files if k.startswith("sd/")}
    x, want = f["x"], f["logits"]
  model = registry.create_model("vim_tiny", num_classes=10, rngs=nnx.Rngs(0), embed_dim=8,
                                depth=2, patch_size=8, stride=4, image_size=20,
                                scan_backend="xla")
  cv.from_state_dict(model, official)
  model.eval()
  got = np.asarray(model(jax.numpy.asarray(x.transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
