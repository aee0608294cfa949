"""The autograd formulas of fire::repair, fire::repair_with_scores and fire::_repair_grad.

With w_nk = alpha_k g'(c_nk), G_nk = g(c_nk) (g = 1, c, relu(c - tau) or [c > tau] by mode) and
P = grad_out V^T (gated: g' = 0 almost everywhere, so x, mu and tau get no gradient through it):
  dx     = grad_out - sum_k w_nk P_nk v_k            (fused: fire::_repair_grad)
  dV     = -(alpha * G)^T grad_out - (w * P)^T (x - mu)
  dalpha = -sum_n G * P,   dmu = sum_n (w * P) V,   dtau = sum_n (w * P)   (clamp)
plus, for repair_with_scores, the scores' own gradient (c = V (x - mu)).
Invert (w = alpha [c > tau], h = w g, s = 1 / (1 + h), t = x - w V, y = s t + (1 - s) mu):
  dx = s grad_out,  dV = -(s w)^T grad_out,  dmu = sum_n (1 - s) grad_out,
  dalpha_k = sum_n [c_k > tau_k] (-s P_k + s^2 g_k <grad_out, mu - t>),
  dslope_k = sum_n s^2 w_k <grad_out, mu - t>.

Second derivatives (e.g. a gradient penalty on the input): `_repair_grad` is linear in grad,
out_r = (I - sum_k w_rk v_k v_k^T) grad_r and p_rk = <grad_r, v_k>. The matrix is symmetric, so
its vector-Jacobian product is the same fused pass; p contributes sum_k gp_rk v_k. The weights
depend on alpha (and on x only through clamp's piecewise-constant active set), so x's second
derivative needs nothing else; derivatives through directions or weights are not implemented
and say so.
"""
import torch

from .layout import rows, unrows
from .validate import channel_dim_of


def setup(ctx, inputs, output):
    """setup_context of the two public ops (and their Python twins)."""
    x, directions, alpha, center, tau, mode, *rest = inputs
    scores = output[1] if isinstance(output, tuple) else None
    ctx.mode = mode
    ctx.channel_dim = rest[0] if rest else None
    slope = rest[1] if len(rest) > 1 else None
    ctx.has_center, ctx.has_tau = center is not None, tau is not None
    ctx.save_for_backward(x, directions, alpha, center, tau, scores, slope)


def backward(ctx, grad_out, grad_scores=None):
    """The gradients of the two public ops (formulas above), on rows."""
    x, directions, alpha, center, tau, c, slope = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)  # trailing defaulted arguments may be absent
    need_v, need_a, need_mu, need_tau = (list(ctx.needs_input_grad) + [False] * 5)[1:5]
    mode, cd = ctx.mode, channel_dim_of(x, ctx.channel_dim)
    if mode == "invert" and slope is not None:
        return invert_backward(ctx, grad_out, grad_scores, n_inputs)
    mode = "gated" if mode == "invert" else mode  # without a slope, invert is gated
    K = directions.shape[0]

    # Everything below works on rows: (N, D) flattened, or (N * positions, C) per position.
    xc, V = centred_rows(x, directions, center, cd)
    R, D = xc.shape
    a = alpha.float()
    if c is None and mode != "shift":
        c = xc @ V.T
    G, w = _weights(mode, None if c is None else c.reshape(R, K), a, tau, R, K)
    g2 = rows(grad_out, cd).float()
    if w is None:  # shift, gated: out = x - const (per row)
        dx = grad_out
        P = g2 @ V.T if need_a else None
    else:
        dx, P = torch.ops.fire._repair_grad(grad_out, V, w.contiguous(), cd)
        P = P.reshape(R, K)
    gs = None
    if grad_scores is not None:
        gs = grad_scores.float().reshape(R, K)
        dx = dx + unrows(gs @ V, x.shape, cd).to(dx.dtype)

    dV = da = dmu = dtau = None
    if need_v:
        dV = _directions_grad(mode, a, G, w, P, g2, xc, gs).reshape(directions.shape).to(directions.dtype)
    if need_a:
        da = (-(G * P).sum(0)).to(alpha.dtype)
    if need_mu:
        dmu = torch.zeros(D, device=x.device) if w is None else (w * P).sum(0) @ V
        if gs is not None:
            dmu = dmu - gs.sum(0) @ V
        dmu = dmu.reshape(center.shape).to(center.dtype)
    if need_tau:
        dtau = (torch.zeros(K, device=x.device) if w is None else (w * P).sum(0)).to(tau.dtype)
    return (dx, dV, da, dmu, dtau, None, None, None)[:n_inputs]


def _weights(mode, c, a, tau, R, K):
    """G = g(c) (R, K) and w = alpha g'(c) (R, K), or w None where out = x - a constant per row
    (shift; gated, whose weight is piecewise constant)."""
    if mode == "shift":
        return torch.ones(R, K, dtype=torch.float32, device=a.device), None
    if mode == "project":
        return c, a.expand(R, K)
    t = tau.float() if tau is not None else torch.zeros_like(a)
    active = (c > t).float()
    if mode == "clamp":
        return torch.clamp(c - t, min=0), a * active
    return active, None  # gated


def _directions_grad(mode, a, G, w, P, g2, xc, gs):
    """dV (K, D) on rows."""
    if mode == "shift":
        dV = -(a[:, None] * g2.sum(0)[None, :])
    elif w is None:  # gated
        dV = -(a * G).T @ g2
    else:
        dV = -(a * G).T @ g2 - (w * P).T @ xc
    if gs is not None:
        dV = dV + gs.T @ xc
    return dV


def centred_rows(x, directions, center, cd):
    """x - center as fp32 rows (R, D), and the directions as fp32 (K, D): what backward works on."""
    xc = rows(x, cd).float()
    V = directions.reshape(directions.shape[0], xc.shape[1]).float()
    if center is not None:
        xc = xc - center.reshape(1, -1).float()
    return xc, V


def invert_backward(ctx, grad_out, grad_scores, n_inputs):
    """The gradients of mode invert with a slope (formulas above), in plain PyTorch on rows."""
    x, directions, alpha, center, tau, c, slope = ctx.saved_tensors
    cd = channel_dim_of(x, ctx.channel_dim)
    K = directions.shape[0]
    xc, V = centred_rows(x, directions, center, cd)
    R = xc.shape[0]
    c = (xc @ V.T if c is None else c.reshape(R, K)).float()
    t = tau.float() if tau is not None else torch.zeros(K, device=x.device)
    gate = torch.where(c.isnan(), c, (c > t).float())
    w = alpha.float() * gate
    s = 1 / (1 + w @ slope.float())  # (R,)
    g2 = rows(grad_out, cd).float()
    gs = None if grad_scores is None else grad_scores.float().reshape(R, K)
    dx = unrows(s[:, None] * g2, x.shape, cd).to(grad_out.dtype)
    if gs is not None:
        dx = dx + unrows(gs @ V, x.shape, cd).to(dx.dtype)
    need = list(ctx.needs_input_grad) + [False] * 8
    dV = da = dmu = dg = None
    if need[1]:
        dV = -(s[:, None] * w).T @ g2
        if gs is not None:
            dV = dV + gs.T @ xc
        dV = dV.reshape(directions.shape).to(directions.dtype)
    if need[2] or need[7]:
        to_mu = (g2 * (w @ V - xc)).sum(1)  # <grad_out, mu - t> per row
        if need[2]:
            P = g2 @ V.T
            da = (gate * (-s[:, None] * P + (s**2)[:, None] * slope.float() * to_mu[:, None])).sum(0)
            da = da.to(alpha.dtype)
        if need[7]:
            dg = ((s**2)[:, None] * w * to_mu[:, None]).sum(0).to(slope.dtype)
    if need[3]:
        dmu = ((1 - s) @ g2)
        if gs is not None:
            dmu = dmu - gs.sum(0) @ V
        dmu = dmu.reshape(center.shape).to(center.dtype)
    dtau = torch.zeros_like(tau) if need[4] else None
    return (dx, dV, da, dmu, dtau, None, None, dg)[:n_inputs]


def grad_setup(ctx, inputs, output):
    """setup_context of fire::_repair_grad."""
    grad, directions, weights, *rest = inputs
    ctx.channel_dim = rest[0] if rest else None
    ctx.grad_shape = grad.shape
    ctx.save_for_backward(directions, weights)


def grad_backward(ctx, g_out, g_p):
    """The vector-Jacobian product of fire::_repair_grad with respect to grad (second derivatives in x)."""
    directions, weights = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)
    if any(ctx.needs_input_grad[1:3]):
        raise NotImplementedError(
            "fire.repair: second derivatives are implemented with respect to x only; a double backward "
            "through the directions, alpha, center or tau (create_graph=True with those requiring grad) is not")
    dgrad = None
    if ctx.needs_input_grad[0]:
        cd = ctx.channel_dim
        dgrad = torch.ops.fire._repair_grad(g_out, directions, weights, cd)[0]
        if g_p is not None:
            K = directions.shape[0]
            back = g_p.reshape(-1, K).float() @ directions.reshape(K, -1).float()
            dgrad = dgrad + unrows(back, ctx.grad_shape, cd).to(dgrad.dtype)
    return (dgrad, None, None, None)[:n_inputs]

