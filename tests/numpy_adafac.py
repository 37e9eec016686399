"""An independent float64 NumPy AdafacMLPLOpt, written literally from
learned_optimization's `adafac_mlp_lopt.py` and `common.py` (HEAD): tile the row and
column statistics, concatenate 28 features, normalise by their second moment,
append the 11 time features and run the MLP. Shares no code with lopt_fast.
"""

from __future__ import annotations

import numpy as np


def _factored_dims(shape):
    if len(shape) < 2:
        return None
    s = np.argsort(shape, kind="stable")
    return int(s[-2]), int(s[-1])


def _rsqrt(x):
    return 1.0 / np.sqrt(x)


def _safe_rsqrt(x):
    return _rsqrt(np.maximum(x, 1e-9))


def _decay(init, offset):
    return 1 - np.exp((np.log(1 - np.asarray(init, np.float64)) / 10.0 + offset) * 10.0)


class NumpyAdafac:
    def __init__(self, theta, shape, exp_mult=1e-3, step_mult=1e-3,
                 mom_init=(0.9, 0.99, 0.999), rms_init=(0.999,), fac_init=(0.9, 0.99, 0.999)):
        t = {k: np.asarray(v, np.float64) for k, v in theta["nn"]["~"].items()}
        self.nn = t
        self.mom_d = _decay(mom_init, np.asarray(theta["momentum_decays"], np.float64))
        self.rms_d = _decay(rms_init, np.asarray(theta["rms_decays"], np.float64))
        self.fac_d = _decay(fac_init, np.asarray(theta["adafactor_decays"], np.float64))
        self.exp_mult, self.step_mult = exp_mult, step_mult
        self.shape = tuple(shape)
        self.m = np.zeros(self.shape + (3,))
        self.rms = np.zeros(self.shape + (1,))
        fd = _factored_dims(self.shape)
        if fd is None:
            self.v = np.zeros(self.shape + (3,))
        else:
            d1, d0 = fd
            self.v_row = np.zeros(tuple(np.delete(self.shape, d0)) + (3,))
            self.v_col = np.zeros(tuple(np.delete(self.shape, d1)) + (3,))
        self.iteration = 0

    def step(self, p, g):
        p = np.asarray(p, np.float64)
        g = np.asarray(g, np.float64)
        # accumulators, one decay at a time (as the vmapped accumulators do)
        for i in range(3):
            self.m[..., i] = self.mom_d[i] * self.m[..., i] + (1 - self.mom_d[i]) * g
        c = np.clip(self.rms_d[0], 0, 1)
        self.rms[..., 0] = c * self.rms[..., 0] + (1 - c) * g * g
        fd = _factored_dims(p.shape)
        fac_g = np.zeros(p.shape + (3,))
        for i in range(3):
            c = np.clip(self.fac_d[i], 0, 1)
            gsq = g * g + 1e-30
            if fd is None:
                self.v[..., i] = c * self.v[..., i] + (1 - c) * gsq
                fac_g[..., i] = g * _safe_rsqrt(self.v[..., i] + 1e-9)
            else:
                d1, d0 = fd
                self.v_row[..., i] = c * self.v_row[..., i] + (1 - c) * gsq.mean(axis=d0)
                self.v_col[..., i] = c * self.v_col[..., i] + (1 - c) * gsq.mean(axis=d1)
                red = d1 - 1 if d1 > d0 else d1
                rcm = self.v_row[..., i].mean(axis=red, keepdims=True)
                rf = _safe_rsqrt(self.v_row[..., i] / (rcm + 1e-9))
                cf = _safe_rsqrt(self.v_col[..., i])
                fac_g[..., i] = g * np.expand_dims(rf, d0) * np.expand_dims(cf, d1)

        # features (scalar -> shape (1,))
        scalar = p.shape == ()
        if scalar:
            p, g, m, rms, fac_g = p[None], g[None], self.m[None], self.rms[None], fac_g[None]
            v = self.v[None]
        else:
            m, rms = self.m, self.rms
            v = self.v if fd is None else None
        inps = [g[..., None], p[..., None], m, rms, m * _rsqrt(rms + 1e-6), _rsqrt(rms + 1e-6),
                fac_g]
        if fd is not None:
            d1, d0 = fd
            row_feat = np.repeat(np.expand_dims(self.v_row, d0), p.shape[d0], axis=d0)
            col_feat = np.repeat(np.expand_dims(self.v_col, d1), p.shape[d1], axis=d1)
            inps += [row_feat, col_feat, _rsqrt(row_feat + 1e-8), _rsqrt(col_feat + 1e-8)]
            red = d1 - 1 if d1 > d0 else d1
            rcm = self.v_row.mean(axis=red, keepdims=True)
            rf = _safe_rsqrt(self.v_row / (rcm + 1e-9))
            cf = _safe_rsqrt(self.v_col)
            inps.append(m * np.expand_dims(rf, d0) * np.expand_dims(cf, d1))
        else:
            inps += [v, v, _rsqrt(v + 1e-8), _rsqrt(v + 1e-8), m * (v + 1e-6) ** -0.5]
        x = np.concatenate(inps, axis=-1)
        assert x.shape[-1] == 28
        axes = tuple(range(p.ndim))
        x = x * _rsqrt(1e-5 + np.mean(x * x, axis=axes, keepdims=True))
        scales = np.asarray([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000], np.float64)
        tfeat = np.tanh(self.iteration / scales - 1.0)
        x = np.concatenate([x, np.broadcast_to(tfeat, p.shape + (11,))], axis=-1)
        n_layers = len([k for k in self.nn if k.startswith("w")])
        h = x
        for i in range(n_layers):
            h = h @ self.nn[f"w{i}"] + self.nn[f"b{i}"]
            if i != n_layers - 1:
                h = np.maximum(h, 0)
        step = h[..., 0] * np.exp(h[..., 1] * self.exp_mult) * self.step_mult
        new_p = p - step
        self.iteration += 1
        return new_p[0] if scalar else new_p
