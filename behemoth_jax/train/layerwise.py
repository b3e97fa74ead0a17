"""The optimizer applied cycle by cycle inside the backward pass (`train.layerwise_update`): the whole
gradient never exists at once.

The ordinary step holds a gradient for every parameter before its one update (2 bytes per parameter in
bf16: 28.8 GiB per chip for Behemoth on 128 chips, a third of its training state). Here the forward
scan over the stacked layer cycles keeps each block's input (what full remat keeps) and nothing else;
the backward is a reverse scan whose step c recomputes cycle c block by block (last block first),
takes each block's vjp, then applies the optimizer to cycle c's slice of the parameters and moments
and writes them back into the stacked arrays (scan carry: updated in place). One cycle's gradient is
live at a time. The parameters outside the cycles (embedding, LM head, final norm, unscanned tail
layers, vision encoder) take the ordinary update after the backward. optax's transformations act
leaf by leaf, so `tx.update` on a cycle's slice (its moments sliced alike, the step counts shared) is
the same update as on the whole tree.

What differs from the ordinary step, by necessity:
- Global-norm clipping needs the whole gradient's norm before the first update. `train.layerwise_clip:
  exact` (the default) measures it first with a backward pass of its own (no update): the same updates as
  the ordinary step, at ~1.75× its compute. `previous` runs that pass only where clipping may act (the
  previous step's norm above `EXACT_ABOVE` × `train.grad_clip`, and at the first step); elsewhere the
  previous step's norm stands in (`optim.clip_by_previous_norm`), so a spike from below the threshold
  goes through unclipped (the next step is exact again). Tiny model, 200 steps: `previous` departs from
  the ordinary trajectory at its first spike (5 in 200 steps, 1.5-2.7× the previous norm). Clipping by
  the previous norm alone, first step included, failed worse: the unclipped first gradient dominated
  Adam's second moment for ~100 steps (held-out loss +12.5% on one seed). The reported `grad_norm` is
  this step's.
- A non-finite loss, or a non-finite gradient norm where it was measured first, skips the whole update
  (as the ordinary step). Otherwise (no clipping, or `previous` on a step it did not measure) a
  non-finite gradient skips each cycle whose gradient is non-finite and the parameters outside the
  cycles; cycles already updated (the later layers) keep their update. Either counts as a skipped step,
  and the step counts of the optimizer do not advance.
- The backward recomputes every block (full remat at block granularity) whatever `model.remat_policy`.
- No gradient accumulation (the config refuses `train.grad_accum` > 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from behemoth_jax.config import TrainConfig
from behemoth_jax.train.objective import loss_of_hidden, step_metrics
from behemoth_jax.train.optim import previous_norm, set_previous_norm
from behemoth_jax.train.state import State

CYCLES = ("decoder", "cycles")  # where the stacked cycles sit in the parameter tree
# Below this share of `train.grad_clip` a previous step's norm stands in for this step's (module doc).
EXACT_ABOVE = 0.8


def split_cycles(tree: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(the stacked cycles' subtree, everything else) of a parameter-shaped tree."""
  flat = nnx.to_flat_state(tree)
  cycles = nnx.from_flat_state([(p[2:], v) for p, v in flat if p[:2] == CYCLES])
  return cycles, nnx.from_flat_state([(p, v) for p, v in flat if p[:2] != CYCLES])


def join_cycles(cycles: nnx.State, rest: nnx.State) -> nnx.State:
  """The inverse of `split_cycles`."""
  flat = [(CYCLES + p, v) for p, v in nnx.to_flat_state(cycles)] + list(nnx.to_flat_state(rest))
  return nnx.from_flat_state(flat)


def _params_like(x) -> bool:  # the parameter-shaped subtrees of an optimizer state (Adam's moments)
  return isinstance(x, nnx.State)


def _on_moments(f, opt_state, *others):
  """`f` on each parameter-shaped subtree of `opt_state` (with the matching nodes of `others`);
  every other leaf (step counts, the previous norm) passes through from `opt_state`."""
  return jax.tree.map(lambda x, *o: f(x, *o) if _params_like(x) else x, opt_state, *others, is_leaf=_params_like)


def make_layerwise_train_step(graphdef, tx: optax.GradientTransformation, tc: TrainConfig, schedule, distill=None):
  """`train_step(state, batch[, teacher_params])` with `step.make_train_step`'s signature and metrics."""

  def train_step(state: State, batch: dict, teacher_params=None) -> tuple[State, dict]:
    params = state["params"]
    cycles, rest = split_cycles(params)
    total = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    progress = state["step"].astype(jnp.float32) / max(tc.steps, 1)
    model = nnx.merge(graphdef, params)
    dec = model.decoder
    pos = model.positions(*batch["inputs"].shape, batch["positions"], batch["segment_ids"])

    def pre(rest):
      m = nnx.merge(graphdef, join_cycles(cycles, rest))
      return m.prologue(m.embed_inputs(batch["inputs"], batch.get("pixel_values")), pos)

    def post(rest, x, cycle_stats):
      m = nnx.merge(graphdef, join_cycles(cycles, rest))
      x, stats, _ = m.decoder.run_tail(x, pos, cycle_stats)
      return loss_of_hidden(m, m.final_norm(x), stats, batch, tc, total, distill, teacher_params, progress)

    x, pre_vjp = jax.vjp(pre, rest)
    cycle_stats = None
    if dec.cycles is not None:
      cycle_def = nnx.graphdef(dec.cycles)

      def forward(x, p_c):  # no gradient taken here: only each block's input is kept
        ins, stats = [], []
        for block in nnx.merge(cycle_def, p_c).blocks:
          ins.append(x)
          x, s, _ = block(x, pos)
          stats.append(s)
        return x, (tuple(ins), tuple(stats))

      x, (ins, cycle_stats) = jax.lax.scan(forward, x, cycles)
    loss, post_vjp, (ce, stats, extra) = jax.vjp(post, rest, x, cycle_stats, has_aux=True)
    g_rest, dx, d_cycle_stats = post_vjp(jnp.ones_like(loss))
    finite_loss = jnp.isfinite(loss)

    def cycle_grads(dx, p_c, ins_c, d_stats_c):  # (gradient of one cycle's parameters, dx below it)
      cycle = nnx.merge(cycle_def, p_c)
      grads = {}
      for j in reversed(range(len(cycle.blocks))):
        block_def, p_cj = nnx.split(cycle.blocks[j])
        _, block_vjp = jax.vjp(lambda p, x, d=block_def: nnx.merge(d, p)(x, pos)[:2], p_cj, ins_c[j])
        grads[j], dx = block_vjp((dx, d_stats_c[j]))
      flat = [(("blocks", j, *path), v) for j in sorted(grads) for path, v in nnx.to_flat_state(grads[j])]
      return nnx.from_flat_state(flat), dx

    def whole_norm(dx):  # the whole gradient's norm, nothing updated (a backward pass of its own)
      sumsq = jnp.zeros((), jnp.float32)
      if dec.cycles is not None:

        def body(carry, xs):
          dx, sumsq = carry
          c, ins_c, d_stats_c = xs
          g_c, dx = cycle_grads(dx, jax.tree.map(lambda a: a[c], cycles), ins_c, d_stats_c)
          return (dx, sumsq + optax.tree.norm(g_c, squared=True).astype(jnp.float32)), None

        xs = (jnp.arange(dec.num_cycles), ins, d_cycle_stats)
        (dx, sumsq), _ = jax.lax.scan(body, (dx, sumsq), xs, reverse=True)
      g = jax.tree.map(jnp.add, g_rest, pre_vjp(dx)[0])
      return jnp.sqrt(sumsq + optax.tree.norm(g, squared=True))

    # Clipping needs the whole norm before the first update: measured by a backward pass of its own
    # where clipping may act, else the previous step's norm stands in (module doc).
    opt_state, prev = state["opt_state"], previous_norm(state["opt_state"])
    if prev is not None and tc.layerwise_clip == "exact":
      norm = whole_norm(dx)
    elif prev is not None:
      exact = (prev == 0) | (prev > EXACT_ABOVE * tc.grad_clip)
      norm = jax.lax.cond(exact, whole_norm, lambda _: prev, dx)
    norm_ok = jnp.array(True)
    if prev is not None:
      norm_ok = jnp.isfinite(norm)  # measured non-finite: no part is updated, as in the ordinary step
      opt_state = set_previous_norm(opt_state, jnp.where(norm_ok, norm, prev))
    opt_cycles = _on_moments(lambda m: split_cycles(m)[0], opt_state)
    opt_rest = _on_moments(lambda m: split_cycles(m)[1], opt_state)
    sumsq, cycles_ok = jnp.zeros((), jnp.float32), jnp.array(True)
    if dec.cycles is not None:

      def backward(carry, xs):
        dx, p_all, s_all, sumsq = carry
        c, ins_c, d_stats_c = xs
        p_c = jax.tree.map(lambda a: a[c], p_all)
        g_c, dx = cycle_grads(dx, p_c, ins_c, d_stats_c)
        sq = optax.tree.norm(g_c, squared=True).astype(jnp.float32)
        ok = finite_loss & norm_ok & jnp.isfinite(sq)
        s_c = _on_moments(lambda m: jax.tree.map(lambda a: a[c], m), s_all)
        updates, s_new = tx.update(g_c, s_c, p_c)
        p_new = jax.tree.map(lambda new, old: jnp.where(ok, new, old), optax.apply_updates(p_c, updates), p_c)
        put = lambda full, new: jax.lax.dynamic_update_index_in_dim(full, jnp.where(ok, new, full[c]), c, 0)  # noqa: E731
        s_all = _on_moments(lambda m, new: jax.tree.map(put, m, new), s_all, s_new)
        p_all = jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new, c, 0), p_all, p_new)
        return (dx, p_all, s_all, sumsq + sq), ok

      xs = (jnp.arange(dec.num_cycles), ins, d_cycle_stats)
      (dx, cycles, opt_cycles, sumsq), oks = jax.lax.scan(backward, (dx, cycles, opt_cycles, sumsq), xs, reverse=True)
      cycles_ok = oks.all()
    (g_pre,) = pre_vjp(dx)
    g_rest = jax.tree.map(jnp.add, g_rest, g_pre)
    grad_norm = jnp.sqrt(sumsq + optax.tree.norm(g_rest, squared=True))
    ok = finite_loss & jnp.isfinite(grad_norm)

    def update(rest, opt_rest):
      updates, opt_rest = tx.update(g_rest, opt_rest, rest)
      return optax.apply_updates(rest, updates), opt_rest

    rest, opt_rest = jax.lax.cond(ok, update, lambda p, o: (p, o), rest, opt_rest)
    if prev is not None:
      opt_rest = set_previous_norm(opt_rest, jnp.where(ok, grad_norm, prev))
    new_state = {
      "params": join_cycles(cycles, rest),
      # the step counts and the previous norm: the rest's (opt_cycles holds the old ones)
      "opt_state": _on_moments(lambda r, c: join_cycles(c, r), opt_rest, opt_cycles),
      "step": state["step"] + 1,
      "skipped": state["skipped"] + (~(ok & cycles_ok)).astype(jnp.int32),
    }
    metrics = step_metrics(loss, ce, grad_norm, schedule(state["step"]), total, stats, new_state["skipped"], extra)
    return new_state, metrics

  return train_step
