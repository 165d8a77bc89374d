"""Parity of the VMamba UperNet importer (adaptor_jax/convert/upernet.py) with the official model:
outside CI, once, on CPU, fp32, random weights. Not a test (pytest collects test_*.py only).

The official model is VMamba's own: mmsegmentation 1.2.2's EncoderDecoder built by mmengine from
VMamba's config segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py (and the
Swin / UperNet bases it inherits), its backbone MM_VSSM registered by VMamba's segmentation/
model.py (Backbone_VSSM of classification/models/vmamba.py), with UPerHead, FCNHead and mmcv's
ConvModule / SyncBN (in eval: running statistics). CPU stand-ins, none of them in the model's
arithmetic: mmcv-lite (no compiled ops: `mmcv.ops`, which neither head uses, is an empty module),
mmdet's registry (model.py registers MM_VSSM there too) a no-op, VMamba's cross-scan / cross-merge
called as its pure-torch autograd functions (its dispatcher enters torch.cuda.device, which needs
CUDA), and its selective scan the pure-torch selective_scan_torch it falls back to without its
CUDA kernels. Every param is perturbed, BatchNorm's running statistics randomised.

It then (1) saves the state dict as mmengine does ({"meta", "state_dict", "message_hub" with
mmengine's HistoryBuffer, "optimizer"}: a file torch's weights_only load refuses as is);
(2) imports it with the command line (`python -m adaptor_jax.convert.upernet --checkpoint=...pth
--model=upernet_vmamba_tiny --output=DIR`) and loads DIR with adaptor_jax.load_model; (3) compares
the decode head's logits (eval, 1/4 of the input) and the auxiliary head's (1/16) with the
official ones; (4) checks Hugging Face transformers' UperNetHead / UperNetFCNHead with the same
weights against mmseg's heads (keys mapped: conv_seg -> classifier, bn -> batch_norm); (5) exports
DIR with `--export` and loads it into a fresh official model with strict=True: every tensor and
the logits must equal the original's exactly (num_batches_tracked aside: we write 0).
--write_fixture writes tests/fixtures/upernet_vmamba_tiny_keys.json (key -> shape, in order) from
the official model's state dict (150 classes).

Run (the torch side in its own venv, appended to sys.path after this project's .venv):
  python3 -m venv /tmp/parity && /tmp/parity/bin/pip install torch transformers einops timm \
      fvcore mmengine mmcv-lite==2.1.0 mmsegmentation==1.2.2 ftfy regex
  .venv/bin/python tests/parity_upernet.py --torch_site=/tmp/parity/lib/python3.11/site-packages \
      --vmamba_git=/work/.mirror/MzeroMiko+VMamba/repo [--write_fixture]
It printed (torch 2.14.1, mmseg 1.2.2, mmcv-lite 2.1.0, mmengine 0.10.7, transformers 5.25.0,
VMamba 2ed52ead062a51a64521ed3871d52914bf532876; 2 CPU cores, 2 min 15 s):
  torch 2.14.1+cu130, VMamba 2ed52ead062a51a64521ed3871d52914bf532876: official UperNet-T, 362
        tensors, 61,902,572 params
  wrote /work/main/tests/fixtures/upernet_vmamba_tiny_keys.json
  the mmengine-style checkpoint: torch.load(weights_only=True) refuses it: Weights only load
        failed. This file can still be loaded, to do so you have two options, [...
  wrote TMP/ours: upernet_vmamba_tiny, 362 tensors, 150 classes
  load_model: upernet_vmamba_tiny, 150 classes
  1x3x128x128 backbone features (outnorm0-3): max |ours - official| 4.8e-06, 4.9e-06, 6.8e-06,
        8.0e-06
  1x3x128x128 decode logits (1, 150, 32, 32): max |ours - official| 3.86e-05, max |logit| 25.675;
        transformers' head vs mmseg's 0.00e+00
  1x3x128x128 aux    logits (1, 150, 8, 8): max |ours - official| 5.81e-06, max |logit| 4.036;
        transformers' head vs mmseg's 0.00e+00
  1x3x128x192 backbone features (outnorm0-3): max |ours - official| 4.2e-06, 4.6e-06, 5.7e-06,
        9.5e-06
  1x3x128x192 decode logits (1, 150, 32, 48): max |ours - official| 4.15e-05, max |logit| 24.427;
        transformers' head vs mmseg's 0.00e+00
  1x3x128x192 aux    logits (1, 150, 8, 12): max |ours - official| 5.13e-06, max |logit| 3.856;
        transformers' head vs mmseg's 0.00e+00
  1x3x512x512 backbone features (outnorm0-3): max |ours - official| 5.2e-06, 7.2e-06, 7.6e-06,
        1.0e-05
  1x3x512x512 decode logits (1, 150, 128, 128): max |ours - official| 4.01e-05, max |logit|
        25.025; transformers' head vs mmseg's 0.00e+00
  1x3x512x512 aux    logits (1, 150, 32, 32): max |ours - official| 6.68e-06, max |logit| 4.214;
        transformers' head vs mmseg's 0.00e+00
  wrote TMP/export.pth
  export: 362 tensors equal to the official ones (num_batches_tracked 0), loaded with strict=True;
        logits identical
  upernet_vmamba_small: our layout is the official inventory (488 keys, 81,801,260 params)
  upernet_vmamba_base: our layout is the official inventory (488 keys, 122,069,292 params)
  worst |ours - official| 4.15e-05 (tolerance 0.0001)
"""
import argparse
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import tarfile
import tempfile
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py"
TOLERANCE = 1e-4


def extract_vmamba(git_dir, commit, into):
  """VMamba's classification/models and segmentation/ (configs, model.py) at `commit`."""
  tar = subprocess.run(["git", f"--git-dir={git_dir}", "archive", commit,
                        "classification/models", "segmentation/model.py", "segmentation/configs"],
                       check=True, capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(tar)) as t:
    t.extractall(into, filter="data")
  return subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", commit], check=True,
                        capture_output=True, text=True).stdout.strip()


def cpu_stand_ins():
  """mmcv.ops (compiled, absent from mmcv-lite; neither head uses it) and mmdet.registry."""
  ops = types.ModuleType("mmcv.ops")
  ops.__path__, ops.__file__ = [], "/nonexistent/mmcv/ops/__init__.py"

  def missing(name):
    if name.startswith("__"):
      raise AttributeError(name)
    return type(name, (), {})
  ops.__getattr__ = missing
  registry = types.ModuleType("mmdet.registry")
  registry.MODELS = types.SimpleNamespace(register_module=lambda *a, **k: (lambda c: c))
  sys.modules.update({"mmcv.ops": ops, "mmdet": types.ModuleType("mmdet"),
                      "mmdet.registry": registry})


def official_model(src, config=CONFIG):
  """VMamba's UperNet (T by default), as mmseg builds it from VMamba's config, in eval mode."""
  from mmengine.config import Config  # noqa: PLC0415
  from mmseg.registry import MODELS  # noqa: PLC0415
  from mmseg.utils import register_all_modules  # noqa: PLC0415
  register_all_modules()
  if "models.vmamba" not in sys.modules:
    runpy.run_path(os.path.join(src, "segmentation/model.py"), run_name="vmamba_segmentation")
    vm, csm = sys.modules["models.vmamba"], sys.modules["models.csm_triton"]
    vm.cross_scan_fn = lambda x, in_channel_first=True, out_channel_first=True, one_by_one=False, \
        scans=0, force_torch=False: csm.CrossScanF.apply(x, in_channel_first, out_channel_first,
                                                         one_by_one, scans)
    vm.cross_merge_fn = lambda y, in_channel_first=True, out_channel_first=True, one_by_one=False, \
        scans=0, force_torch=False: csm.CrossMergeF.apply(y, in_channel_first, out_channel_first,
                                                          one_by_one, scans)
    assert not sys.modules["models.csms6s"].WITH_SELECTIVESCAN_OFLEX  # selective_scan_torch
  cfg = Config.fromfile(os.path.join(src, config))
  cfg.model.backbone.pretrained = None   # "" in the config: a failed load it prints and ignores
  return MODELS.build(cfg.model).eval()


def perturb(model, torch, seed=0):
  g = torch.Generator().manual_seed(seed)
  randn = lambda t: torch.randn(t.shape, generator=g)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(randn(p) * (0.02 if p.ndim >= 2 else 0.1))
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(randn(b) * 0.1)
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=g) * 1.5)
      elif name.endswith("num_batches_tracked"):
        b.fill_(160000)


def mmengine_checkpoint(state_dict, torch):
  """What mmengine's runner saves (the keys beside the state dict, a HistoryBuffer in them)."""
  from mmengine.logging import HistoryBuffer  # noqa: PLC0415
  loss = HistoryBuffer()
  loss.update(0.5)
  return {"meta": {"mmengine_version": "0.10.3", "iter": 160000, "seed": np.int64(0),
                   "dataset_meta": {"classes": ("wall", "building"), "palette": [[1, 2, 3]]}},
          "state_dict": state_dict,
          "message_hub": {"log_scalars": {"train/loss": loss}, "runtime_info": {"iter": 160000}},
          "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}}


def hf_heads(mm_state_dict, torch):
  """transformers' UperNetHead / UperNetFCNHead holding the official heads' weights."""
  from transformers.models.upernet.modeling_upernet import (  # noqa: PLC0415
      UperNetFCNHead, UperNetHead)
  config = types.SimpleNamespace(pool_scales=[1, 2, 3, 6], hidden_size=512, num_labels=150,
                                 auxiliary_in_channels=384, auxiliary_channels=256,
                                 auxiliary_num_convs=1, auxiliary_concat_input=False)
  heads = {"decode_head": UperNetHead(config, in_channels=[96, 192, 384, 768]),
           "auxiliary_head": UperNetFCNHead(config, in_channels=[96, 192, 384, 768])}
  for prefix, head in heads.items():
    head.load_state_dict({
        k[len(prefix) + 1:].replace("conv_seg", "classifier").replace(".bn.", ".batch_norm."): v
        for k, v in mm_state_dict.items() if k.startswith(prefix + ".")}, strict=True)
    head.eval()
  return heads


def run_cli(torch_site, *args):
  """python -m adaptor_jax.convert.upernet ARGS, with torch importable."""
  code = ("import sys; from adaptor_jax.convert import state_dict, upernet; "
          f"sys.path.append({torch_site!r}); state_dict.cli(upernet)")
  done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout.strip()


def ours(model, x_nchw):
  """Our (decode logits, aux logits), NCHW."""
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  @nnx.jit
  def forward(m, x):
    features = [norm(f) for norm, f in zip(m.outnorms, m.backbone(x, return_features=True))]
    return m(x), m.auxiliary_head(features[m.aux_stage]), features
  logits, aux, features = forward(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
  return nchw(logits), nchw(aux), [nchw(f) for f in features]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_site", required=True, help="site-packages of the torch venv")
  parser.add_argument("--vmamba_git", required=True, help="a git dir of MzeroMiko/VMamba")
  parser.add_argument("--commit", default="2ed52ead062a51a64521ed3871d52914bf532876")
  parser.add_argument("--sizes", default="128x128,128x192,512x512", help="HxW,... of the inputs")
  parser.add_argument("--write_fixture", action="store_true")
  args = parser.parse_args()
  # Ours first: the torch venv has a `kernels` package of its own (Hugging Face's), which the
  # editable install's finder would come after.
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from adaptor_jax.convert import state_dict as sd, upernet  # noqa: PLC0415
  from adaptor_jax.models import registry  # noqa: PLC0415
  from adaptor_jax.training import loader  # noqa: PLC0415
  sys.path.append(args.torch_site)   # after this venv's packages: jax, numpy, ... stay ours
  cpu_stand_ins()
  import torch  # noqa: PLC0415
  torch.set_num_threads(2)
  work = tempfile.mkdtemp(prefix="parity_upernet_")
  commit = extract_vmamba(args.vmamba_git, args.commit, work)
  torch.manual_seed(0)   # the official init, perturbed below
  with contextlib.redirect_stdout(sys.stderr):  # VMamba prints its missing CUDA kernels
    model = official_model(work)
  perturb(model, torch)
  state_dict = model.state_dict()
  print(f"torch {torch.__version__}, VMamba {commit}: official UperNet-T, {len(state_dict)} "
        f"tensors, {sum(p.numel() for p in model.parameters()):,} params")
  if args.write_fixture:
    path = os.path.join(REPO, "tests", "fixtures", "upernet_vmamba_tiny_keys.json")
    with open(path, "w") as f:
      f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {list(v.shape)}"
                                 for k, v in state_dict.items()) + "\n}\n")
    print(f"wrote {path}")

  pth = os.path.join(work, "upernet_vssm_tiny.pth")
  torch.save(mmengine_checkpoint(state_dict, torch), pth)
  try:
    torch.load(pth, weights_only=True)
    refused = "reads it"
  except Exception as e:  # noqa: BLE001
    refused = f"refuses it: {str(e).splitlines()[0][:90]}..."
  print(f"the mmengine-style checkpoint: torch.load(weights_only=True) {refused}")
  converted = os.path.join(work, "ours")
  print(run_cli(args.torch_site, f"--checkpoint={pth}", "--model=upernet_vmamba_tiny",
                f"--output={converted}"))
  jax_model, config = loader.load_model(converted)
  print(f"load_model: {config.model}, {config.num_classes} classes")
  hf = hf_heads(state_dict, torch)

  worst = 0.0
  g = torch.Generator().manual_seed(1)
  for size in args.sizes.split(","):
    h, w = map(int, size.split("x"))
    x = torch.randn((1, 3, h, w), generator=g)
    with torch.no_grad():
      features = model.backbone(x)
      want = [model.decode_head(features), model.auxiliary_head(features)]
      hf_out = [hf["decode_head"](features), hf["auxiliary_head"](features)]
    *got, got_features = ours(jax_model, x.numpy())
    print(f"1x3x{h}x{w} backbone features (outnorm0-3): max |ours - official| " + ", ".join(
        f"{np.abs(a - b.numpy()).max():.1e}" for a, b in zip(got_features, features)))
    for name, a, b, c in zip(("decode", "aux"), got, want, hf_out):
      b, c = b.numpy(), c.numpy()
      assert a.shape == b.shape, (a.shape, b.shape)
      diff = float(np.abs(a - b).max())
      worst = max(worst, diff)
      print(f"1x3x{h}x{w} {name:6s} logits {tuple(b.shape)}: max |ours - official| {diff:.2e}, "
            f"max |logit| {np.abs(b).max():.3f}; transformers' head vs mmseg's "
            f"{np.abs(c - b).max():.2e}")

  out = os.path.join(work, "export.pth")
  print(run_cli(args.torch_site, "--export", f"--input={converted}", f"--checkpoint={out}"))
  exported = torch.load(out, map_location="cpu", weights_only=True)
  assert list(exported) == ["state_dict"], list(exported)
  exported = exported["state_dict"]
  assert list(exported) == list(state_dict)
  for k, v in state_dict.items():
    if k.endswith("num_batches_tracked"):
      assert exported[k].dtype == torch.int64 and int(exported[k]) == 0, k
    else:
      assert torch.equal(exported[k], v), k
  fresh = official_model(work)
  fresh.load_state_dict(exported, strict=True)
  with torch.no_grad():
    x = torch.randn((1, 3, 64, 96), generator=g)
    same = all(torch.equal(a, b) for a, b in zip(
        (fresh.decode_head(fresh.backbone(x)), fresh.auxiliary_head(fresh.backbone(x))),
        (model.decode_head(model.backbone(x)), model.auxiliary_head(model.backbone(x)))))
  print(f"export: {len(exported)} tensors equal to the official ones (num_batches_tracked 0), "
        f"loaded with strict=True; logits {'identical' if same else 'DIFFER'}")
  for size in ("small", "base"):  # the other presets: key inventories only
    with contextlib.redirect_stdout(sys.stderr):
      official = official_model(work, CONFIG.replace("_tiny.py", f"_{size}.py")).state_dict()
    abstract = nnx.eval_shape(lambda: registry.create_model(  # noqa: B023
        f"upernet_vmamba_{size}", num_classes=150, rngs=nnx.Rngs(0)))
    variables = sd._variables(abstract)  # noqa: SLF001
    layout = {key: () if path is None else
              tuple(jax.eval_shape(to_theirs, variables[path].get_value()).shape)
              for key, path, (_, to_theirs) in upernet.layout(abstract)}
    assert list(layout.items()) == [(k, tuple(v.shape)) for k, v in official.items()], size
    params = sum(v.numel() for k, v in official.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(f"upernet_vmamba_{size}: our layout is the official inventory ({len(official)} keys, "
          f"{params:,} params)")
  print(f"worst |ours - official| {worst:.2e} (tolerance {TOLERANCE:g})")
  assert same and worst < TOLERANCE


if __name__ == "__main__":
  main()
