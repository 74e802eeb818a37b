"""The ``sequence`` mesh axis (context parallelism): config checks, the mesh and batch
layout, training split over it gives the losses of one device, and prefill split over it
then decode gives the tokens of one device."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import mqar
from layers import context_parallel
from layers.common import ConfigError
from lcm import config as config_lib
from lcm import generate, sharding, train
from lcm import model as model_lib
from tests.kernels.helpers import FAST_COMPILE

TINY = {
    "data.vocab_size": 64, "data.seq_len": 32, "data.num_kv_pairs": 4, "data.batch_size": 8,
    "model.d_model": 32, "model.num_layers": 2, "train.steps": 5, "train.warmup_steps": 2,
    "train.log_every": 1, "train.eval_every": 1000, "train.checkpoint_every": 1000,
    "eval.num_examples": 16, "eval.batch_size": 8, "train.progress": False,
}


def tiny_config(pattern="attention", **overrides):
  c = mqar.get_config(pattern)
  for k, v in {**TINY, **overrides}.items():
    sec, field = k.split(".")
    c[sec][field] = v
  return c


def test_sequence_axis_config_errors_name_their_field():
  c = tiny_config(**{"mesh.sequence": 3})  # 3 does not divide seq_len 32
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "data.seq_len" and "mesh.sequence=3" in str(e.value)
  c = tiny_config(**{"mesh.sequence": 16})  # more than the 8 devices
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "mesh.sequence" and "8 devices left" in str(e.value)
  c = tiny_config(**{"mesh.sequence": 4, "mesh.fsdp": 4})  # fsdp leaves 2 devices
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "mesh.sequence" and "2 devices left" in str(e.value)
  assert len(str(e.value).splitlines()) == 1
  # Landmark: each shard's tokens must fill whole blocks (block_size 8: 7 tokens + landmark).
  c = tiny_config("landmark,mamba2", **{"mesh.sequence": 4, "data.seq_len": 56})
  c.model.mixers.landmark = {"block_size": 8}
  config_lib.validate(c, num_devices=8)  # 14 tokens per shard = 2 blocks of 7
  c.data.seq_len = 32
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "data.seq_len" and "4 x 7 = 28" in str(e.value)
  del c.model.mixers["landmark"]  # the default block_size, 32
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert "4 x 31 = 124" in str(e.value)
  # Titans MAC: shards of whole segments (else it would silently run unsplit).
  c = tiny_config("titans_mac", **{"mesh.sequence": 4})
  c.model.mixers.titans_mac = {"segment_len": 16, "chunk_size": 8}
  with pytest.raises(ConfigError) as e:
    config_lib.validate(c, num_devices=8)
  assert e.value.field == "data.seq_len" and "4 x 16 = 64" in str(e.value)
  c.model.mixers.titans_mac = {"segment_len": 8, "chunk_size": 8}
  config_lib.validate(c, num_devices=8)
  c = tiny_config(**{"mesh.sequence": 4})
  config_lib.validate(c, num_devices=8)
  assert config_lib.mesh_shape(c.mesh, 8) == {"data": 2, "fsdp": 1, "tensor": 1,
                                              "sequence": 4}


def test_sequence_axis_must_stay_within_a_process(monkeypatch):
  """Multi-process: each process feeds whole rows, so a sequence group (consecutive
  devices) must sit inside one process (simulated: 2 processes of 4 devices)."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "local_device_count", lambda: 4)
  with pytest.raises(ConfigError) as e:
    sharding.make_mesh(tiny_config(**{"mesh.sequence": 8}).mesh)
  assert e.value.field == "mesh.sequence" and "4 devices of one process" in str(e.value)
  assert sharding.make_mesh(tiny_config(**{"mesh.sequence": 4}).mesh).shape["sequence"] == 4


def test_mesh_and_batch_layout():
  c = tiny_config(**{"mesh.sequence": 4})
  mesh = sharding.make_mesh(c.mesh)
  assert mesh.axis_names == ("data", "fsdp", "tensor", context_parallel.AXIS)
  # sequence is the innermost axis: neighbouring devices hold neighbouring shards.
  assert list(mesh.devices[0, 0, 0]) == jax.devices()[:4]
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), "sequence")
  assert sharding.logical_to_spec(("batch", "seq", "embed"), (8, 32, 32), mesh) == P(
      "data", "sequence", None)
  one = sharding.make_mesh(tiny_config().mesh)  # mesh.sequence = 1: as before
  assert one.shape["sequence"] == 1 and sharding.batch_sharding(one).spec == P(("data", "fsdp"))


def _losses(config, devices):
  """The losses of ``config.train.steps`` steps of the trainer's own train step, compiled
  at XLA level 0 (the test is compile-bound; split and single runs use the same level)."""
  t = train.Trainer(config, devices=devices)
  params, opt = t.init_state()
  it = t.train_iterator()
  out, step = [], None
  for _ in range(config.train.steps):
    batch = t.global_batch(next(it))
    if step is None:
      step = t.train_step.lower(params, opt, batch).compile(compiler_options=FAST_COMPILE)
    params, opt, m = step(params, opt, batch)
    out.append(float(m["loss"]))
  return out


def test_training_split_over_sequence_matches_one_device(monkeypatch):
  """A hybrid of sliding-window attention, Mamba2 (short convolutions + SSD), Gated
  DeltaNet and landmark attention (blocks of 4 tokens + the landmark, the exact grouped
  softmax as trained; split retrieval: tests/layers/test_context_parallel.py), 5 steps: T
  split over 2 devices (x 2 data x 2 tensor) gives the single-device losses, and the split run really took the context-parallel paths (halos
  for the convolutions and the window, the affine and dense state hand-offs, landmark
  rows against gathered keys) on the landmark-extended row (32 tokens + 8 landmarks)."""
  traced = []
  attention_module = sys.modules["layers.context_parallel.attention"]
  for module, name in ((context_parallel.primitives, "halo"), (attention_module, "halo"),
                       (context_parallel.recurrence, "exclusive_affine_prefix"),
                       (context_parallel, "gathered_rows")):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *a, fn=fn, name=name, **kw: traced.append(name) or fn(*a, **kw))
  want = {"halo", "exclusive_affine_prefix", "gathered_rows"}
  # (data, tensor, sequence) = (2, 2, 2): tensor parallelism inside the split; the 4- and
  # 8-way splits of every mixer are tests/layers/test_context_parallel.py's (one trainer
  # fewer here: the suite is compile-bound).
  c = tiny_config("swa,mamba2,gated_deltanet,landmark",
                  **{"mesh.sequence": 2, "mesh.tensor": 2, "model.num_layers": 4})
  c.model.mixers.swa = {"num_heads": 2, "window": 6}
  c.model.mixers.mamba2 = {"head_dim": 16}  # 4 heads: tensor = 2 splits them
  c.model.mixers.gated_deltanet = {"num_heads": 2, "chunk_size": 4, "impl": "xla"}
  c.model.mixers.landmark = {"num_heads": 2, "block_size": 5, "exact_len": 40}
  split_tp = _losses(c, jax.devices())
  assert set(traced) == want
  c.mesh.sequence, c.mesh.tensor = 1, 1
  traced.clear()
  single = _losses(c, jax.devices()[:1])
  assert not traced  # mesh.sequence = 1: the plain code
  np.testing.assert_allclose(split_tp, single, rtol=1e-5)
  assert len(set(single)) == len(single)  # the updates were applied


def hybrid_lm(width: int, *, state: int, chunk: int, impl: str, landmark: dict | None = None):
  """A 3-layer attention + Mamba2 + Gated DeltaNet LM (vocabulary = 2 x width), and a
  fourth, landmark layer with these fields when ``landmark`` is given."""
  c = config_lib.base_config().model
  c.vocab_size, c.d_model, c.num_layers, c.mlp_ratio, c.remat = 2 * width, width, 3, 2.0, False
  c.pattern = "attention,mamba2,gated_deltanet"
  c.mixers = ml_collections.ConfigDict({
      "attention": {"num_heads": 2},
      "mamba2": {"d_state": state, "head_dim": state, "chunk_size": chunk, "impl": impl},
      "gated_deltanet": {"num_heads": 2, "chunk_size": chunk, "impl": impl}})
  if landmark is not None:
    c.pattern, c.num_layers = c.pattern + ",landmark", 4
    c.mixers.landmark = {"num_heads": 2, **landmark}
  return model_lib.LM(c, rngs=nnx.Rngs(0))


def test_prefill_split_over_sequence_then_decode_gives_the_same_tokens(monkeypatch):
  """A hybrid LM (attention, Mamba2, Gated DeltaNet, short convolutions): the 48-token
  prompt prefilled in chunks of 16 split over 4 devices (x 2 data), then 32 greedy tokens,
  equals the single-device run; the split recurrences ran with the carried state."""
  model = hybrid_lm(32, state=8, chunk=4, impl="xla")
  model.embed[...] = model.embed[...] * 4.0  # sharper logits: no near-ties in greedy choices
  prompt = jax.random.randint(jax.random.key(1), (2, 48), 0, 64)
  split = []
  for module, name in ((context_parallel.recurrence, "recurrence_shard"),
                       (context_parallel.recurrence, "delta_rule_shard")):
    fn = getattr(module, name)
    monkeypatch.setattr(module, name,
                        lambda *a, fn=fn, name=name, **kw: split.append(name) or fn(*a, **kw))
  mesh = sharding.make_mesh(tiny_config(**{"mesh.sequence": 4}).mesh)
  got = generate.generate(model, prompt, 32, prefill_chunk=16, mesh=mesh)
  assert set(split) == {"recurrence_shard", "delta_rule_shard"}
  want = generate.generate(model, prompt, 32, prefill_chunk=16)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert len(np.unique(np.asarray(want))) > 4  # not a degenerate repetition


def test_checkpoint_restores_across_sequence_sizes(tmp_path):
  """Parameters and optimizer state are never split over ``sequence`` (only activations
  are), so a checkpoint saved with mesh.sequence = 4 restores with 1 and the other way
  round, values and the target mesh's shardings."""
  from lcm import checkpoint  # pylint: disable=g-import-not-at-top
  trainers = {n: train.Trainer(tiny_config("mamba2,swa", **{"mesh.sequence": n}))
              for n in (4, 1)}
  for save_n, load_n in ((4, 1), (1, 4)):
    saver, loader = trainers[save_n], trainers[load_n]
    params, opt = saver.init_state()
    params = jax.tree.map(lambda a, n=save_n: a + n, params)  # not the fresh init
    ck = checkpoint.Checkpointer(str(tmp_path / f"ck{save_n}"), async_save=False)
    ck.save(3, {"params": params, "opt_state": opt,
                "step": jax.device_put(jnp.int32(3), saver.replicated)})
    restored = ck.restore(3, loader.abstract_state())
    ck.close()
    assert dict(loader.mesh.shape)[context_parallel.AXIS] == load_n
    for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params)):
      assert a.sharding.mesh.shape == loader.mesh.shape
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored["step"]) == 3


def test_split_hybrid_train_step_exports_for_tpu_with_pallas_kernels(monkeypatch):
  """Attention + Mamba2 + Gated DeltaNet with the TPU Pallas kernels + landmark attention
  (blocks of 64 tokens + the landmark; exact below 520 positions, top-2 retrieval after),
  value_and_grad of the LM loss and an AdamW update, traced on an abstract (data,
  sequence) = (1, 4) mesh and exported for TPU without hardware: the Mosaic calls sit in
  regions manual over every mesh axis (they cannot be partitioned automatically), states
  cross shards by collective-permute / all-gather; each shard of the 1040-long extended row
  holds 4 whole landmark blocks."""
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import AbstractMesh, AxisType, NamedSharding  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(hybrid_lm(128, state=64, chunk=64, impl="pallas_tpu",
                                         landmark={"block_size": 65, "exact_len": 520,
                                                   "top_k": 2}))
  params = nnx.to_pure_dict(params)
  gathered = []
  fn = context_parallel.gathered_rows
  monkeypatch.setattr(context_parallel, "gathered_rows",
                      lambda *a, **kw: gathered.append(1) or fn(*a, **kw))
  tx = optax.adamw(1e-3)
  mesh = AbstractMesh((1, 4), ("data", context_parallel.AXIS), axis_types=(AxisType.Auto,) * 2)

  def train_step(params, opt_state, tokens):
    def loss(p):
      with jax.sharding.use_abstract_mesh(mesh):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return value, optax.apply_updates(params, updates), opt_state

  rep = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
  with jax.sharding.use_abstract_mesh(mesh):
    p = jax.tree.map(rep, params)
    o = jax.tree.map(rep, jax.eval_shape(tx.init, params))
    tok = jax.ShapeDtypeStruct((2, 1025), jnp.int32, sharding=NamedSharding(mesh, P()))
    exported = jax.export.export(jax.jit(train_step), platforms=["tpu"])(p, o, tok)
  text = exported.mlir_module()
  assert exported.nr_devices == 4
  assert gathered  # the landmark layer was split, not left to the partitioner
  assert text.count("tpu_custom_call") >= 4  # forward and backward kernels of both scans
  assert "collective_permute" in text and "all_gather" in text
