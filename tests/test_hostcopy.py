"""The conversions' host-side helpers: tiled transposing copies, O_DIRECT writes, page-cache drops."""

import errno
import os

import ml_dtypes
import numpy as np
import pytest

from behemoth_jax.config import load_config
from behemoth_jax.convert import keymap, safetensors_io
from behemoth_jax.convert.hostcopy import copy_tiled, drop_cached, host_buffer, transposes
from behemoth_jax.convert.safetensors_io import SafetensorsFile, write_safetensors

CFG = load_config("configs/tiny.yaml", ["model.hidden_size=320", "model.head_dim=32"]).model
RULES = [*keymap.ATTN_RULES, *keymap.MOE_RULES, *keymap.DENSE_RULES, keymap.LM_HEAD]


D, F, E = CFG.hidden_size, 300, 3
HF_SHAPES = {  # HF tensor shapes of the rules above (odd sizes: tiles overrun every edge)
  "input_layernorm.weight": (D,),
  "post_attention_layernorm.weight": (D,),
  "self_attn.q_proj.weight": (CFG.num_heads * CFG.head_dim, D),
  "self_attn.k_proj.weight": (CFG.num_kv_heads * CFG.head_dim, D),
  "self_attn.v_proj.weight": (CFG.num_kv_heads * CFG.head_dim, D),
  "self_attn.o_proj.weight": (D, CFG.num_heads * CFG.head_dim),
  "feed_forward.router.weight": (E, D),
  "feed_forward.experts.gate_up_proj": (E, D, 2 * F),
  "feed_forward.experts.down_proj": (E, F, D),
  "lm_head.weight": (1000, D),
}
for name in ("shared_expert.gate_proj", "shared_expert.up_proj", "gate_proj", "up_proj"):
  HF_SHAPES[f"feed_forward.{name}.weight"] = (F, D)
for name in ("shared_expert.down_proj", "down_proj"):
  HF_SHAPES[f"feed_forward.{name}.weight"] = (D, F)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: ".".join(map(str, r.ours)))
@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (ml_dtypes.bfloat16, np.float32), (np.uint16, np.uint16)])
def test_copy_tiled_equals_numpy_both_ways(rule, dtypes):
  """Every key-table transform: HF tensor → our contiguous leaf (from-hf) and our leaf → a view of the HF
  buffer (to-hf), with and without a dtype cast, equal to numpy's own copy element for element."""
  src_dtype, dst_dtype = dtypes
  shape = HF_SHAPES[rule.hf]
  rng = np.random.default_rng(0)
  hf = rng.integers(0, 3000, shape).astype(src_dtype)
  view = rule.to_ours(hf, CFG)
  out = np.empty(view.shape, dst_dtype)
  copy_tiled(out, view)
  assert np.array_equal(out, view.astype(dst_dtype))
  back = np.zeros(shape, dst_dtype)
  target = rule.to_ours(back, CFG)
  if np.shares_memory(target, back):
    copy_tiled(target, out)
    want = np.zeros(shape, dst_dtype)
    np.copyto(rule.to_ours(want, CFG), out)
    assert np.array_equal(back, want)
  # A transpose is recognised as one (and only then is the copy tiled): every rule but the identity and
  # the halves of gate_up transposes.
  assert transposes(view) == (rule.to_ours is not keymap.same and rule.part is None)


@pytest.mark.parametrize("direct", [True, False])
def test_direct_sink_writes_exact_bytes_at_any_length(tmp_path, monkeypatch, direct):
  """Tensors of odd lengths across several staging blocks land byte for byte, the file truncated to its
  length; with O_DIRECT refused at open (EINVAL, as tmpfs does) the same bytes are written buffered."""
  monkeypatch.setattr(safetensors_io, "DIRECT_BLOCK", 8192)
  if not direct:
    real_open = os.open

    def no_direct(path, flags, *args):
      if flags & getattr(os, "O_DIRECT", 0):
        raise OSError(errno.EINVAL, "no O_DIRECT here")
      return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
  rng = np.random.default_rng(1)
  tensors = [(f"t{i}", rng.integers(0, 255, n, dtype=np.uint8)) for i, n in enumerate((1, 4095, 8192, 20001, 3))]
  plan = [(name, t.shape, t.dtype) for name, t in tensors]
  write_safetensors(tmp_path / "a.safetensors", iter(tensors), plan, metadata={"format": "pt"})
  f = SafetensorsFile(tmp_path / "a.safetensors")
  for name, t in tensors:
    assert np.array_equal(f.get(name), t), name
    assert np.array_equal(f.get(name, host_buffer(t.nbytes + 7), drop=True), t), name
  header = 8 + int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
  assert (tmp_path / "a.safetensors").stat().st_size == header + sum(t.nbytes for _, t in tensors)
  drop_cached(tmp_path)  # synced and dropped: still readable, unchanged
  assert np.array_equal(SafetensorsFile(tmp_path / "a.safetensors").get("t3"), tensors[3][1])


def test_read_scatter_fills_pieces_in_file_order_through_short_reads(tmp_path, monkeypatch):
  """A tensor's bytes land in the pieces in order (each row's halves into two arrays), also when the
  kernel returns fewer bytes than asked and with more pieces than one preadv call takes."""
  from behemoth_jax.convert.to_checkpoint import _scatter_pieces

  rng = np.random.default_rng(2)
  t = rng.integers(-3000, 3000, (3, 700, 10), dtype=np.int16)  # 2100 rows: 4200 pieces > IOV_MAX
  write_safetensors(tmp_path / "t.safetensors", iter([("w", t)]), [("w", t.shape, t.dtype)])
  real = os.preadv
  calls = []

  def short(fd, buffers, offset):  # every third call reads only half of what it was asked
    calls.append(len(buffers))
    if len(calls) % 3 == 0:
      return real(fd, [memoryview(buffers[0])[: max(1, len(buffers[0]) // 2)]], offset)
    return real(fd, buffers, offset)

  monkeypatch.setattr(os, "preadv", short)
  gate, up = np.zeros((3, 700, 5), np.int16), np.zeros((3, 700, 5), np.int16)
  SafetensorsFile(tmp_path / "t.safetensors").read_scatter("w", _scatter_pieces([gate, up]), drop=True)
  assert np.array_equal(gate, t[..., :5]) and np.array_equal(up, t[..., 5:])
  assert max(calls) == safetensors_io.IOV_MAX and len(calls) > 5
  with pytest.raises(ValueError, match="w: pieces hold"):
    SafetensorsFile(tmp_path / "t.safetensors").read_scatter("w", [memoryview(np.zeros(10, np.uint8))])


@pytest.mark.parametrize("fused", [True, False])
def test_from_hf_reads_plain_and_halved_tensors_straight_into_their_leaves(tmp_path, monkeypatch, fused):
  """from-hf reads a tensor that maps to its leaves by byte ranges (norms, embeddings, down_proj, the
  halves of gate_up_proj) straight into them, and the checkpoint restores exactly load_hf's values.
  Where scattering a fused tensor's halves would break the memory bound (here: a runtime allowance
  set too large for any), gate_up_proj is read whole and split instead, with the same result."""
  from hf_utils import make_hf_model
  from hf_utils import save_hf as hf_save_pretrained

  from behemoth_jax.convert import load_hf, to_checkpoint
  from behemoth_jax.convert.to_checkpoint import convert_hf_to_checkpoint
  from behemoth_jax.train.checkpoint import ParamReader, params_dir

  hf_save_pretrained(make_hf_model(seed=41), tmp_path / "hf")
  scattered = []
  real = SafetensorsFile.read_scatter
  monkeypatch.setattr(
    SafetensorsFile, "read_scatter", lambda self, name, *a: scattered.append(name) or real(self, name, *a)
  )
  if not fused:
    monkeypatch.setattr(to_checkpoint, "RUNTIME_BYTES", 1 << 40)
  cfg = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "ours")
  assert any(n.endswith("experts.gate_up_proj") for n in scattered) == fused
  assert any(n.endswith("down_proj") for n in scattered)
  assert not any(n.endswith("q_proj.weight") for n in scattered)  # a transpose: the general path
  want = load_hf(tmp_path / "hf")
  reader = ParamReader(params_dir(tmp_path / "ours"))
  from flax import nnx

  for key, var in nnx.to_flat_state(nnx.state(want, nnx.Param)):
    got = np.empty(var.get_value().shape, var.get_value().dtype)
    reader.read_into(key, None, got)
    assert np.array_equal(got, np.asarray(var.get_value())), key
  assert cfg.scan_layers is False
