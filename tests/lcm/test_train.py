"""Trainer: sharding on an 8-device mesh, SIGKILL + resume, NaN stop, summary."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import mqar
from lcm import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = {
    "data.vocab_size": 64, "data.seq_len": 32, "data.num_kv_pairs": 4, "data.batch_size": 8,
    "model.d_model": 32, "model.num_layers": 2, "train.steps": 10, "train.warmup_steps": 2,
    "train.log_every": 1, "train.eval_every": 1000, "train.checkpoint_every": 1000,
    "eval.num_examples": 16, "eval.batch_size": 8, "train.progress": False,
}


def tiny_config(**overrides):
  c = mqar.get_config("attention")
  for k, v in {**TINY, **overrides}.items():
    sec, field = k.split(".")
    c[sec][field] = v
  return c


def _losses(trainer, steps):
  params, opt = trainer.init_state()
  it = trainer.train_iterator()
  out = []
  for _ in range(steps):
    params, opt, m = trainer.train_step(params, opt, trainer.global_batch(next(it)))
    out.append(float(m["loss"]))
  return out, params, opt


@pytest.fixture(scope="module")
def sharded():
  assert len(jax.devices()) == 8, "tests/conftest.py must give 8 CPU devices"
  c = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  t = train.Trainer(c)
  losses, params, opt = _losses(t, 10)
  return t, losses, params, opt


def test_sharded_losses_match_single_device(sharded):
  _, losses8, _, _ = sharded
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  losses1, _, _ = _losses(train.Trainer(c, devices=jax.devices()[:1]), 10)
  np.testing.assert_allclose(losses8, losses1, rtol=0, atol=1e-5)
  assert losses1[-1] < losses1[0]  # it is actually training


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(sharded):
  t, _, params, opt = sharded
  assert dict(t.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  blocks = params["groups"]["blocks"]
  attn, mlp = blocks[0]["mixer"], blocks[0]["mlp"]
  expected = {
      ("embed",): (params["embed"], P("tensor", "fsdp")),  # [vocab, embed]
      ("head",): (params["head"]["kernel"], P("fsdp", "tensor")),  # [embed, vocab]
      ("q",): (attn["q"]["kernel"], P(None, "fsdp", "tensor", None)),  # [layers, embed, heads, hd]
      ("out",): (attn["out"], P(None, "tensor", None, "fsdp")),  # [layers, heads, hd, embed]
      ("gate",): (mlp["gate"]["kernel"], P(None, "fsdp", "tensor")),  # [layers, embed, mlp]
      ("down",): (mlp["down"]["kernel"], P(None, "tensor", "fsdp")),  # [layers, mlp, embed]
      ("norm",): (blocks[0]["norm1"]["scale"], P(None, "fsdp")),  # [layers, embed]
  }
  for name, (x, spec) in expected.items():
    assert x.sharding.spec == spec, (name, x.sharding.spec)
    # each device really holds only its block
    n = np.prod([t.mesh.shape[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s)])
    assert x.addressable_shards[0].data.size * n == x.size, name
  # Adam moments follow their parameters.
  mu_specs = {str(path): leaf.sharding.spec for path, leaf in
              jax.tree_util.tree_leaves_with_path(opt) if hasattr(leaf, "sharding")
              and leaf.ndim == 2 and leaf.shape == params["embed"].shape}
  assert mu_specs and all(s == P("tensor", "fsdp") for s in mu_specs.values()), mu_specs


def _cmd(workdir, steps):
  own = ("train.steps", "train.checkpoint_every", "train.eval_every")
  flags = [f"--config.{k}={v}" for k, v in TINY.items() if k not in own]
  return [sys.executable, "-m", "experiments.train", "--config=configs/mqar.py:attention",
          f"--workdir={workdir}", f"--config.train.steps={steps}",
          "--config.train.checkpoint_every=10", "--config.train.eval_every=1000", *flags]


def _final_state(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _loss_by_step(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}  # last write wins


def test_sigkill_and_resume_is_bitwise_identical(tmp_path):
  steps = 200
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ref, killed = tmp_path / "ref", tmp_path / "killed"
  subprocess.run(_cmd(ref, steps), cwd=ROOT, env=env, check=True, capture_output=True)

  proc = subprocess.Popen(_cmd(killed, steps), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    done = [d for d in done if d >= 20]
    if done:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "training finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert killed_at < steps

  out = subprocess.run(_cmd(killed, steps), cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True)
  summary = json.loads((killed / "summary.json").read_text())
  assert summary["resumed_from"] is not None and 20 <= summary["resumed_from"] < steps, out.stderr

  a, b = _final_state(ref, steps), _final_state(killed, steps)
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  la, lb = _loss_by_step(ref), _loss_by_step(killed)
  resumed = summary["resumed_from"]
  assert [la[s] for s in range(resumed + 1, steps + 1)] == \
         [lb[s] for s in range(resumed + 1, steps + 1)]


def test_run_writes_summary_and_resumes_when_done(tmp_path):
  c = tiny_config(**{"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3,
                     "train.async_checkpoint": False})
  s = train.run(c, str(tmp_path), devices=jax.devices()[:1])
  for key in ("eval_accuracy", "eval_loss", "steps", "tokens_per_second", "wall_seconds",
              "config"):
    assert key in s
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk["steps"] == 6 and 0.0 <= on_disk["eval_accuracy"] <= 1.0
  assert on_disk["config"]["model"]["d_model"] == 32
  assert on_disk["state_size"] == 2 * (2 * 32 * 32)  # 2 layers x K,V cache of 32 tokens
  rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  assert (tmp_path / "curves.png").stat().st_size > 1000
  again = train.run(c, str(tmp_path), devices=jax.devices()[:1])  # nothing left to train
  assert again["resumed_from"] == 6
  assert again["eval_accuracy"] == s["eval_accuracy"]


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config(**{"train.steps": 8, "train.checkpoint_every": 2,
                     "train.async_checkpoint": False})
  t = train.Trainer(c, devices=jax.devices()[:1])
  real_step = t.train_step
  calls = {"n": 0}

  def poisoned(params, opt, batch):
    calls["n"] += 1
    if calls["n"] == 5:  # step 5: make the loss NaN through the inputs' mask
      batch = dict(batch, loss_mask=batch["loss_mask"] * np.nan)
    return real_step(params, opt, batch)

  original = train.Trainer
  try:
    train.Trainer = lambda *a, **k: _with_step(t, poisoned)
    with pytest.raises(train.NonFiniteError, match="step 5"):
      train.run(c, str(tmp_path), devices=jax.devices()[:1])
  finally:
    train.Trainer = original
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps[-1] == 4  # the checkpoint before the NaN, not overwritten
  good = _final_state(tmp_path, 4)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good["params"]))


def _with_step(trainer, fn):
  trainer.train_step = fn
  return trainer


def test_optimizer_honours_parameter_tags():
  c = tiny_config()
  c.train.lr, c.train.warmup_steps, c.train.weight_decay = 1.0, 0, 0.5
  c.train.param_groups = {"no_decay": {"weight_decay": 0.0}, "ssm": {"lr": 1e-3}}
  params = {"w": np.ones((2, 2), np.float32), "scale": np.ones((2,), np.float32),
            "A_log": np.ones((2,), np.float32)}
  labels = {"w": train.DEFAULT_LABEL, "scale": "no_decay", "A_log": "ssm"}
  tx = train.build_optimizer(c.train, labels)
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # zero gradients: the update is pure weight decay, -lr * wd * p (step 0: lr = peak)
  np.testing.assert_allclose(updates["w"], -0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["scale"], 0.0)
  np.testing.assert_allclose(updates["A_log"], -1e-3 * 0.5 * np.ones(2), rtol=1e-6)  # lr capped


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_and_restore_on_another_mesh(sharded, tmp_path):
  """2 processes x 4 CPU devices on 127.0.0.1 == 1 process x 8 devices, same mesh."""
  t8, losses8, params8, _ = sharded
  workdir = tmp_path / "mp"
  port = _free_port()
  cmd = _cmd(workdir, 10) + ["--config.mesh.data=2", "--config.mesh.fsdp=2",
                             "--config.mesh.tensor=2"]
  procs = []
  for i in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "LCM_COORDINATOR": f"127.0.0.1:{port}",
           "LCM_NUM_PROCESSES": "2", "LCM_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  losses2 = _loss_by_step(workdir)
  np.testing.assert_allclose([losses2[s] for s in range(1, 11)], losses8, rtol=0, atol=1e-5)

  # The 2-process checkpoint restores in this single process on a different mesh.
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  t = train.Trainer(c)
  from lcm import checkpoint  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  assert ck.latest_step() == 10
  restored = ck.restore(10, t.abstract_state())
  ck.close()
  emb = restored["params"]["embed"]
  assert emb.sharding.spec == P("tensor", "fsdp") and dict(t.mesh.shape)["fsdp"] == 4
  for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(params8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
