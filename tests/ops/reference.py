"""Independent numpy-loop references for the convolution primitives (written from definitions)."""

import numpy as np


def pad_hw(x, pads, value=0.0):
    (top, bottom), (left, right) = pads
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def conv2d_loops(x, kernel, stride=(1, 1), pads=((0, 0), (0, 0)), dilation=(1, 1), groups=1):
    """Cross-correlation by explicit loops. x [B,H,W,C], kernel [fh,fw,C/groups,O]."""
    batch, _, _, cin = x.shape
    fh, fw, cin_g, cout = kernel.shape
    xp = pad_hw(x.astype(np.float64), pads)
    eff_h, eff_w = dilation[0] * (fh - 1) + 1, dilation[1] * (fw - 1) + 1
    out_h = (xp.shape[1] - eff_h) // stride[0] + 1
    out_w = (xp.shape[2] - eff_w) // stride[1] + 1
    cout_g = cout // groups
    out = np.zeros((batch, out_h, out_w, cout))
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for o in range(cout):
                    g = o // cout_g
                    acc = 0.0
                    for u in range(fh):
                        for v in range(fw):
                            for c in range(cin_g):
                                acc += (
                                    xp[b, i * stride[0] + u * dilation[0], j * stride[1] + v * dilation[1], g * cin_g + c]
                                    * kernel[u, v, c, o]
                                )
                    out[b, i, j, o] = acc
    return out


def conv_transpose2d_loops(y, kernel, out_hw, stride=(1, 1), pads=((0, 0), (0, 0)), dilation=(1, 1)):
    """Transposed conv by scattering: each y[b,i,j,o] adds y * kernel[u,v,:,o] into the output
    at (i*s - top + u*d, j*s - left + v*d); out_hw is the unpadded output size. groups = 1."""
    batch, h, w, cout = y.shape
    fh, fw, cin, _ = kernel.shape
    (top, _), (left, _) = pads
    out = np.zeros((batch, out_hw[0], out_hw[1], cin))
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                for u in range(fh):
                    for v in range(fw):
                        r = i * stride[0] - top + u * dilation[0]
                        c = j * stride[1] - left + v * dilation[1]
                        if 0 <= r < out_hw[0] and 0 <= c < out_hw[1]:
                            out[b, r, c, :] += kernel[u, v, :, :] @ y[b, i, j, :]
    return out


def pool_loops(x, window, stride, pads, mode):
    """Max / mean pooling by loops; padded positions never win and are not counted in means.
    Returns (values, argmax flat index row*W+col) for max, values for mean."""
    batch, height, width, channels = x.shape
    (top, bottom), (left, right) = pads
    out_h = (height + top + bottom - window[0]) // stride[0] + 1
    out_w = (width + left + right - window[1]) // stride[1] + 1
    values = np.zeros((batch, out_h, out_w, channels))
    argmax = np.zeros((batch, out_h, out_w, channels), dtype=np.int64)
    for b in range(batch):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(channels):
                    best, best_pos, total, count = -np.inf, -1, 0.0, 0
                    for u in range(window[0]):
                        for v in range(window[1]):
                            r, q = i * stride[0] - top + u, j * stride[1] - left + v
                            if 0 <= r < height and 0 <= q < width:
                                val = x[b, r, q, c]
                                total += val
                                count += 1
                                if val > best:
                                    best, best_pos = val, r * width + q
                    values[b, i, j, c] = best if mode == "max" else total / count
                    argmax[b, i, j, c] = best_pos
    return (values, argmax) if mode == "max" else values
