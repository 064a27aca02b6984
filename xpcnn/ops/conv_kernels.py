"""Compiled loops around the matrix products of a multi-channel convolution (stride 1), for
`fast_numba`: the products stay in BLAS and the window copies in NumPy (which copies a strided
window view faster than a compiled loop did here: 0.08 against 0.23 ms for 4 images of
16 x 28 x 28), and what the layers after the convolution do is one pass each, with the chunk
still in cache. Activations are channels-last, ``(N, H, W, C)`` memory (handed on as NCHW
views, as `fast_numpy` does):

    bias_relu         forward epilogue: + bias, ReLU, in place on the product's rows
    bias_relu_pool    forward epilogue: + bias, max pooling (tiling windows, with the offset of
                      each window's first maximum) and ReLU, into the pooled output; the
                      convolution's own output is never written to memory
    relu_gradient     backward prologue: dout where the output passed the ReLU, and its column
                      sums (db)
    unpool_gradient   backward prologue: dout placed at the pooled maxima that passed the ReLU,
                      zeros elsewhere, and db

See `fast_numba` for threads and compilation.
"""

from __future__ import annotations

from .kernel_cache import kernel

#: Numba's options for these loops: no GIL (the slices of a batch run on their own threads),
#: NumPy's error model (no division checks).
_OPTIONS = {"nogil": True, "error_model": "numpy"}


@kernel(**_OPTIONS)
def bias_relu(rows, b):
    """``rows = relu(rows + b)`` in place, ``rows (R, K)``; a NaN stays NaN."""
    for r in range(rows.shape[0]):
        row = rows[r]
        for k in range(row.shape[0]):
            value = row[k] + b[k]
            row[k] = value if not (value <= 0) else 0


@kernel(**_OPTIONS)
def bias_relu_pool(conv, b, pool, pooled, arg):
    """``pooled = relu(maxpool(conv + b))`` for tiling ``pool x pool`` windows, channels-last:
    ``conv (n, OH, OW, K)``, ``pooled`` and ``arg (n, OH/pool, OW/pool, K)``. ``arg`` holds the
    offset ``r * pool + c`` of the window's first maximum, or -1 where the ReLU passed nothing
    back (maximum <= 0, or NaN); a NaN wins its window and stays NaN."""
    for n in range(pooled.shape[0]):
        for ph in range(pooled.shape[1]):
            for pw in range(pooled.shape[2]):
                best, where = pooled[n, ph, pw], arg[n, ph, pw]
                first = conv[n, ph * pool, pw * pool]
                for k in range(best.shape[0]):
                    best[k] = first[k] + b[k]
                    where[k] = 0
                for offset in range(1, pool * pool):
                    candidate = conv[n, ph * pool + offset // pool, pw * pool + offset % pool]
                    for k in range(best.shape[0]):
                        value = candidate[k] + b[k]
                        if not (value <= best[k]) and best[k] == best[k]:     # larger, or the first NaN
                            best[k] = value
                            where[k] = offset
                for k in range(best.shape[0]):
                    value = best[k]
                    where[k] = where[k] if value > 0 else -1
                    best[k] = value if not (value <= 0) else 0


@kernel(**_OPTIONS)
def relu_gradient(dout, out, grad, db):
    """``grad = dout * (out > 0)`` for ``dout``, ``out``, ``grad (n, OH, OW, K)`` (channels-last
    views, any strides); ``db += `` the sums over its pixels."""
    for n in range(dout.shape[0]):
        for oh in range(dout.shape[1]):
            for ow in range(dout.shape[2]):
                source, passed, target = dout[n, oh, ow], out[n, oh, ow], grad[n, oh, ow]
                for k in range(target.shape[0]):
                    target[k] = source[k] if passed[k] > 0 else 0
                    db[k] += target[k]


@kernel(**_OPTIONS)
def unpool_gradient(dout, arg, pool, grad, db):
    """The gradient of `bias_relu_pool`'s input: ``dout (n, PH, PW, K)`` at each window's
    offset ``arg`` (where >= 0), zero elsewhere, into ``grad (n, PH*pool, PW*pool, K)``;
    ``db += `` the sums of what was placed."""
    grad[:] = 0
    for n in range(dout.shape[0]):
        for ph in range(dout.shape[1]):
            for pw in range(dout.shape[2]):
                source, where = dout[n, ph, pw], arg[n, ph, pw]
                for k in range(source.shape[0]):
                    offset = where[k]
                    if offset >= 0:
                        grad[n, ph * pool + offset // pool, pw * pool + offset % pool, k] = source[k]
                        db[k] += source[k]
