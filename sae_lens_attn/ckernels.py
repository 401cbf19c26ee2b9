"""A compiled CPU kernel for TopK selection: the bias add and the two-level top-k in one pass per row.

In PyTorch ops the CPU selection reads the [batch, d_sae] pre-activations four times (the bias add, the
block maxima, the candidate gather, the value gather) through a dozen ops. This kernel does, per row,
while the row (96 KB at d_sae 24576) sits in the core's cache, the same rule as
:func:`sae_lens_attn.kernels.topk_indices`: add the bias in place (so ``pre`` ends up exactly as ``add_``
leaves it) while taking the maxima of the strided blocks ``{c, c + nb, ...}`` (32 per block, vertical
SIMD); choose the k blocks with the largest maxima; choose the k largest of their k * 32 entries. Both
choices are a quickselect whose partition loops have no data-dependent branches (with branches, the
mispredicted compares cost more than the whole memory pass), then the entries above the threshold and as
many ties as needed. The kept values are exactly ``torch.topk``'s; which of several exactly tied entries is
taken may differ. At [4096, 24576] on 2 cores: about 68 ms against about 100 ms for the PyTorch ops.

It is plain C (no PyTorch headers), built on first use with the system's C compiler (``cc -O3``; on x86-64
Linux one binary holds AVX-512, AVX2 and baseline clones, picked at load time) into a per-user cache
directory (``$SAE_LENS_ATTN_CACHE``, else ``$XDG_CACHE_HOME/sae_lens_attn``, else ``~/.cache/sae_lens_attn``)
keyed by the source's hash, and called through ``ctypes``, which releases the GIL: the rows are split over
``torch.get_num_threads()`` Python threads. Without a compiler, or if the build fails for any reason,
:func:`available` is False (:func:`unavailable_reason` says why) and the PyTorch ops serve.
``SAE_LENS_ATTN_TOPK=two_level`` or ``torch`` (:func:`sae_lens_attn.kernels.topk_mode`) bypasses it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

/* The k-th largest of a[0..m) (1 <= k <= m), without data-dependent branches in the partition loops (a
   quickselect's compares are coin flips for the branch predictor). a is reordered; tmp holds 2 m floats. */
static float kth_largest(float* a, float* tmp, int64_t m, int64_t k) {
    while (m > 16) {
        float x0 = a[0], x1 = a[m / 2], x2 = a[m - 1];  /* median of three */
        float piv = x0 > x1 ? (x1 > x2 ? x1 : (x0 > x2 ? x2 : x0)) : (x0 > x2 ? x0 : (x1 > x2 ? x2 : x1));
        float* gt = tmp;
        float* lt = tmp + m;
        int64_t ng = 0, nl = 0;
        for (int64_t i = 0; i < m; i++) {
            float v = a[i];
            gt[ng] = v;
            lt[nl] = v;
            ng += v > piv;
            nl += v < piv;
        }
        if (k <= ng) { for (int64_t i = 0; i < ng; i++) a[i] = gt[i]; m = ng; }
        else if (k <= m - nl) return piv;
        else { k -= m - nl; for (int64_t i = 0; i < nl; i++) a[i] = lt[i]; m = nl; }
    }
    for (int64_t i = 1; i < m; i++) {  /* insertion sort, descending */
        float v = a[i];
        int64_t j = i - 1;
        while (j >= 0 && a[j] < v) { a[j + 1] = a[j]; j--; }
        a[j + 1] = v;
    }
    return a[k - 1];
}

#define G 32
/* One binary for every x86-64: the loader picks the AVX-512, AVX2 or baseline clone (GCC/clang ifunc). */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TARGETS
#endif

/* Rows [r0, r1) of x (row stride ld, n columns, n a multiple of G with n / G >= k): optionally x += bias in
   place, then the column indices of the k largest entries of each row into idx (row-major [rows, k],
   unordered; the caller gathers the values it needs from x). Returns 0,
   1 if a value was NaN or infinite (the bias is still added; the caller redoes the selection with
   torch.topk), 2 if out of memory, 3 if n does not fit the block layout (nothing done).

   Per row, while it sits in the core's cache: (1) one pass adds the bias and takes the maximum of each of
   the nb = n / G strided blocks {c, c + nb, c + 2 nb, ...}: G vertical passes over nb-wide segments, plain
   SIMD with no horizontal reduction; (2) the k blocks with the largest maxima are chosen: every one of the
   row's k largest entries lies in one of them, since each is >= the k-th largest block maximum; (3) the k
   largest of those k * G candidates are chosen. (2) and (3) keep everything above a threshold (the k-th
   largest, by quickselect) and then as many entries equal to it as are needed. */
TARGETS
int topk_rows_f32(float* restrict x, const float* restrict bias, int64_t r0, int64_t r1, int64_t n,
                  int64_t ld, int64_t k, int64_t* restrict idx) {
    if (n % G != 0 || n / G < k || k < 1) return 3;
    int64_t nb = n / G;
    int64_t mt = nb > k * G ? nb : k * G;
    float* tmp = (float*)malloc(sizeof(float) * (size_t)(2 * mt));
    float* bm = (float*)malloc(sizeof(float) * (size_t)(2 * nb));
    float* fin = (float*)malloc(sizeof(float) * (size_t)nb);
    float* cv = (float*)malloc(sizeof(float) * (size_t)(k * G));
    int64_t* cb = (int64_t*)malloc(sizeof(int64_t) * (size_t)k);
    if (!tmp || !bm || !fin || !cv || !cb) { free(tmp); free(bm); free(fin); free(cv); free(cb); return 2; }
    float* scratch = bm + nb;
    int bad = 0;
    for (int64_t r = r0; r < r1; r++) {
        float* restrict row = x + r * ld;
        for (int64_t c = 0; c < nb; c++) { bm[c] = -INFINITY; fin[c] = 0.0f; }
        for (int64_t g = 0; g < G; g++) {
            float* restrict seg = row + g * nb;
            if (bias) {
                const float* restrict bseg = bias + g * nb;
                for (int64_t c = 0; c < nb; c++) {
                    float v = seg[c] + bseg[c];
                    seg[c] = v;
                    bm[c] = v > bm[c] ? v : bm[c];
                    fin[c] += v * 0.0f;  /* stays 0 unless some v is NaN or infinite */
                }
            } else {
                for (int64_t c = 0; c < nb; c++) {
                    float v = seg[c];
                    bm[c] = v > bm[c] ? v : bm[c];
                    fin[c] += v * 0.0f;
                }
            }
        }
        float f = 0.0f;
        for (int64_t c = 0; c < nb; c++) f += fin[c];
        if (f != 0.0f) { bad = 1; continue; }  /* NaN: finish the bias add only */
        /* (2) the k blocks with the largest maxima */
        int64_t nsel = 0;
        for (int64_t c = 0; c < nb; c++) scratch[c] = bm[c];
        float t0 = kth_largest(scratch, tmp, nb, k);
        for (int64_t c = 0; c < nb && nsel < k; c++) if (bm[c] > t0) cb[nsel++] = c;
        for (int64_t c = 0; c < nb && nsel < k; c++) if (bm[c] == t0) cb[nsel++] = c;
        /* (3) the k largest of their entries */
        int64_t m = 0;
        for (int64_t q = 0; q < k; q++)
            for (int64_t g = 0; g < G; g++) cv[m++] = row[cb[q] + g * nb];
        float t1 = kth_largest(cv, tmp, m, k);
        int64_t out = 0;
        int64_t* ri = idx + r * k;
        for (int64_t q = 0; q < k; q++)
            for (int64_t g = 0; g < G; g++) {
                int64_t j = cb[q] + g * nb;
                if (row[j] > t1) ri[out++] = j;
            }
        for (int64_t q = 0; q < k && out < k; q++)
            for (int64_t g = 0; g < G && out < k; g++) {
                int64_t j = cb[q] + g * nb;
                if (row[j] == t1) ri[out++] = j;
            }
    }
    free(tmp);
    free(bm);
    free(fin);
    free(cv);
    free(cb);
    return bad;
}
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def _cache_dir() -> Path:
    root = os.environ.get("SAE_LENS_ATTN_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sae_lens_attn"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    tag = hashlib.sha256((SOURCE + sys.platform + os.uname().machine).encode()).hexdigest()[:16]
    out = _cache_dir() / f"topk_{tag}.so"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(out.parent, os.W_OK)
    except OSError:
        writable = False
    if not out.exists() and not writable:  # a read-only home: build under the temp dir instead
        out = Path(tempfile.gettempdir()) / f"sae_lens_attn_{os.getuid()}" / out.name
        out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            src = Path(tmp) / "topk.c"
            src.write_text(SOURCE)
            so = Path(tmp) / "topk.so"
            cmd = [cc, "-O3", "-fPIC", "-shared", "-fno-math-errno", "-o", str(so), str(src)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
            os.replace(so, out)  # atomic: a concurrent process sees the old name or the whole file
    lib = ctypes.CDLL(str(out))
    fn = lib.topk_rows_f32
    fn.restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr]
    return lib


def available() -> bool:
    """Whether the compiled kernel is built and loaded (builds it on the first call)."""
    global _lib, _failed
    if _lib is not None:
        return True
    if _failed is not None:
        return False
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except Exception as err:  # no compiler, a read-only cache, an odd platform: use PyTorch instead
                _failed = f"{type(err).__name__}: {err}"
    return _lib is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None while it is True or not yet tried)."""
    return _failed


def topk_rows(scores: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> tuple[torch.Tensor | None, bool]:
    """(indices, bias_added): the k largest entries per row of a float32 CPU matrix whose rows are contiguous,
    after ``scores += bias`` in place when ``bias`` is given. ``indices`` is None when the kernel cannot
    serve (not built; another dtype, device or layout; d_sae not a multiple of 32 with at least k blocks; a
    NaN or inf in the scores): then ``bias_added`` says whether the bias was added all the same (it was
    if the kernel ran), so the caller neither skips nor repeats it."""
    if (not available() or scores.dtype != torch.float32 or scores.device.type != "cpu" or scores.dim() != 2
            or scores.stride(1) != 1 or scores.requires_grad):
        return None, False
    rows, n = scores.shape
    if n % 32 or n // 32 < k or k < 1 or rows == 0:
        return None, False
    if bias is not None:
        bias = bias.detach().to(torch.float32).contiguous()
        if bias.shape != (n,):
            return None, False
    idx = torch.empty(rows, k, dtype=torch.int64)
    threads = max(1, min(torch.get_num_threads(), rows // 64 or 1))
    bounds = [rows * t // threads for t in range(threads + 1)]
    pointers = (scores.data_ptr(), bias.data_ptr() if bias is not None else None)
    fn = _lib.topk_rows_f32

    def part(t: int) -> int:
        return fn(*pointers, bounds[t], bounds[t + 1], n, scores.stride(0), k, idx.data_ptr())

    codes = [part(0)] if threads == 1 else list(_executor(threads).map(part, range(threads)))
    if any(c in (2, 3) for c in codes):  # out of memory or a layout the C code refuses: it did nothing there
        if any(c in (0, 1) for c in codes):
            raise RuntimeError(f"compiled top-k: inconsistent return codes {codes}")
        return None, False
    if any(codes):  # NaN or inf somewhere: the bias is added everywhere, the selection is the caller's
        return None, bias is not None
    return idx, bias is not None


def _executor(threads: int) -> ThreadPoolExecutor:
    """A thread pool of at least ``threads`` workers, remade after a fork (a forked child has none of its
    parent's threads)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sae_lens_attn_topk")
        _pool_pid = os.getpid()
    return _pool
