"""Starting a run from another run's parameters (training/warmstart.py, config.init).

`merge` on hand-made pytrees (numpy: every expected array is written out), and one
`apply` end to end on a trained tiny run: the new state holds the base run's EMA or raw
parameters, its EMA equal to them, a fresh optimizer state at step 0, and a class table
grown from 10 classes (+ ∅) to 11 keeps every old row, the ∅ row moved to the end.
"""
import dataclasses

import jax
import numpy as np
import pytest

from conftest import assert_trees_equal, tiny_config
from diffusion_jax import parallel, runs
from diffusion_jax.training import loop, tasks, warmstart


def _arr(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def test_same_paths_and_shapes_are_copied_and_map_rewrites_paths():
  base = {"Dense_0": {"kernel": _arr(3, 4, seed=1), "bias": _arr(4, seed=2)},
          "Embed_0": {"embedding": _arr(5, 4, seed=3)}}
  fresh = {"Dense_0": {"kernel": _arr(3, 4, seed=4), "bias": _arr(4, seed=5)},
           "Embed_0": {"embedding": _arr(5, 4, seed=6)}}
  out = _np(warmstart.merge(fresh, base))
  assert_trees_equal(out, base)
  # A diffusion run's network under a fine-tuning run's 'denoiser' entry, beside a new
  # 'lora' entry kept from the new run's own initialisation.
  new = {"denoiser": fresh, "lora": {"Dense_0": {"a": _arr(3, 2, seed=7),
                                                 "b": np.zeros((2, 4), np.float32)}}}
  out = _np(warmstart.merge(new, base, mapping=(("^", "denoiser/"),),
                            rules=(("^lora/", "init"),)))
  assert_trees_equal(out, {"denoiser": base, "lora": new["lora"]})
  # Several rewrites apply in turn.
  renamed = {"net": {"Dense_0": base["Dense_0"], "Embed_0": base["Embed_0"]}}
  out = _np(warmstart.merge(new, renamed, mapping=(("^net/", ""), ("^", "denoiser/")),
                            rules=(("^lora/", "init"),)))
  assert_trees_equal(out["denoiser"], base)


def test_init_keeps_the_fresh_value_even_where_the_base_matches():
  base = {"a": _arr(3, seed=1), "b": _arr(2, 2, seed=2)}
  fresh = {"a": _arr(3, seed=3), "b": _arr(2, 2, seed=4)}
  out = _np(warmstart.merge(fresh, base, rules=(("^b$", "init"),)))
  np.testing.assert_array_equal(out["a"], base["a"])
  np.testing.assert_array_equal(out["b"], fresh["b"])
  # A reshaped parameter under 'init': the old values are discarded.
  out = _np(warmstart.merge({"a": fresh["a"], "b": _arr(3, 3, seed=5)}, base,
                            rules=(("^b$", "init"),)))
  np.testing.assert_array_equal(out["b"], _arr(3, 3, seed=5))


def test_grow_keeps_every_old_entry_and_takes_the_new_ones_from_fresh():
  old, new = _arr(2, 3, seed=1), _arr(4, 5, seed=2)
  out = np.asarray(warmstart.merge({"t": new}, {"t": old}, rules=(("t", "grow"),))["t"])
  want = new.copy()
  want[:2, :3] = old
  np.testing.assert_array_equal(out, want)
  out = np.asarray(warmstart.merge({"t": new}, {"t": old}, rules=(("t", "grow_zeros"),))["t"])
  want = np.zeros_like(new)
  want[:2, :3] = old
  np.testing.assert_array_equal(out, want)


def test_grow_mean_fills_new_rows_with_the_mean_of_the_old():
  old, new = _arr(3, 4, seed=1), _arr(5, 4, seed=2)
  out = np.asarray(warmstart.merge({"e": new}, {"e": old}, rules=(("e", "grow_mean"),))["e"])
  np.testing.assert_array_equal(out[:3], old)
  np.testing.assert_allclose(out[3:], np.broadcast_to(old.mean(0), (2, 4)), rtol=1e-6)
  # Axis 0 only.
  with pytest.raises(ValueError, match=r"e: rule 'grow_mean' cannot grow \(3, 4\) to \(5, 6\)"):
    warmstart.merge({"e": _arr(5, 6)}, {"e": old}, rules=(("e", "grow_mean"),))


def test_grow_last_moves_the_null_row_to_the_new_last_row():
  """A class table [K + 1, D] whose last row is the ∅ label of classifier-free guidance
  grown to [K' + 1, D]: the K class rows stay, ∅ moves to the end, the new classes
  come from the fresh initialisation."""
  old, new = _arr(11, 4, seed=1), _arr(13, 4, seed=2)
  out = np.asarray(warmstart.merge({"y": new}, {"y": old}, rules=(("y", "grow_last"),))["y"])
  np.testing.assert_array_equal(out[:10], old[:10])
  np.testing.assert_array_equal(out[12], old[10])
  np.testing.assert_array_equal(out[10:12], new[10:12])
  with pytest.raises(ValueError, match=r"rule 'grow_last' cannot grow \(11, 4\) to \(13, 5\)"):
    warmstart.merge({"y": _arr(13, 5)}, {"y": old}, rules=(("y", "grow_last"),))


def test_drop_leaves_out_base_only_parameters_by_their_base_path():
  base = {"body": {"w": _arr(3, seed=1)}, "head": {"w": _arr(2, seed=2)}}
  fresh = {"denoiser": {"body": {"w": _arr(3, seed=3)}}}
  # 'drop' matches the base run's own path, before the map.
  out = _np(warmstart.merge(fresh, base, mapping=(("^", "denoiser/"),),
                            rules=(("^head/", "drop"),)))
  assert_trees_equal(out, {"denoiser": {"body": base["body"]}})
  with pytest.raises(ValueError, match=r"head/w \(2,\): the base run's, not in this run "
                                       r"\(mapped to denoiser/head/w\)"):
    warmstart.merge(fresh, base, mapping=(("^", "denoiser/"),))


def test_one_error_names_every_unmatched_parameter():
  base = {"same": _arr(2), "reshaped": _arr(3, 4), "too_big": _arr(6, 2), "gone": _arr(5)}
  fresh = {"same": _arr(2), "reshaped": _arr(3, 5), "too_big": _arr(4, 2), "new": _arr(7)}
  with pytest.raises(ValueError) as e:
    warmstart.merge(fresh, base, rules=(("too_big", "grow"),))
  msg = str(e.value)
  assert "config.init" in msg
  assert "new (7,): not in the base run" in msg
  assert "reshaped: base run has (3, 4), this run (3, 5)" in msg
  assert "too_big: rule 'grow' cannot grow (6, 2) to (4, 2)" in msg
  assert "gone (5,): the base run's, not in this run" in msg
  assert "same" not in msg.split(":\n", 1)[1]
  with pytest.raises(ValueError, match=r"rule 'grow' cannot grow \(2, 3\) to \(2, 3, 1\)"):
    warmstart.merge({"t": _arr(2, 3, 1)}, {"t": _arr(2, 3)}, rules=(("t", "grow"),))


def test_an_unknown_rule_is_an_error():
  with pytest.raises(ValueError, match=r"config.init.rules: rule 'keep'.*'grow_last'"):
    warmstart.merge({"a": _arr(2)}, {"a": _arr(2)}, rules=(("a", "keep"),))


# ------------------------------------------------------------------------ apply

def _fresh_state(config, info):
  """The new run's state as the loop builds it (before the warm start)."""
  task = tasks.make(config, info)
  key = loop.keys(config.seed)[0]
  abstract = jax.eval_shape(task.init, key)
  mesh = parallel.make_mesh(config.mesh)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  return jax.jit(task.init, out_shardings=shardings)(key), mesh, shardings


def _opt_leaves(opt_state):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}


def test_apply_starts_from_the_base_runs_parameters(tiny_teacher, data_dir):
  """tiny_teacher: 4 steps of a class-conditional U-Net on sklearn_digits (10 classes,
  class table [11, D]). The new run grows it to 11 classes ([12, D])."""
  config = tiny_config(data_dir, **{"init.from_workdir": tiny_teacher})
  info = loop.dataset_info(config)
  assert info.num_classes == 10
  state, mesh, shardings = _fresh_state(config, info)
  assert warmstart.apply(tiny_config(data_dir), state, mesh, shardings) is state  # no base

  ema, raw = (_np(runs.load(tiny_teacher, params=p).params) for p in ("ema", "raw"))
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
  fresh_opt = _opt_leaves(state.opt_state)
  for which, want in (("ema", ema), ("raw", raw)):
    config.init.params = which
    new = warmstart.apply(config, state, mesh, shardings)
    assert_trees_equal(_np(new.params), want)
    assert_trees_equal(_np(new.ema_params), want)
    assert int(new.step) == 0
    opt = _opt_leaves(new.opt_state)
    assert opt.keys() == fresh_opt.keys()
    for k, v in opt.items():
      np.testing.assert_array_equal(v, fresh_opt[k], err_msg=k)
    counts = [v for k, v in opt.items() if k.endswith(".count")]
    assert counts and all(int(c) == 0 for c in counts)
    # Placed as the loop's shardings say.
    for x, s in zip(jax.tree.leaves(new.params), jax.tree.leaves(shardings.params)):
      assert x.sharding == s

  # A class table grown to 11 classes + ∅ (the new run's own dataset facts: 11 classes).
  config.init.params = "ema"
  config.init.rules = (("^Embed_0/embedding$", "grow_last"),)
  state, mesh, shardings = _fresh_state(config, dataclasses.replace(info, num_classes=11))
  fresh_table = np.asarray(state.params["Embed_0"]["embedding"])
  old_table = ema["Embed_0"]["embedding"]
  assert old_table.shape[0] == 11 and fresh_table.shape == (12, old_table.shape[1])
  new = warmstart.apply(config, state, mesh, shardings)
  table = np.asarray(new.params["Embed_0"]["embedding"])
  np.testing.assert_array_equal(table[:10], old_table[:10])   # every real class
  np.testing.assert_array_equal(table[11], old_table[10])     # ∅, the new last row
  np.testing.assert_array_equal(table[10], fresh_table[10])   # the new class
  np.testing.assert_array_equal(np.asarray(new.ema_params["Embed_0"]["embedding"]), table)
  rest = lambda t: {k: v for k, v in _np(t).items() if k != "Embed_0"}
  assert_trees_equal(rest(new.params), rest(ema))
  # Without the rule: an error naming the table, nothing started.
  config.init.rules = ()
  with pytest.raises(ValueError, match=r"Embed_0/embedding: base run has \(11, 32\), this "
                                       r"run \(12, 32\)"):
    warmstart.apply(config, state, mesh, shardings)
