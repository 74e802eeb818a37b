"""Reliability (issue 11): damaged checkpoints, the NaN policy and hostile configs
(hypothesis). Data faults, bf16 numerics at length and no code execution from loaded data are
in test_input_safety.py.

The 20-kill SIGKILL experiment is ``experiments/fault_injection.py`` (results/crash_safety.json,
too slow for a test; ``tests/lcm/test_train.py`` has the single-kill test) and the
T = 65,536 numerics of every recurrent mixer are ``experiments/numerics.py``
(results/numerics_bf16.json); the numerics test here runs one mixer per kernel family at
T = 4096.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import math
import os
import pathlib
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import mqar
from layers.common import ConfigError
from lcm import checkpoint, registry, train
from lcm import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = {
    "data.vocab_size": 32, "data.seq_len": 16, "data.num_kv_pairs": 2, "data.batch_size": 8,
    "model.d_model": 16, "model.num_layers": 1, "train.steps": 8, "train.warmup_steps": 1,
    "train.log_every": 100, "train.eval_every": 1000, "train.checkpoint_every": 2,
    "train.keep_checkpoints": 3, "eval.num_examples": 8, "eval.batch_size": 8,
    "train.progress": False, "mesh.data": 1,
}


def tiny_config(**overrides):
  c = mqar.get_config("attention")
  for k, v in {**TINY, **overrides}.items():
    sec, field = k.split(".")
    c[sec][field] = v
  return c


@jax.custom_vjp
def _nan_grad(x, flag):
  """Identity whose gradient is NaN when ``flag > 0``: a finite loss, non-finite grads."""
  del flag
  return x


def _nan_grad_fwd(x, flag):
  return x, flag


def _nan_grad_bwd(flag, g):
  return jnp.where(flag > 0, jnp.nan, g), jnp.zeros_like(flag)


_nan_grad.defvjp(_nan_grad_fwd, _nan_grad_bwd)


@pytest.fixture(scope="module")
def trainer():
  """One tiny trainer for the module (its jitted steps compile once). Its logits pass
  through :func:`_nan_grad` driven by a ``poison_grad`` batch entry, which :func:`_run`
  always supplies (0: the ordinary trainer, bit for bit)."""
  real = train.loss_and_metrics

  def loss_with_hook(logits, batch):
    if "poison_grad" in batch:
      logits = _nan_grad(logits, jnp.max(batch["poison_grad"]))
    return real(logits, batch)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "loss_and_metrics", loss_with_hook)
    t = train.Trainer(tiny_config(), devices=jax.devices()[:1])
    params, opt = t.init_state()
    batch = _poisoned(t, t.global_batch(next(t.train_iterator())), 0.0)
    t.train_step(params, opt, batch)  # traced (and compiled) while the hook is patched in
  return t


def _poisoned(t, batch, grad_flag):
  flag = np.full((batch["inputs"].shape[0],), grad_flag, np.float32)
  return dict(batch, poison_grad=jax.device_put(flag, t.batch_sharding))


def _run(trainer, workdir, monkeypatch, nan_loss_at=None, nan_grad_at=None,
         **train_overrides):
  """train.run with ``trainer``'s compiled steps (only host-loop fields may differ); the
  n-th train step of this invocation gets a NaN loss (``nan_loss_at``, through its loss
  mask) or NaN gradients with a finite loss (``nan_grad_at``)."""
  t = copy.copy(trainer)
  c = ml_collections.ConfigDict(trainer.config.to_dict())
  for k, v in train_overrides.items():
    c.train[k] = v
  t.config = c
  calls = {"n": 0}

  def step(params, opt, batch):
    calls["n"] += 1
    if calls["n"] == nan_loss_at:
      batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)
    return trainer.train_step(params, opt,
                              _poisoned(t, batch, float(calls["n"] == nan_grad_at)))
  t.train_step = step
  monkeypatch.setattr(train, "Trainer", lambda *a, **k: t)
  for name in ("plot_loss_by_position", "plot_training_curves"):  # PNGs: slow, not tested here
    monkeypatch.setattr(train.plots, name, lambda *a, **k: None)
  return train.run(c, str(workdir), devices=jax.devices()[:1])


def _load(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ck:
    return ck.restore(os.path.abspath(path))


def _assert_trees_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _steps(workdir):
  d = os.path.join(str(workdir), "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def _file_hashes(directory):
  out = {}
  for f in sorted(glob.glob(os.path.join(str(directory), "**", "*"), recursive=True)):
    if os.path.isfile(f):
      out[os.path.relpath(f, directory)] = hashlib.sha256(pathlib.Path(f).read_bytes()).hexdigest()
  return out


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(str(step_dir), "state", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def uninterrupted(trainer, tmp_path_factory):
  """A clean 8-step run: the final state every recovered run must reproduce bitwise."""
  workdir = tmp_path_factory.mktemp("clean")
  with pytest.MonkeyPatch.context() as mp:
    _run(trainer, workdir, mp)
  return _load(workdir, 8)


def _garble(step_dir):
  f = _largest_data_file(step_dir)
  data = bytearray(pathlib.Path(f).read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit: Orbax itself reads this back without an error
  pathlib.Path(f).write_bytes(bytes(data))


def _truncate_without_manifest(step_dir):
  """No manifest (e.g. written by an older lcm): only Orbax's own read can fail. The array
  files are not used here: this process wrote them and TensorStore may serve them from its
  cache; ``_METADATA`` (the tree structure, JSON) is always read from disk."""
  os.remove(os.path.join(str(step_dir), checkpoint.MANIFEST))
  f = os.path.join(str(step_dir), "state", "_METADATA")
  pathlib.Path(f).write_bytes(pathlib.Path(f).read_bytes()[:100])


@pytest.mark.parametrize("damage", [_garble, _truncate_without_manifest],
                         ids=["garbled", "truncated-no-manifest"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(
    trainer, uninterrupted, tmp_path, monkeypatch, capsys, damage):
  _run(trainer, tmp_path, monkeypatch, steps=6)
  assert _steps(tmp_path) == [2, 4, 6]
  damage(tmp_path / "checkpoints" / "6")
  summary = _run(trainer, tmp_path, monkeypatch, steps=8)
  out = capsys.readouterr().out
  assert summary["resumed_from"] == 4
  assert [s for s, _ in summary["bad_checkpoints"]] == [6]
  assert "checkpoint step 6 is unusable" in out and "Resumed from step 4" in out, out
  moved = os.listdir(tmp_path / "checkpoints" / "corrupt")
  assert len(moved) == 1 and moved[0].startswith("6.")  # kept for inspection, not deleted
  assert _steps(tmp_path) == [4, 6, 8]  # step 6 was trained and saved again
  _assert_trees_equal(_load(tmp_path, 8), uninterrupted)  # and the run is still exact
  for s in _steps(tmp_path):
    assert checkpoint.verify_manifest(str(tmp_path / "checkpoints" / str(s))) is None


def test_no_usable_checkpoint_is_an_error_that_moves_nothing(trainer, tmp_path, monkeypatch):
  _run(trainer, tmp_path, monkeypatch, steps=4)
  for s in (2, 4):
    _garble(tmp_path / "checkpoints" / str(s))
  before = _file_hashes(tmp_path / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError, match=r"step 4: .*SHA-256.*step 2: .*SHA-256"):
    _run(trainer, tmp_path, monkeypatch, steps=8)
  assert _file_hashes(tmp_path / "checkpoints") == before  # nothing moved, nothing written


def test_changed_model_is_an_error_that_keeps_checkpoints_and_config(trainer, tmp_path,
                                                                    monkeypatch):
  """Restarting a workdir with an incompatible model (d_model 16 -> 24): every step fails to
  restore, nothing is moved, and config.json still describes the checkpoints."""
  _run(trainer, tmp_path, monkeypatch, steps=2)
  before = _file_hashes(tmp_path)
  monkeypatch.undo()  # the real Trainer: nothing is compiled before the restore fails
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2: Orbax could not read it"):
    train.run(tiny_config(**{"model.d_model": 24}), str(tmp_path), devices=jax.devices()[:1])
  assert _file_hashes(tmp_path) == before


def test_manifest_covers_every_data_file_and_detects_each_kind_of_damage(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
  ck.save(1, {"w": jnp.arange(64.0), "b": jnp.ones((3, 3))})
  ck.close()
  step_dir = tmp_path / "1"
  assert checkpoint.verify_manifest(str(step_dir)) is None
  manifest = (step_dir / checkpoint.MANIFEST).read_text()
  assert "state/_METADATA" in manifest and "data" not in os.listdir(step_dir)
  f = _largest_data_file(step_dir)
  original = pathlib.Path(f).read_bytes()
  pathlib.Path(f).write_bytes(original + b"x")
  assert "bytes" in checkpoint.verify_manifest(str(step_dir))
  os.remove(f)
  assert "missing" in checkpoint.verify_manifest(str(step_dir))
  pathlib.Path(f).write_bytes(original)
  (step_dir / checkpoint.MANIFEST).write_text("{not json")
  assert "unreadable manifest" in checkpoint.verify_manifest(str(step_dir))


# ----------------------------------------------------------------------------- NaN / Inf


def test_nan_stops_with_step_and_keeps_last_good_checkpoint_bitwise(trainer, tmp_path,
                                                                    monkeypatch):
  _run(trainer, tmp_path, monkeypatch, steps=4)
  good = _file_hashes(tmp_path / "checkpoints" / "4")
  # Resumed at 4, NaN at step 5 (the 1st call); logged only every 100 steps, so it is the
  # flush before the step-6 checkpoint that must catch it.
  with pytest.raises(train.NonFiniteError, match=r"step 5 .*last good checkpoint: step 4"):
    _run(trainer, tmp_path, monkeypatch, nan_loss_at=1, steps=8)
  assert _steps(tmp_path) == [2, 4]
  assert not glob.glob(str(tmp_path / "checkpoints" / "*.orbax-checkpoint-tmp*"))
  assert _file_hashes(tmp_path / "checkpoints" / "4") == good  # untouched, byte for byte


def test_nan_gradient_with_finite_loss_stops(trainer, tmp_path, monkeypatch):
  with pytest.raises(train.NonFiniteError, match=r"step 3 \(loss=\d.*grad_norm=nan"):
    _run(trainer, tmp_path, monkeypatch, nan_grad_at=3, steps=8)
  assert _steps(tmp_path) == [2]
  good = _load(tmp_path, 2)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good["params"]))


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_skip_policy_drops_the_update_in_graph(trainer):
  """A non-finite step leaves parameters and optimizer state exactly as they were."""
  t = trainer
  params, opt = t.init_state()
  it = t.train_iterator()
  params, opt, m = t.train_step(params, opt, _poisoned(t, t.global_batch(next(it)), 0.0))
  assert bool(m["finite"])
  before_p, before_o = _host(params), _host(opt)  # the step donates its inputs
  params, opt, m = t.train_step(params, opt, _poisoned(t, t.global_batch(next(it)), 1.0))
  assert not bool(m["finite"]) and np.isfinite(float(m["loss"]))
  _assert_trees_equal(_host(params), before_p)
  _assert_trees_equal(_host(opt), before_o)


def test_skip_policy_run_continues_and_counts_skips(trainer, tmp_path, monkeypatch, capsys):
  summary = _run(trainer, tmp_path, monkeypatch, nan_grad_at=3, steps=6, nan_policy="skip",
                 log_every=1)
  assert summary["skipped_steps"] == 1 and summary["steps"] == 6
  assert "skipped: non-finite loss or gradient at step 3" in capsys.readouterr().out
  from lcm import metrics  # pylint: disable=g-import-not-at-top
  rows = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
  assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0, 0]
  assert _steps(tmp_path) == [2, 4, 6]
  final = _load(tmp_path, 6)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final))


# ----------------------------------------------------------------------------- hostile configs


def _leaf_paths(c, prefix=""):
  out = []
  for k, v in c.items():
    p = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict) and k not in ("mixers", "param_groups"):
      out.extend(_leaf_paths(v, p + "."))
    else:
      out.append(p)
  return out


LEAVES = _leaf_paths(tiny_config())
SECTIONS = ("data", "model", "train", "eval", "mesh")
MIXERS = registry.names()
HOSTILE = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 64, 2**31, 2**40, -2**63, 10**30]),
    st.integers(-10**6, 10**6),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.5, 1e-300, 1e300, -1.5, 0.999999]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "16", "nosuchmixer", "attention", "float16", "bfloat16", "text",
                     "passkey", "stop", "skip", " , ", "mamba2,attention"]),
    st.sampled_from([None, True, False, [], [1, 2], (3,), b"bytes", {"a": 1}]),
    st.just(np.arange(3)), st.just(np.float32(1.0)),
)


def _set(c, path, value):
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      with node.ignore_type():
        node[p] = ml_collections.ConfigDict()
    node = node[p]
  with node.ignore_type():
    node[leaf] = value


def _delete(c, path):
  *parents, leaf = path.split(".")
  node = c
  for p in parents:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      return
    node = node[p]
  if isinstance(node, ml_collections.ConfigDict) and leaf in node:
    del node[leaf]


@st.composite
def mutations(draw):
  """1-3 hostile edits of the tiny base config: (kind, path, value)."""
  ops = []
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["field"] * 5 + ["mixer"] * 3 + ["pattern", "mesh",
                                 "delete", "section", "unknown", "param_group"]))
    if kind == "field":
      ops.append(("set", draw(st.sampled_from(LEAVES)), draw(HOSTILE)))
    elif kind == "mixer":
      name = draw(st.sampled_from(MIXERS + ["nosuchmixer"]))
      fields = list(registry.config_fields(name)) if name in MIXERS else ["num_heads"]
      key = draw(st.sampled_from(fields + ["no_such_field"]))
      ops.append(("set", f"model.mixers.{name}.{key}", draw(HOSTILE)))
      if draw(st.booleans()):  # and use it, so seq_len-dependent checks run too
        ops.append(("set", "model.pattern", name))
    elif kind == "pattern":
      names = draw(st.lists(st.sampled_from(MIXERS + ["bogus", ""]), min_size=0, max_size=3))
      ops.append(("set", "model.pattern", ",".join(names)))
      ops.append(("set", "model.num_layers", draw(st.integers(-1, 4))))
    elif kind == "mesh":
      for axis in ("data", "fsdp", "tensor"):
        ops.append(("set", f"mesh.{axis}", draw(st.sampled_from([-1, 0, 1, 2, 3, 8, -2]))))
    elif kind == "delete":
      ops.append(("delete", draw(st.sampled_from(LEAVES)), None))
    elif kind == "section":
      ops.append(("set", draw(st.sampled_from(SECTIONS)), draw(HOSTILE)))
    elif kind == "unknown":
      ops.append(("set", draw(st.sampled_from(["train.learning_rate", "model.dmodel",
                                               "foo", "data.seq_length"])), 1))
    else:
      ops.append(("set", f"train.param_groups.{draw(st.sampled_from(['ssm', 'no_decay', 'x']))}"
                  f".{draw(st.sampled_from(['lr', 'weight_decay', 'momentum']))}", draw(HOSTILE)))
  return ops


def _apply(ops):
  c = tiny_config()
  for kind, path, value in ops:
    if kind == "set":
      _set(c, path, value)
    else:
      _delete(c, path)
  return c


def _exists(c, path):
  node = c
  for p in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      return False
    node = node[p]
  return True


def _real_field(field, c, ops):
  """A path of the config, a path the test touched, a section, or a mixer's Config field."""
  if field in ("config", "mesh") or field in SECTIONS or _exists(c, field):
    return True
  if _exists(config_lib.base_config(), field):  # a field the ops deleted or replaced
    return True
  if any(path == field or path.startswith(field + ".") for _, path, _ in ops):
    return True
  parts = field.split(".")
  return (len(parts) == 4 and parts[:2] == ["model", "mixers"] and parts[2] in MIXERS
          and parts[3] in registry.config_fields(parts[2]))


def _foreign_frames(e):
  return [f"{f.filename}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
          if "/jax/" in f.filename or "/flax/" in f.filename]


def _validate(c, ops, num_devices):
  """'valid' or 'error'; anything but a ConfigError naming a real field fails the test."""
  try:
    config_lib.validate(c, num_devices=num_devices)
  except ConfigError as e:
    assert _real_field(e.field, c, ops), (e.field, str(e), ops)
    assert str(e).startswith(f"{e.field}: ") and len(str(e)) > len(e.field) + 8, str(e)
    return "error"
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"{type(e).__name__}: {e} (frames from jax/flax: {_foreign_frames(e)}) "
                f"for {ops}\n{traceback.format_exc()}")
  return "valid"


_COUNTS = {"valid": 0, "error": 0}


@settings(max_examples=240, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=mutations(), num_devices=st.sampled_from([1, 2, 8]))
def _hostile_examples(ops, num_devices):
  _COUNTS[_validate(_apply(ops), ops, num_devices)] += 1


def test_hostile_configs_fail_early_naming_a_field():
  """>= 200 hostile edits (bad numbers, nan/inf, wrong types, unknown names and keys,
  deleted fields, broken sections, meshes that do not fit): each one validates or raises
  ConfigError naming a real field; no other exception, none from inside jax or flax."""
  _COUNTS.update(valid=0, error=0)
  _hostile_examples()  # pylint: disable=no-value-for-parameter
  assert _COUNTS["valid"] + _COUNTS["error"] >= 200, _COUNTS
  assert _COUNTS["error"] >= 150 and _COUNTS["valid"] >= 1, _COUNTS


@st.composite
def small_configs(draw):
  """Random but small architectures: any registered mixers, dtypes, layer options."""
  names = draw(st.lists(st.sampled_from(MIXERS), min_size=1, max_size=2))
  ops = [("set", "model.pattern", ",".join(names)),
         ("set", "model.num_layers", len(names) * draw(st.integers(1, 2))),
         ("set", "model.d_model", draw(st.sampled_from([8, 16, 24, 32]))),
         ("set", "data.seq_len", draw(st.sampled_from([8, 12, 16, 32]))),
         ("set", "data.batch_size", draw(st.sampled_from([1, 2, 4]))),
         ("set", "model.dtype", draw(st.sampled_from(["float32", "bfloat16"]))),
         ("set", "model.remat", draw(st.booleans())),
         ("set", "model.scan_layers", draw(st.booleans())),
         ("set", "model.tie_embeddings", draw(st.booleans())),
         ("set", "model.mlp_ratio", draw(st.sampled_from([0.0, 1.0, 2.5])))]
  for name in set(names):
    for key, default in registry.config_fields(name).items():
      if isinstance(default, int) and not isinstance(default, bool) and draw(st.booleans()):
        ops.append(("set", f"model.mixers.{name}.{key}",
                    draw(st.sampled_from([1, 2, 3, 4, 8, 16]))))
  return ops


_TRACED = {"n": 0, "valid": 0, "patterns": []}


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=small_configs())
def _small_examples(ops):
  c = _apply(ops)
  if _validate(c, ops, 1) != "valid":
    return
  _TRACED["valid"] += 1
  if _TRACED["n"] >= 8:  # tracing costs seconds: the first 8 valid ones
    return
  _TRACED["n"] += 1
  _TRACED["patterns"].append(f"{c.model.pattern}/{c.model.dtype}")
  try:
    t = train.Trainer(c, devices=jax.devices()[:1])
    abstract = t.abstract_state()
    batch = {k: jax.ShapeDtypeStruct((c.data.batch_size, c.data.seq_len), dt,
                                     sharding=t.batch_sharding)
             for k, dt in (("inputs", jnp.int32), ("targets", jnp.int32),
                           ("loss_mask", jnp.float32))}
    new_params, _, metrics = jax.eval_shape(t.train_step, abstract["params"],
                                            abstract["opt_state"], batch)
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"valid config failed to build / trace: {type(e).__name__}: {e} for {ops}"
                f"\n{traceback.format_exc()}")
  assert jax.tree.structure(new_params) == jax.tree.structure(abstract["params"])
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32


def test_valid_random_architectures_build_and_trace_a_train_step():
  """Configs that pass validation really build: the full train step (forward, loss,
  gradients, optimizer) traces abstractly (jax.eval_shape, no compile) for the first 8."""
  _TRACED.update(n=0, valid=0, patterns=[])
  _small_examples()  # pylint: disable=no-value-for-parameter
  assert _TRACED["n"] == 8, _TRACED


def test_misspelt_field_is_an_error_not_ignored():
  for path in ("train.learning_rate", "model.dmodel", "seeds"):
    c = tiny_config()
    _set(c, path, 1)
    with pytest.raises(ConfigError) as e:
      config_lib.validate(c, num_devices=1)
    assert e.value.field == path

