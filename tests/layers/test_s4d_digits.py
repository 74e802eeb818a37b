"""S4D learns sequential digits: the long-range SSM path trains, not only runs.

scikit-learn's bundled 8x8 digits (1,797 images, no download) read row by row as
length-64 sequences of one pixel intensity each (0..16 scaled to [0, 1]). The classifier
is an embedding Linear(1 -> d), two pre-norm residual S4D blocks (the FFT-convolution
training path), a mean over time and Linear(d -> 10). Adam, lr 1e-2 (the S4D parameters
``log_dt`` / ``A`` at 1e-3, as the S4 papers train them), fixed 80/20 split.
Measured when written: 95.3% held-out accuracy after 15 epochs (92.8% at lr 5e-3; 83% after
8 epochs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn import datasets as sklearn_datasets  # dev extra: the bundled digits, no download

from layers.common import Linear, RMSNorm
from layers.ssm import S4D, S4DConfig


D, EPOCHS, BATCH = 64, 15, 64


class DigitsS4D(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = Linear(1, D, (None, "embed"), use_bias=True, rngs=rngs)
    cfg = S4DConfig(d_state=32)
    self.norms = nnx.List([RMSNorm(D, rngs=rngs) for _ in range(2)])
    self.mixers = nnx.List([S4D(D, cfg, rngs=rngs) for _ in range(2)])
    self.head = Linear(D, 10, ("embed", None), use_bias=True, rngs=rngs)

  def __call__(self, pixels):  # [B, 64] -> logits [B, 10]
    h = self.embed(pixels[..., None])
    for norm, mixer in zip(self.norms, self.mixers):
      h = h + mixer(norm(h))
    return self.head(h.mean(axis=1))


def _split():
  digits = sklearn_datasets.load_digits()
  x = (digits.images.reshape(-1, 64) / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  cut = int(0.8 * len(y))
  return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _train_and_eval():
  (xtr, ytr), (xte, yte) = _split()
  model = DigitsS4D(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest)
  params = nnx.to_pure_dict(params)
  ssm_names = {"log_dt", "log_A_real", "A_imag"}
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "ssm" if str(getattr(path[-1], "key", "")) in ssm_names else "rest",
      params)
  tx = optax.multi_transform({"ssm": optax.adam(1e-3), "rest": optax.adam(1e-2)}, labels)
  opt = tx.init(params)

  def merged(p):
    return nnx.merge(graphdef, p)

  @jax.jit
  def step(p, o, x, y):
    def loss(p):
      logits = merged(p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    value, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, value

  @jax.jit
  def predict(p, x):
    return jnp.argmax(merged(p)(x), axis=-1)

  rng = np.random.default_rng(1)
  losses = []
  for _ in range(EPOCHS):
    order = rng.permutation(len(ytr))
    for i in range(0, len(order) - BATCH + 1, BATCH):
      idx = order[i:i + BATCH]
      params, opt, value = step(params, opt, xtr[idx], ytr[idx])
      losses.append(float(value))
  accuracy = float(np.mean(np.asarray(predict(params, xte)) == yte))
  return losses, accuracy


def test_s4d_learns_sequential_digits_above_90_percent():
  losses, accuracy = _train_and_eval()
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
  assert accuracy > 0.90, f"held-out accuracy {accuracy:.3f}"
