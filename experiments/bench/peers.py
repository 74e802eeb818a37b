"""The published peers that ``python -m experiments.bench layers`` times next to lcm's layers:
how each is built at lcm's config, and how a torch peer's fwd+bwd is called.

  * ``mamba2_jax``: the pure-JAX ``mamba2-jax`` ``Mamba2Mixer`` (PyPI ``mamba2-jax``) at
    mamba2's config (d_model, d_state, head_dim, chunk, expand, d_conv 4, ngroups 1).
  * ``titans_pytorch``: the PyTorch ``titans-pytorch``
    ``NeuralMemory(dim=d_model, chunk_size, heads)`` (``loss.backward()``, torch limited to
    the cores JAX uses); the named constructor defaults to ``dim_head = dim``, i.e. 4x wider
    heads than lcm's, and memory-MLP expansion 4.
  * ``titans_pytorch_matched``: the same peer matched to lcm's ``titans_lmm``
    (``dim_head = d_model / heads`` and the memory MLP's depth and expansion).

The peers are optional (``pip install -e '.[bench]'`` or ``make bench``): a peer that is not
installed is reported as such, never imported at module import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
from flax import nnx

from experiments.bench import common
from lcm import registry

# Peers: PyPI distribution -> import name. Installed by the `bench` extra, never required.
LAYER_PEERS = {"mamba2-jax": "mamba2_jax", "titans-pytorch": "titans_pytorch"}
# Each peer series and the lcm series it is compared with (and drawn in the colour of).
COUNTERPART = {"mamba2_jax": "mamba2", "titans_pytorch": "titans_lmm",
               "titans_pytorch_matched": "titans_lmm"}


def peer_installed(dist: str) -> bool:
  """Whether the PyPI distribution ``dist`` (a key of ``LAYER_PEERS``) can be imported."""
  return importlib.util.find_spec(LAYER_PEERS[dist]) is not None


def peer_series(*, d_model, d_state, head_dim, expand, chunk_size, titans_heads,
                titans_chunk, peer_lengths, titans_lengths, peers):
  """``{key: spec}`` for ``mamba2_jax``, ``titans_pytorch`` and ``titans_pytorch_matched``
  (the spec format of ``experiments.bench.layers``: ``{"status": why}`` when not timed,
  else ``kind``, ``lengths`` and ``build() -> (module, call, info)``). ``peers``: True
  (every installed peer), False, or a collection of PyPI names (``LAYER_PEERS``)."""
  series = {}
  selected = set(LAYER_PEERS) if peers is True else set(peers or ())

  def missing(dist):
    if dist not in selected:
      return {"status": "not timed (peer not selected)"}
    if not peer_installed(dist):
      return {"status": f"not installed ({dist}): pip install -e '.[bench]' or make bench"}
    return None

  series["mamba2_jax"] = missing("mamba2-jax")
  if series["mamba2_jax"] is None:
    def build_mamba2_jax():
      import mamba2_jax  # pylint: disable=g-import-not-at-top
      cfg = dict(hidden_size=d_model, state_size=d_state, head_dim=head_dim,
                 chunk_size=chunk_size, expand=expand, conv_kernel=4, num_hidden_layers=1)
      module = mamba2_jax.Mamba2Mixer(mamba2_jax.Mamba2Config(**cfg), layer_idx=0,
                                      rngs=nnx.Rngs(0))
      info = {"source": f"mamba2_jax {mamba2_jax.__version__}: Mamba2Mixer(Mamba2Config("
                        f"**config), layer_idx=0)",
              "config": {**cfg, "n_groups": "1 (fixed by the package)"}}
      return module, lambda m, x: m(x)[0], info
    series["mamba2_jax"] = {"kind": "jax", "lengths": list(peer_lengths),
                            "build": build_mamba2_jax}

  # The matched peer: lcm's head width and memory-MLP shape (titans_lmm's Config when
  # registered, else the package's defaults: depth 2, expansion 4).
  ours = (registry.config_fields("titans_lmm") if "titans_lmm" in registry.names() else {})
  mlp = {"depth": ours.get("depth", 2), "expansion_factor": float(ours.get("expansion", 4.0))}
  for key, dim_head in (("titans_pytorch", None), ("titans_pytorch_matched",
                                                   d_model // titans_heads)):
    series[key] = missing("titans-pytorch")
    if series[key] is not None:
      continue

    def build_titans(dim_head=dim_head):
      import torch  # pylint: disable=g-import-not-at-top
      import titans_pytorch  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(common.cpu_threads())
      torch.manual_seed(0)
      kw = dict(dim=d_model, chunk_size=titans_chunk, heads=titans_heads)
      if dim_head is not None:
        kw.update(dim_head=dim_head, default_model_kwargs=dict(mlp))
      module = titans_pytorch.NeuralMemory(**kw)
      version = importlib.metadata.version("titans-pytorch")
      info = {"source": f"titans_pytorch {version} (torch {torch.__version__}): "
                        f"NeuralMemory(**config); loss = retrieved.sum(); loss.backward()",
              "config": kw, "torch_threads": torch.get_num_threads()}
      if dim_head is None:
        info["note"] = (f"the issue's constructor; dim_head defaults to dim={d_model}, so each "
                        f"of the {titans_heads} heads has a {d_model}-wide memory MLP")
      else:
        info["note"] = (f"matched to lcm's titans_lmm: dim_head = d_model / heads = "
                        f"{dim_head}, memory MLP depth {mlp['depth']}, expansion "
                        f"{mlp['expansion_factor']:g}")
      return module, None, info
    series[key] = {"kind": "torch", "lengths": list(titans_lengths), "build": build_titans}
  return series


def torch_params(module) -> int:
  """Parameter count of a torch module."""
  return int(sum(p.numel() for p in module.parameters()))


def torch_runner(module, x):
  """A blocking fwd+bwd call of a torch peer: ``sum(module(x)).backward()`` w.r.t. its
  parameters and ``x`` (a JAX array, copied once to a torch tensor)."""
  import torch  # pylint: disable=g-import-not-at-top
  xt = torch.from_numpy(np.array(x)).requires_grad_(True)

  def run():
    module.zero_grad(set_to_none=True)
    xt.grad = None
    y = module(xt)
    (y[0] if isinstance(y, tuple) else y).sum().backward()
  return run
