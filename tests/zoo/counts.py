"""Hand counts of the zoo's FLOPs and params, in closed form from each architecture.

Nothing here traces a model: every function lists its network's layers by hand,
with the output positions (H_out * W_out, or tokens) worked out from the 16x16
input, and adds each layer's closed form. The convention is jaxprune's (tas.md §5):

- FLOPs per example = multiply-accumulates of every conv and every dot_general
  (Dense, attention q.k and attn.v) + one add per output element of a conv/dense
  bias. BatchNorm, LayerNorm, activations, pooling, softmax, residual adds, the
  position-embedding add and the cls-token concatenation are not counted.
- conv with ``feature_group_count`` G: positions * C_out * k*k * C_in / G MACs.
- ``ConvTranspose`` (stride s): lax lowers it to ``conv_general_dilated`` over the
  input dilated by s (``lhs_dilation=(s, s)``, window stride 1), so every output
  position is a full k*k*C_in window, zeros of the dilation included:
  H_out * W_out * C_out * k*k * C_in MACs (checked in tests/cost/test_zoo_counts.py
  against a jaxpr).
- params = entries of the trainable params (BN statistics excluded).
"""

CLASSES = 10


class Ledger:
  """Sums per-layer closed forms; one method per layer kind."""

  def __init__(self):
    self.macs = 0       # conv + dot_general multiply-accumulates
    self.bias_adds = 0  # one per output element of a conv/dense bias add
    self.params = 0
    self.tagged = {}    # tag -> FLOPs of the layers listed with that tag

  def _add(self, tag, macs, bias_adds):
    self.macs += macs
    self.bias_adds += bias_adds
    if tag:
      self.tagged[tag] = self.tagged.get(tag, 0) + macs + bias_adds

  @property
  def flops(self):
    return self.macs + self.bias_adds

  def conv(self, positions, cin, cout, k, groups=1, bias=False, tag=None):
    """k x k conv (or ConvTranspose, see the module docstring) at `positions` outputs."""
    assert cin % groups == 0 and cout % groups == 0, (cin, cout, groups)
    self._add(tag, positions * cout * k * k * (cin // groups), positions * cout if bias else 0)
    self.params += k * k * (cin // groups) * cout + (cout if bias else 0)

  def dense(self, rows, cin, cout, bias=True, tag=None):
    """Dense cin -> cout applied to `rows` rows (tokens); cout may be a product."""
    self._add(tag, rows * cin * cout, rows * cout if bias else 0)
    self.params += cin * cout + (cout if bias else 0)

  def norm(self, c):
    """BatchNorm / LayerNorm: scale and bias, no FLOPs counted."""
    self.params += 2 * c

  def param(self, n):
    """A parameter used without a counted op (cls token, position embedding)."""
    self.params += n

  def matmul(self, macs, tag=None):
    """An activation x activation dot_general (attention)."""
    self._add(tag, macs, 0)

  def result(self):
    return {"flops": int(self.flops), "params": int(self.params)}


def hand_count(layers_fn):
  """``layers_fn(L, widths)`` lists the layers into a Ledger ``L``; the decorated
  function maps widths to ``{"flops", "params"}`` and its ``.ledger(widths)`` gives
  the Ledger (MACs and bias adds apart)."""
  def count(w):
    return count.ledger(w).result()

  def ledger(w):
    L = Ledger()
    layers_fn(L, dict(w))
    return L

  count.ledger = ledger
  count.__name__ = layers_fn.__name__
  count.__doc__ = layers_fn.__doc__
  return count


@hand_count
def plain_cnn(L, w):
  # conv1 3x3 (bias) @16x16 -> avg_pool 2 -> conv2 3x3 (bias) @8x8 -> avg_pool 2
  # -> global mean -> dense.
  L.conv(256, 3, w["c1"], 3, bias=True)
  L.conv(64, w["c1"], w["c2"], 3, bias=True)
  L.dense(1, w["c2"], CLASSES)


@hand_count
def vgg(L, w):
  # [conv-bn-relu]x2 @16x16, max_pool 2, [conv-bn-relu]x2 @8x8, max_pool 2 (4x4),
  # flatten (16 positions per channel), dense-relu-dense.
  L.conv(256, 3, w["c1"], 3); L.norm(w["c1"])
  L.conv(256, w["c1"], w["c2"], 3); L.norm(w["c2"])
  L.conv(64, w["c2"], w["c3"], 3); L.norm(w["c3"])
  L.conv(64, w["c3"], w["c4"], 3); L.norm(w["c4"])
  L.dense(1, 16 * w["c4"], w["hidden"])
  L.dense(1, w["hidden"], CLASSES)


@hand_count
def resnet_basic(L, w):
  # stem conv 3x3 @16x16 + bn, max_pool 3x3/2 SAME -> 8x8. Stage 1 (8x8, width =
  # stem: identity shortcuts), stage 2 (first conv stride 2 -> 4x4, conv_proj 1x1/2).
  s, t = w["stem"], w["s2"]
  L.conv(256, 3, s, 3); L.norm(s)
  for b in ("s1b0", "s1b1"):
    m = w[b]
    L.conv(64, s, m, 3); L.norm(m)
    L.conv(64, m, s, 3); L.norm(s)
  m = w["s2b0"]
  L.conv(16, s, m, 3); L.norm(m)
  L.conv(16, m, t, 3); L.norm(t)
  L.conv(16, s, t, 1); L.norm(t)  # conv_proj, norm_proj
  m = w["s2b1"]
  L.conv(16, t, m, 3); L.norm(m)
  L.conv(16, m, t, 3); L.norm(t)
  L.dense(1, t, CLASSES)


@hand_count
def resnet_bottleneck(L, w):
  # stem 3x3 @16x16 + bn, max_pool 3x3/2 -> 8x8. Each block: 1x1 -> a, 3x3 (stride)
  # -> b, 1x1 -> out (zero-init bn); conv_proj on the first block of each stage.
  # Stage 2's stride is on the 3x3 (Flax's BottleneckResNetBlock): its 1x1 runs at 8x8.
  L.conv(256, 3, w["stem"], 3); L.norm(w["stem"])
  cin = w["stem"]
  for stage, pos_in, pos_out in (("s1", 64, 64), ("s2", 64, 16)):
    out = w[stage + "_out"]
    for i in (0, 1):
      a, b = w[f"{stage}b{i}_a"], w[f"{stage}b{i}_b"]
      p_in = pos_in if i == 0 else pos_out
      L.conv(p_in, cin, a, 1); L.norm(a)
      L.conv(pos_out, a, b, 3); L.norm(b)
      L.conv(pos_out, b, out, 1); L.norm(out)
      if i == 0:
        L.conv(pos_out, cin, out, 1); L.norm(out)
      cin = out
  L.dense(1, cin, CLASSES)


@hand_count
def mobilenet_v1(L, w):
  # stem 3x3/2 -> 8x8; dw 3x3 (groups = c0) @8x8, pw 1x1 -> c1; dw 3x3/2 (groups =
  # c1) -> 4x4, pw -> c2; global mean, dense.
  c0, c1, c2 = w["c0"], w["c1"], w["c2"]
  L.conv(64, 3, c0, 3); L.norm(c0)
  L.conv(64, c0, c0, 3, groups=c0); L.norm(c0)
  L.conv(64, c0, c1, 1); L.norm(c1)
  L.conv(16, c1, c1, 3, groups=c1); L.norm(c1)
  L.conv(16, c1, c2, 1); L.norm(c2)
  L.dense(1, c2, CLASSES)


@hand_count
def mobilenet_v2(L, w):
  # stem 3x3/2 -> 8x8 (c0). b1: expand e1, dw, project -> c0, add (8x8). b2: expand
  # e2 @8x8, dw/2 -> 4x4, project -> c2. b3: expand e3, dw, project -> c2, add (4x4).
  # head 1x1 -> ch, global mean, dense.
  c0, c2 = w["c0"], w["c2"]
  L.conv(64, 3, c0, 3); L.norm(c0)

  def block(cin, e, cout, pos_in, pos_out):
    L.conv(pos_in, cin, e, 1); L.norm(e)
    L.conv(pos_out, e, e, 3, groups=e); L.norm(e)
    L.conv(pos_out, e, cout, 1); L.norm(cout)

  block(c0, w["e1"], c0, 64, 64)
  block(c0, w["e2"], c2, 64, 16)
  block(c2, w["e3"], c2, 16, 16)
  L.conv(16, c2, w["ch"], 1); L.norm(w["ch"])
  L.dense(1, w["ch"], CLASSES)


@hand_count
def densenet(L, w):
  # stem 3x3/2 -> 8x8 (c0); 3 pre-activation layers bn-relu-conv3x3 -> g_i, each
  # concatenated onto its input; transition bn-relu-conv1x1 -> t, avg_pool 2 (4x4);
  # bn-relu, global mean, dense.
  c = w["c0"]
  L.conv(64, 3, c, 3)
  for g in ("g1", "g2", "g3"):
    L.norm(c)
    L.conv(64, c, w[g], 3)
    c += w[g]
  L.norm(c)
  L.conv(64, c, w["t"], 1)
  L.norm(w["t"])
  L.dense(1, w["t"], CLASSES)


@hand_count
def split_concat(L, w):
  # stem 3x3/2 -> 8x8 with left + right channels; split; right -> pw1 (b), dw 3x3
  # (groups b), pw2 (r2); concat [left, r2]; fuse 1x1 -> c3; global mean, dense.
  l, r, b, r2, c3 = w["left"], w["right"], w["b"], w["r2"], w["c3"]
  L.conv(64, 3, l + r, 3); L.norm(l + r)
  L.conv(64, r, b, 1); L.norm(b)
  L.conv(64, b, b, 3, groups=b); L.norm(b)
  L.conv(64, b, r2, 1); L.norm(r2)
  L.conv(64, l + r2, c3, 1); L.norm(c3)
  L.dense(1, c3, CLASSES)


UNET_OUT = 2


@hand_count
def unet(L, w):
  # enc1 3x3 @16x16, max_pool -> enc2 3x3 @8x8, max_pool -> mid 3x3 @4x4;
  # up2 ConvTranspose 2x2/2 (bias) -> 8x8, concat [up2, enc2], dec2 3x3 @8x8;
  # up1 ConvTranspose 2x2/2 (bias) -> 16x16, concat [up1, enc1], dec1 3x3 @16x16;
  # out 1x1 (bias) @16x16 -> 2 maps.
  e1, e2, m, u2, d2, u1, d1 = (w[k] for k in ("e1", "e2", "m", "u2", "d2", "u1", "d1"))
  L.conv(256, 3, e1, 3); L.norm(e1)
  L.conv(64, e1, e2, 3); L.norm(e2)
  L.conv(16, e2, m, 3); L.norm(m)
  L.conv(64, m, u2, 2, bias=True, tag="conv_transpose")
  L.conv(64, u2 + e2, d2, 3); L.norm(d2)
  L.conv(256, d2, u1, 2, bias=True, tag="conv_transpose")
  L.conv(256, u1 + e1, d1, 3); L.norm(d1)
  L.conv(256, d1, UNET_OUT, 1, bias=True)


@hand_count
def mlp(L, w):
  # flatten 16*16*3 -> dense h1 -> relu -> dense h2 -> relu -> dense.
  L.dense(1, 768, w["h1"])
  L.dense(1, w["h1"], w["h2"])
  L.dense(1, w["h2"], CLASSES)


VIT_PATCH = 4
VIT_TOKENS = (16 // VIT_PATCH) ** 2 + 1  # 16 patches + cls


@hand_count
def vit(L, w):
  # patch conv 4x4/4 (bias) -> 16 tokens + cls = 17 (+ position embedding);
  # pre-LN block: ln1, MHA (q, k: heads x qk_dim; v: heads x v_dim; out), add;
  # ln2, dense mlp, gelu, dense, add; ln_f; cls token -> dense head.
  e, h, dq, dv, m, n = w["embed"], w["heads"], w["qk_dim"], w["v_dim"], w["mlp"], VIT_TOKENS
  L.conv(16, 3, e, VIT_PATCH, bias=True)
  L.param(e)          # cls
  L.param(n * e)      # position embedding
  L.norm(e)           # ln1
  L.dense(n, e, h * dq, tag="attention")  # query
  L.dense(n, e, h * dq, tag="attention")  # key
  L.dense(n, e, h * dv, tag="attention")  # value
  L.matmul(h * n * n * dq, tag="attention")  # q.k: (h, n, n) outputs, contracted over qk_dim
  L.matmul(h * n * n * dv, tag="attention")  # attn.v: (n, h, v_dim) outputs, contracted over n
  L.dense(n, h * dv, e, tag="attention")  # out
  L.norm(e)           # ln2
  L.dense(n, e, m)
  L.dense(n, m, e)
  L.norm(e)           # ln_f
  L.dense(1, e, CLASSES)


@hand_count
def remat_cnn(L, w):
  # stem 3x3/2 -> 8x8 (c0) + bn; two rematerialised residual blocks conv3x3 -> m_i,
  # bn, relu, conv3x3 -> c0, bn, add; global mean, dense.
  c0 = w["c0"]
  L.conv(64, 3, c0, 3); L.norm(c0)
  for b in ("m1", "m2"):
    L.conv(64, c0, w[b], 3); L.norm(w[b])
    L.conv(64, w[b], c0, 3); L.norm(c0)
  L.dense(1, c0, CLASSES)


@hand_count
def jaxprune_conv(L, w):
  # layers.Conv 3x3 pad 1 @16x16 (no bias) + BatchNorm; layers.Conv 3x3/2 pad 1
  # (bias) -> 8x8; max_pool 2 -> 4x4; flatten (16 positions), dense.
  L.conv(256, 3, w["c1"], 3); L.norm(w["c1"])
  L.conv(64, w["c1"], w["c2"], 3, bias=True)
  L.dense(1, 16 * w["c2"], CLASSES)


