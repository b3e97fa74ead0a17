"""Collective bytes per chip (`scale.collectives`) on small programs whose bytes are known by hand,
compiled for the 8 fake CPU devices."""

from functools import partial

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from behemoth_jax.scale.collectives import bytes_by_kind, collectives

MESH = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def _hlo(f, *args) -> str:
  return jax.jit(f).lower(*args).compile().as_text()


def _only(hlo: str, kind: str) -> float:
  got = bytes_by_kind(hlo)
  assert {k for k, v in got.items() if v} == {kind}, got
  return got[kind]


def test_an_fsdp_all_gather_of_a_known_parameter():
  """A [1024, 256] f32 parameter sharded 8 ways on its rows, gathered whole: each chip receives the 7
  shards it lacks, 7 × 128 × 256 × 4 bytes."""
  w = jax.device_put(jnp.ones((1024, 256)), NamedSharding(MESH, P("x", None)))
  hlo = _hlo(lambda w: jax.sharding.reshard(w, NamedSharding(MESH, P())), w)
  assert _only(hlo, "all-gather") == 7 * 128 * 256 * 4
  (c,) = collectives(hlo)
  assert (c.group, c.operand_bytes) == (8, 128 * 256 * 4)


def test_an_all_to_all_and_a_reduce_scatter_of_known_size():
  """Per chip [64, 32] f32 (8 KiB): an all-to-all sends 7/8 of it; a reduce-scatter of the same
  array sends 7/8 of it too; groups of 4 (two groups) send 3/4."""
  x = jax.device_put(jnp.ones((8 * 64, 32)), NamedSharding(MESH, P("x", None)))
  a2a = jax.shard_map(
    lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True), mesh=MESH, in_specs=P("x"), out_specs=P("x")
  )
  assert _only(_hlo(a2a, x), "all-to-all") == pytest.approx(7 / 8 * 64 * 32 * 4)
  rs = jax.shard_map(lambda x: jax.lax.psum_scatter(x, "x", tiled=True), mesh=MESH, in_specs=P("x"), out_specs=P("x"))
  assert _only(_hlo(rs, x), "reduce-scatter") == pytest.approx(7 / 8 * 64 * 32 * 4)
  mesh2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  y = jax.device_put(jnp.ones((8 * 64, 32)), NamedSharding(mesh2, P(("a", "b"), None)))
  a2a4 = jax.shard_map(
    lambda x: jax.lax.all_to_all(x, "b", 0, 0, tiled=True), mesh=mesh2, in_specs=P(("a", "b")), out_specs=P(("a", "b"))
  )
  (c,) = collectives(_hlo(a2a4, y))
  assert (c.kind, c.group, c.bytes) == ("all-to-all", 4, pytest.approx(3 / 4 * 64 * 32 * 4))


def test_a_loop_of_all_reduces_counts_every_trip():
  """psum of a [256] f32 per chip inside a 5-trip loop: 5 × 2 × 7/8 × 1 KiB per chip."""
  x = jax.device_put(jnp.ones((8 * 256,)), NamedSharding(MESH, P("x")))

  @partial(jax.shard_map, mesh=MESH, in_specs=P("x"), out_specs=P("x"))
  def loop(x):
    return jax.lax.fori_loop(0, 5, lambda i, y: jax.lax.psum(y, "x") * 0.5 + jnp.sin(y), x)

  hlo = _hlo(loop, x)
  assert _only(hlo, "all-reduce") == pytest.approx(5 * 2 * 7 / 8 * 256 * 4)
  (c,) = collectives(hlo)
  assert c.bytes == pytest.approx(
    5
    * collectives(_hlo(jax.shard_map(lambda y: jax.lax.psum(y, "x"), mesh=MESH, in_specs=P("x"), out_specs=P("x")), x))[
      0
    ].bytes
  )


def test_async_collectives_with_iota_groups_as_tpu_programs_print_them():
  """An async all-gather in iota replica groups ([2,4]<=[8]: two groups of 4), counted once at its start."""
  hlo = """HloModule m, num_partitions=8

ENTRY %main (p: bf16[16,128]) -> bf16[64,128] {
  %p = bf16[16,128]{1,0} parameter(0)
  %ags = (bf16[16,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(bf16[16,128]{1,0} %p), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %agd = bf16[64,128]{1,0} all-gather-done((bf16[16,128]{1,0}, bf16[64,128]{1,0}) %ags)
}
"""
  (c,) = collectives(hlo)
  assert (c.kind, c.group, c.operand_bytes, c.bytes) == ("all-gather", 4, 16 * 128 * 2, 3 * 16 * 128 * 2)


def test_a_ragged_all_to_all_counts_its_smaller_buffer():
  """The expert exchange's ragged all-to-all (TPU / GPU) over groups of 4: rows out of a [256, 64]
  input into a [512, 64] round buffer, and back from the buffer into [256, 64]; each moves about its
  routed rows, the smaller array (module doc), 3/4 of them off the chip."""
  hlo = """HloModule m, num_partitions=8

ENTRY %main (x: bf16[256,64], o: bf16[512,64], y: bf16[256,64], a: s32[8], b: s32[8], c: s32[8], d: s32[8]) -> bf16[256,64] {
  %x = bf16[256,64]{1,0} parameter(0)
  %o = bf16[512,64]{1,0} parameter(1)
  %y = bf16[256,64]{1,0} parameter(2)
  %a = s32[8]{0} parameter(3)
  %b = s32[8]{0} parameter(4)
  %c = s32[8]{0} parameter(5)
  %d = s32[8]{0} parameter(6)
  %out = bf16[512,64]{1,0} ragged-all-to-all(%x, %o, %a, %b, %c, %d), channel_id=1, replica_groups=[2,4]<=[8]
  ROOT %back = bf16[256,64]{1,0} ragged-all-to-all(%out, %y, %a, %b, %c, %d), channel_id=2, replica_groups=[2,4]<=[8]
}
"""
  got = collectives(hlo)
  assert [(c.kind, c.group, c.operand_bytes, c.bytes) for c in got] == [
    ("all-to-all", 4, 256 * 64 * 2, 0.75 * 256 * 64 * 2)
  ] * 2


def test_groups_spanning_slices_count_as_dcn():
  """8 devices in 2 slices of 4 (ids 0-3, 4-7). `[4,2]<=[2,4]T(1,0)` pairs device i with i + 4: every
  group spans both slices (DCN); `[2,4]<=[8]` keeps each group inside a slice (ICI); a permute from
  0 to 4 crosses."""
  hlo = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (p: f32[16]) -> f32[16] {
  %p = f32[16]{0} parameter(0)
  %across = f32[16]{0} all-reduce(f32[16]{0} %p), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
  %inside = f32[16]{0} all-reduce(f32[16]{0} %across), channel_id=2, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %perm = f32[16]{0} collective-permute(f32[16]{0} %inside), channel_id=3, source_target_pairs={{0,4},{4,0}}
}
"""
  from behemoth_jax.scale.collectives import _groups, bytes_by_link

  assert _groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
  # libtpu's mesh form: ids row-major over the axes, each group along the named ones.
  assert _groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}", 8) == [
    [0, 4],
    [1, 5],
    [2, 6],
    [3, 7],
  ]
  assert _groups("replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", 8) == [
    [0, 1, 4, 5],
    [2, 3, 6, 7],
  ]
  got = bytes_by_link(hlo, lambda i: i // 4)
  assert got == {
    ("DCN", "all-reduce"): pytest.approx(2 * 1 / 2 * 64),
    ("ICI", "all-reduce"): pytest.approx(2 * 3 / 4 * 64),
    ("DCN", "collective-permute"): 64,
  }
  assert {c.link for c in collectives(hlo)} == {"ICI"}  # without unit_of nothing is DCN


@pytest.mark.parametrize("chunk", [16, 32])
def test_context_parallel_attention_bytes_by_layer_kind(chunk):
  """3 chunked layers and a global one, 64 tokens over context 4 (16 tokens per shard): with chunks of 16
  every shard holds whole chunks and chunked layers move no keys or values along `context`; with chunks
  of 32 they fetch their chunk's other half. The global layer gathers every shard's keys and values
  ([1, 16, 2, 8] float32 each: 3 x 1,024 bytes per chip apiece) in both, named at the layer's own
  constraint, not after the key/value projections: collectives named after a projection
  (attention.PROJECTIONS: weights, windowed einsums) are not keys or values and are left out."""
  from flax import nnx
  from test_sharding import CFG

  from behemoth_jax.config import ModelConfig, ParallelConfig
  from behemoth_jax.model.attention import ATTENTION_SCOPES, PROJECTIONS
  from behemoth_jax.model.transformer import create_model
  from behemoth_jax.scale.collectives import bytes_along
  from sharding.api import place, use_mesh
  from sharding.mesh import make_mesh

  cfg = ModelConfig(**{**CFG.__dict__, "moe_layers": (), "attention_chunk_size": chunk})
  assert [k.chunked for k in cfg.layer_kinds] == [True, True, True, False]
  mesh = make_mesh(ParallelConfig(fsdp=2, context=4))
  graphdef, state = nnx.split(create_model(cfg, seed=0))

  def loss(state, ids):
    return jnp.mean(nnx.merge(graphdef, state)(ids))

  with use_mesh(mesh):
    hlo = _hlo(jax.grad(loss), place(state, mesh), jnp.zeros((2, 64), jnp.int32))
  scopes = ATTENTION_SCOPES[True], ATTENTION_SCOPES[False]
  along = bytes_along(hlo, mesh.devices.shape, mesh.axis_names.index("context"), scopes, exclude=PROJECTIONS)
  chunked, global_ = along.values()
  assert global_["all-gather"] == 2 * 3 * 1024 and global_.get("all-reduce", 0) > 0, global_
  if chunk == 16:
    assert chunked == {}, chunked
  else:
    assert sum(chunked.values()) > 0
