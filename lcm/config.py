"""The config schema shared by every experiment, and its validation.

Every experiment config (``configs/<family>.py:get_config(arg)``) starts from
:func:`base_config` and changes fields; :func:`validate` checks every field *before*
anything is built or compiled and raises one :class:`ConfigError` naming the field
(dotted path) and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from layers.common import ConfigError
from lcm import registry
from lcm.data.tasks import TASKS
from lcm.model import MLPS

DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.task = "mqar"
  c.data.vocab_size = 8192
  c.data.seq_len = 64
  c.data.num_kv_pairs = 4
  c.data.power_a = 0.01
  c.data.random_non_queries = True
  c.data.batch_size = 64  # global batch

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0: data.vocab_size
  c.model.d_model = 64
  c.model.num_layers = 2
  # Comma-separated mixer names; the pattern is repeated num_layers / len(pattern) times.
  c.model.pattern = "attention"
  c.model.mlp_ratio = 4.0  # MLP hidden = round(mlp_ratio * d_model); 0 = no MLP
  # "swiglu", or "rwkv": RWKV-7's channel mix, relu(x_k W_k)^2 W_v with a token shift.
  c.model.mlp = "swiglu"
  c.model.mixers = ml_collections.ConfigDict()  # per-mixer overrides: mixers.<name>.<field>
  c.model.dtype = "float32"  # compute dtype
  c.model.param_dtype = "float32"
  c.model.remat = True
  c.model.scan_layers = True
  c.model.tie_embeddings = False
  c.model.norm_eps = 1e-6

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.lr = 1e-3
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
  # Weight of the mixers' auxiliary losses (e.g. MoM's load balance, summed over layers).
  c.train.aux_loss_weight = 0.01
  # Optimizer overrides per parameter tag (a Param's ``optim_tag`` metadata):
  # tag -> {lr: max learning rate (the schedule is capped at it), weight_decay}.
  c.train.param_groups = ml_collections.ConfigDict({
      "no_decay": {"weight_decay": 0.0},
      "ssm": {"lr": 1e-3, "weight_decay": 0.0},
  })
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.nan_policy = "stop"  # stop: halt with the step number; skip: drop the update
  c.train.progress = True

  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 1_000_003  # held-out: a different seed than training
  c.eval.num_examples = 512
  c.eval.batch_size = 128

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Context parallelism: each row's T tokens split over this many devices (the ``sequence``
  # mesh axis; layers/context_parallel.py). 1 = off.
  c.mesh.sequence = 1
  return c


def resolve(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with derived fields filled in (model.vocab_size 0 -> data.vocab_size)."""
  c = ml_collections.ConfigDict(c.to_dict())
  if not c.model.vocab_size:
    c.model.vocab_size = c.data.vocab_size
  return c


# Sizes, counts and step numbers become int32 shapes, token ids and loop counters.
MAX_INT = 2**31 - 1


def _int(c, path: str, *, min_value: int | None = None, allow: tuple = (),
         max_value: int = MAX_INT) -> int:
  v = _get(c, path)
  if isinstance(v, bool) or not isinstance(v, int):
    raise ConfigError(path, f"must be an integer (got {v!r})")
  if v in allow:
    return v
  if min_value is not None and v < min_value:
    extra = f" or one of {allow}" if allow else ""
    raise ConfigError(path, f"must be >= {min_value}{extra} (got {v})")
  if v > max_value:
    raise ConfigError(path, f"must be <= {max_value} (got {v})")
  return v


def _float(c, path: str, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> float:
  v = _get(c, path)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ConfigError(path, f"must be a finite number (got {v!r})")
  if lo is not None and (v < lo or (lo_open and v == lo)):
    raise ConfigError(path, f"must be {'>' if lo_open else '>='} {lo} (got {v})")
  if hi is not None and (v > hi or (hi_open and v == hi)):
    raise ConfigError(path, f"must be {'<' if hi_open else '<='} {hi} (got {v})")
  return float(v)


def _choice(c, path: str, allowed) -> Any:
  v = _get(c, path)
  if not isinstance(v, (str, int, float)) or v not in allowed:
    raise ConfigError(path, f"must be one of {', '.join(map(str, allowed))} (got {v!r})")
  return v


def _bool(c, path: str) -> bool:
  v = _get(c, path)
  if not isinstance(v, bool):
    raise ConfigError(path, f"must be True or False (got {v!r})")
  return v


def _get(c, path: str):
  node = c
  for part in path.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(path, "is missing") from None
  return node


def pattern_names(model_cfg) -> list[str]:
  return [p.strip() for p in str(model_cfg.pattern).split(",") if p.strip()]


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves -1 axes; raises ConfigError when the mesh does not match the devices."""
  axes = {"data": mesh_cfg.data, "fsdp": mesh_cfg.fsdp, "tensor": mesh_cfg.tensor,
          "sequence": mesh_cfg.get("sequence", 1)}
  unknown = [k for k, v in axes.items() if v == -1]
  if len(unknown) > 1:
    raise ConfigError(f"mesh.{unknown[1]}", "at most one mesh axis may be -1")
  others = math.prod(v for k, v in axes.items() if v != -1 and k != "sequence")
  if 1 < axes["sequence"] and others <= num_devices < others * axes["sequence"]:
    raise ConfigError("mesh.sequence", f"must be <= the {num_devices // others} devices left "
                      f"by the other mesh axes ({others} of {num_devices}; got "
                      f"{axes['sequence']})")
  fixed = math.prod(v for v in axes.values() if v != -1)
  if unknown:
    if num_devices % fixed:
      raise ConfigError(f"mesh.{unknown[0]}",
                        f"{num_devices} devices are not divisible by the other axes ({fixed})")
    axes[unknown[0]] = num_devices // fixed
  elif fixed > num_devices:
    raise ConfigError("mesh", f"data*fsdp*tensor*sequence = {fixed} > {num_devices} "
                      "available devices")
  return axes


def _check_known_fields(c: ml_collections.ConfigDict) -> None:
  """A misspelt field (``train.learning_rate``) would otherwise be ignored silently: every
  key must be one of :func:`base_config`'s (data may add any task's fields);
  ``model.mixers`` and ``train.param_groups`` are free-form and checked on their own."""
  from lcm.data import text  # pylint: disable=g-import-not-at-top
  base = base_config()
  from lcm.data import tasks  # pylint: disable=g-import-not-at-top
  task_configs = (text.TextConfig, tasks.PasskeyConfig, tasks.JointRecallConfig,
                  tasks.SetDisjointnessConfig, tasks.SelectiveCopyConfig,
                  tasks.SequenceOrderConfig, tasks.PhonebookConfig, tasks.MQARHiddenConfig)
  extra = {"data": {f.name for cls in task_configs for f in dataclasses.fields(cls)}}
  for key in c.keys():
    if key not in base:
      raise ConfigError(key, f"unknown top-level field; allowed: {', '.join(base.keys())}")
  for section in ("data", "model", "train", "eval", "mesh"):
    allowed = set(base[section].keys()) | extra.get(section, set())
    for key in c[section].keys():
      if key not in allowed:
        raise ConfigError(f"{section}.{key}", f"unknown field; allowed: "
                          f"{', '.join(sorted(allowed))}")


def _check_override_types(name: str, overrides, prefix: str) -> dict:
  """Mixer overrides must be a mapping whose values have their default's type (an int for
  an int field, a number for a float field, ...); the layer's own validate checks ranges."""
  if not isinstance(overrides, (dict, ml_collections.ConfigDict)):
    raise ConfigError(prefix.rstrip("."), f"must be a dict of field -> value (got "
                      f"{overrides!r})")
  defaults = registry.config_fields(name)
  for key, value in overrides.items():
    if key not in defaults:
      continue  # registry.validate names it
    d = defaults[key]
    if d is None or value is None:
      continue  # optional fields: the layer checks them
    if isinstance(d, bool):
      ok = isinstance(value, bool)
    elif isinstance(d, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(d, float):
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
    elif isinstance(d, str):
      ok = isinstance(value, str)
    else:
      ok = True
    if not ok:
      raise ConfigError(f"{prefix}{key}", f"must be a {type(d).__name__}"
                        f"{' (finite)' if isinstance(d, float) else ''} like its default "
                        f"{d!r} (got {value!r})")
  return dict(overrides)


def _validate_mixer(name: str, d_model: int, overrides, **kwargs) -> None:
  """registry.validate, with a layer's complaint about ``d_model`` named ``model.d_model``."""
  try:
    registry.validate(name, d_model, overrides, **kwargs)
  except ConfigError as e:
    if e.field != "d_model":
      raise
    message = str(e)[len("d_model: "):] if str(e).startswith("d_model: ") else str(e)
    raise ConfigError("model.d_model", f"{message} (mixer '{name}')") from None


def validate(c: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
  """Checks every field; raises ConfigError(dotted field, allowed values) on the first bad one."""
  if not isinstance(c, ml_collections.ConfigDict):
    raise ConfigError("config", f"must be an ml_collections.ConfigDict (got {type(c).__name__})")
  for section in ("data", "model", "train", "eval", "mesh"):
    if not isinstance(c.get(section), ml_collections.ConfigDict):
      raise ConfigError(section, "section is missing")
  _check_known_fields(c)
  _int(c, "seed", min_value=0, max_value=2**32 - 1)

  # data
  task = _choice(c, "data.task", TASKS)
  _int(c, "data.batch_size", min_value=1)
  if task == "mqar":
    _int(c, "data.vocab_size", min_value=1)
    _int(c, "data.seq_len", min_value=1)
    _int(c, "data.num_kv_pairs", min_value=1)
    _float(c, "data.power_a", lo=0.0, hi=1.0, lo_open=True)
    _bool(c, "data.random_non_queries")
    from lcm.data.tasks import mqar  # pylint: disable=g-import-not-at-top
    mqar.MQARConfig(vocab_size=c.data.vocab_size, seq_len=c.data.seq_len,
                    num_kv_pairs=c.data.num_kv_pairs, power_a=c.data.power_a,
                    random_non_queries=c.data.random_non_queries).validate(prefix="data")

  elif task == "passkey":
    from lcm.data import pipeline  # pylint: disable=g-import-not-at-top
    _int(c, "data.vocab_size", min_value=1)
    _int(c, "data.seq_len", min_value=1)
    pipeline.passkey_config(c.data)

  elif task in ("joint_recall", "set_disjointness", "selective_copy", "sequence_order",
                "phonebook", "mqar_hidden"):
    from lcm.data import pipeline  # pylint: disable=g-import-not-at-top
    _int(c, "data.vocab_size", min_value=1)
    _int(c, "data.seq_len", min_value=1)
    pipeline.SYNTHETIC_TASKS[task][0](c.data)

  elif task == "text":
    from lcm.data import pipeline, text  # pylint: disable=g-import-not-at-top
    _int(c, "data.vocab_size", min_value=1)
    _int(c, "data.seq_len", min_value=2)
    tcfg = pipeline.text_config(c.data)
    tok = text.make_tokenizer(tcfg)
    if c.data.get("vocab_size", 0) < tok.vocab_size:
      raise ConfigError("data.vocab_size", f"must be >= the {tcfg.tokenizer} tokenizer's "
                        f"vocabulary {tok.vocab_size} (got {c.data.get('vocab_size')})")
    valid = text.load_corpus(tcfg, "validation")
    if _int(c, "eval.num_examples", min_value=1) > valid.num_rows:
      raise ConfigError("eval.num_examples", f"the validation split has only "
                        f"{valid.num_rows} rows of seq_len={tcfg.seq_len}; use at most that")
    text.load_corpus(tcfg, "train")  # bad paths / empty corpora fail here, before compiling

  # model
  m = c.model
  vocab = _int(c, "model.vocab_size", min_value=0)
  if vocab and vocab < c.data.vocab_size:
    raise ConfigError("model.vocab_size",
                      f"must be >= data.vocab_size={c.data.vocab_size} (got {vocab})")
  d_model = _int(c, "model.d_model", min_value=1)
  num_layers = _int(c, "model.num_layers", min_value=1)
  if not isinstance(_get(c, "model.pattern"), str):
    raise ConfigError("model.pattern", f"must be a string of comma-separated mixer names "
                      f"(got {m.pattern!r})")
  names = pattern_names(m)
  if not names:
    raise ConfigError("model.pattern", "must name at least one mixer, e.g. 'attention' or "
                      f"'gla,gla,swa'; registered: {', '.join(registry.names())}")
  for name in names:
    if name not in registry.names():
      raise ConfigError("model.pattern", f"unknown mixer '{name}'; choose from "
                        f"{', '.join(registry.names())}")
  if num_layers % len(names):
    raise ConfigError("model.num_layers", f"must be a multiple of the pattern length "
                      f"{len(names)} (pattern {m.pattern!r}, got {num_layers})")
  _float(c, "model.mlp_ratio", lo=0.0)
  _choice(c, "model.mlp", MLPS)
  _choice(c, "model.dtype", DTYPES)
  _choice(c, "model.param_dtype", ("float32",))
  _bool(c, "model.remat")
  _bool(c, "model.scan_layers")
  _bool(c, "model.tie_embeddings")
  _float(c, "model.norm_eps", lo=0.0, lo_open=True)
  if not isinstance(_get(c, "model.mixers"), ml_collections.ConfigDict):
    raise ConfigError("model.mixers", "must be a ConfigDict of mixer name -> overrides")
  for name, overrides in m.mixers.items():
    if name not in registry.names():
      raise ConfigError(f"model.mixers.{name}", f"unknown mixer; choose from "
                        f"{', '.join(registry.names())}")
    overrides = _check_override_types(name, overrides, f"model.mixers.{name}.")
    _validate_mixer(name, d_model, overrides, prefix=f"model.mixers.{name}.",
                      seq_len=c.data.seq_len if name in names else None)
  for name in names:
    if name not in m.mixers:
      _validate_mixer(name, d_model, {}, prefix=f"model.mixers.{name}.",
                        seq_len=c.data.seq_len)

  # train
  steps = _int(c, "train.steps", min_value=1)
  _float(c, "train.lr", lo=0.0, lo_open=True, hi=10.0)
  warmup = _int(c, "train.warmup_steps", min_value=0)
  if warmup > steps:
    raise ConfigError("train.warmup_steps", f"must be <= train.steps={steps} (got {warmup})")
  _float(c, "train.min_lr_ratio", lo=0.0, hi=1.0)
  _float(c, "train.weight_decay", lo=0.0)
  _float(c, "train.b1", lo=0.0, hi=1.0, hi_open=True)
  _float(c, "train.b2", lo=0.0, hi=1.0, hi_open=True)
  _float(c, "train.eps", lo=0.0, lo_open=True)
  _float(c, "train.grad_clip", lo=0.0)
  _float(c, "train.aux_loss_weight", lo=0.0)
  if not isinstance(_get(c, "train.param_groups"), ml_collections.ConfigDict):
    raise ConfigError("train.param_groups", "must be a ConfigDict of tag -> {lr, weight_decay}")
  for tag, group in c.train.param_groups.items():
    if not isinstance(group, (dict, ml_collections.ConfigDict)):
      raise ConfigError(f"train.param_groups.{tag}", f"must be a dict with keys lr and/or "
                        f"weight_decay (got {group!r})")
    for key, value in group.items():
      path = f"train.param_groups.{tag}.{key}"
      if key not in ("lr", "weight_decay"):
        raise ConfigError(path, "unknown key; allowed: lr, weight_decay")
      _float(c, path, lo=0.0)
  for k in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    _int(c, f"train.{k}", min_value=1)
  _bool(c, "train.async_checkpoint")
  _choice(c, "train.nan_policy", NAN_POLICIES)
  _bool(c, "train.progress")

  # eval
  _int(c, "eval.seed", min_value=0, max_value=2**32 - 1)
  if c.eval.seed == c.seed:
    raise ConfigError("eval.seed", f"must differ from seed={c.seed} so eval is held out")
  n = _int(c, "eval.num_examples", min_value=1)
  b = _int(c, "eval.batch_size", min_value=1)
  if n % b:
    raise ConfigError("eval.num_examples",
                      f"must be a multiple of eval.batch_size={b} (got {n})")

  # mesh
  for axis in ("data", "fsdp", "tensor"):
    _int(c, f"mesh.{axis}", min_value=1, allow=(-1,))
  sequence = _int(c, "mesh.sequence", min_value=1)
  if c.data.seq_len % sequence:
    raise ConfigError("data.seq_len", f"must be divisible by mesh.sequence={sequence} (got "
                      f"{c.data.seq_len})")
  if sequence > 1 and "landmark" in pattern_names(c.model):
    # Landmark tokens extend the row by one per block_size - 1 tokens; the extended row's
    # shards hold whole blocks (and every mixer's shard has the same length) only when
    # each shard's tokens fill whole blocks (docs/context-parallel.md).
    fields = {**registry.config_fields("landmark"), **dict(c.model.mixers.get("landmark", {}))}
    every = int(fields["block_size"]) - 1
    if (c.data.seq_len // sequence) % every:
      raise ConfigError("data.seq_len", f"must be a multiple of mesh.sequence x (landmark "
                        f"block_size - 1) = {sequence} x {every} = {sequence * every} with "
                        f"a landmark layer (got {c.data.seq_len})")
  if sequence > 1 and "titans_mac" in pattern_names(c.model):
    # MAC's segment scan is split only over shards of whole segments (else it would run
    # unsplit, silently holding the whole row); the layers' row is landmark-extended.
    shard = c.data.seq_len // sequence
    if "landmark" in pattern_names(c.model):
      shard += shard // every
    fields = {**registry.config_fields("titans_mac"),
              **dict(c.model.mixers.get("titans_mac", {}))}
    seg = int(fields["segment_len"])
    if shard % seg:
      raise ConfigError("data.seq_len", f"must give shards of whole titans_mac segments: "
                        f"seq_len / mesh.sequence = {shard} tokens per shard (after landmark "
                        f"tokens) is not a multiple of segment_len={seg} (got "
                        f"{c.data.seq_len})" if "landmark" in pattern_names(c.model) else
                        f"must be a multiple of mesh.sequence x titans_mac segment_len = "
                        f"{sequence} x {seg} = {sequence * seg} (got {c.data.seq_len})")
  if num_devices is not None:
    shape = mesh_shape(c.mesh, num_devices)
    batch_shards = shape["data"] * shape["fsdp"]
    if c.data.batch_size % batch_shards:
      raise ConfigError("data.batch_size", f"must be divisible by mesh data*fsdp = "
                        f"{batch_shards} (got {c.data.batch_size})")
    if c.eval.batch_size % batch_shards:
      raise ConfigError("eval.batch_size", f"must be divisible by mesh data*fsdp = "
                        f"{batch_shards} (got {c.eval.batch_size})")
  tensor = mesh_shape(c.mesh, num_devices)["tensor"] if num_devices is not None else \
      c.mesh.tensor
  _check_tensor_heads(c, tensor)


# Mixer Config fields that count heads (split over the ``tensor`` mesh axis, LOGICAL_RULES).
HEAD_FIELDS = ("num_heads", "num_kv_heads", "attn_heads", "window_heads")


def _check_tensor_heads(c: ml_collections.ConfigDict, tensor: int) -> None:
  """A ``tensor`` axis larger than a layer's head count cannot split its heads: the sharding
  rules would silently replicate them (lcm/sharding.py), so it is a config error. Checks the
  head counts the mixers in the pattern declare, and those a Config derives from other
  fields (``derived_heads(d_model) -> (field, heads)``, e.g. mamba2's expand * d_model /
  head_dim)."""
  if tensor <= 1:
    return
  for name in dict.fromkeys(pattern_names(c.model)):
    overrides = dict(c.model.mixers.get(name, {}))
    fields = {**registry.config_fields(name), **overrides}
    counts = [(field, fields.get(field), f"model.mixers.{name}.{field}={fields.get(field)}",
               f"raise {field}") for field in HEAD_FIELDS]
    derive = getattr(registry.get(name).Config, "derived_heads", None)
    if derive is not None:
      field, heads = derive(registry.config(name, c.model.d_model, overrides), c.model.d_model)
      counts.append((field, heads, f"{name}'s head count expand * d_model / {field} = {heads}",
                     f"lower model.mixers.{name}.{field}"))
    for field, heads, what, fix in counts:
      if isinstance(heads, int) and not isinstance(heads, bool) and 0 < heads < tensor:
        raise ConfigError("mesh.tensor", f"must be <= {what} (got {tensor}): a tensor axis "
                          "larger than a layer's head count cannot split its heads and would "
                          f"replicate them on every device; lower mesh.tensor or {fix}")
